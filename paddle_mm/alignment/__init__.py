"""Modality alignment before a language model reads the images (the `align` and `clip` stages).

`align` is BLIP-2's first stage (a Q-Former trained with ITC, ITM and ITG on image-caption
pairs); `clip` trains an image tower and a text tower contrastively. Both run in the one
training loop (paddle_mm/train.py), which asks this package for the model and the dataset.
"""
from __future__ import annotations

import os
import shutil

ALIGN_STAGES = ("align", "clip")


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


def save_text_tokenizer(model, run_dir: str) -> None:
    """Copy the WordPiece vocabulary into the run folder, so the run is self-contained."""
    from paddle_mm.alignment.text import VOCAB_FILE

    dst = os.path.join(run_dir, VOCAB_FILE)
    if os.path.abspath(model.text_tokenizer.vocab_file) != os.path.abspath(dst):
        tmp = f"{dst}.tmp-{os.getpid()}"
        shutil.copyfile(model.text_tokenizer.vocab_file, tmp)
        os.replace(tmp, dst)


def load_align_run(run_dir: str):
    """(recipe, model) of a finished align or clip run, weights loaded, in eval mode."""
    import json
    from dataclasses import replace

    from paddle_mm.builder import MODEL_FILE, RECIPE_FILE
    from paddle_mm.checkpoint import load_into, load_tensors
    from paddle_mm.config import ModelConfig, Recipe
    from paddle_mm.errors import CheckpointError
    from paddle_mm.recipe import from_dict, load_recipe

    for name in (RECIPE_FILE, "config.json", MODEL_FILE, "vocab.txt"):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise CheckpointError(f"{run_dir}: not an align/clip run folder ({name} is missing)")
    recipe = load_recipe(os.path.join(run_dir, RECIPE_FILE), Recipe)
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        cfg = from_dict(ModelConfig, json.load(f), source=os.path.join(run_dir, "config.json"))
    cfg = replace(cfg, text=replace(cfg.text, tokenizer=run_dir, init_from=""))
    model = build_align_model(recipe.train.stage, cfg)
    weights = os.path.join(run_dir, MODEL_FILE)
    load_into(model, load_tensors(weights), weights)
    model.eval()
    return recipe, model
