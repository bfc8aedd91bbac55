"""The align and clip stages' models and datasets, which the training objectives build."""
from __future__ import annotations


def text_tokenizer_for(model_cfg):
    from paddle_mm.alignment.text import TextTokenizer
    from paddle_mm.errors import RecipeError

    if not model_cfg.text.tokenizer:
        raise RecipeError("model.text.tokenizer is empty: the align and clip stages need a WordPiece "
                          "vocab.txt (or a BERT folder holding one)")
    return TextTokenizer(model_cfg.text.tokenizer)


def build_align_model(stage: str, model_cfg, seed: int = 0):
    """The stage's model; it carries its text tokenizer as `.text_tokenizer`."""
    tok = text_tokenizer_for(model_cfg)
    if stage == "align":
        from paddle_mm.alignment.qformer import QFormerAligner

        model = QFormerAligner(model_cfg, tok.vocab_size, tok.pad_token_id, tok.dec_token_id, seed)
    else:
        from paddle_mm.alignment.clip import ClipModel

        model = ClipModel(model_cfg, tok.vocab_size, tok.pad_token_id)
    model.text_tokenizer = tok
    return model


def init_text_weights(model, model_cfg) -> None:
    """Start the Q-Former from a BERT-style folder when model.text.init_from names one."""
    if model_cfg.text.init_from:
        from paddle_mm.weights.bert import load_bert_into_qformer

        load_bert_into_qformer(model, model_cfg.text.init_from)


def build_dataset(model, samples, recipe):
    from paddle_mm.alignment.data import CaptionPairDataset
    from paddle_mm.builder import image_processor_for
    from paddle_mm.errors import RecipeError

    for spec in recipe.data.train:
        if spec.format != "caption":
            raise RecipeError(f"data.train: {spec.path} has format {spec.format!r}; the {recipe.train.stage} "
                              "stage trains on image-caption pairs (format: caption)")

    return CaptionPairDataset(samples, model.text_tokenizer, image_processor_for(recipe),
                              model.config.text.max_length, recipe.data.on_error)
