"""The Q-Former started from a BERT folder matches BERT's own numbers (transformers 4.57 reference)."""
import os
import shutil

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file

from paddle_mm.errors import CheckpointError

BERT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "reference", "bert")
RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "blip2")


def aligner(bert=BERT, **qformer):
    from paddle_mm.alignment import stages as alignment
    from paddle_mm.config import ModelConfig, ProjectorConfig, QFormerConfig, TextConfig, VisionConfig

    sizes = dict(num_queries=4, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    sizes.update(qformer)
    cfg = ModelConfig(
        vision=VisionConfig(image_size=16, patch_size=8, hidden_size=8, intermediate_size=16, num_layers=1,
                            num_heads=2, hidden_act="gelu"),
        projector=ProjectorConfig(type="qformer", qformer=QFormerConfig(**sizes)),
        text=TextConfig(tokenizer=bert, init_from=bert, max_position_embeddings=32, embed_dim=8),
        image_token_id=1)
    paddle.seed(0)
    model = alignment.build_align_model("align", cfg)
    model.eval()
    return model


def test_text_pass_and_mlm_head_match_bert():
    from paddle_mm.weights.bert import load_bert_into_qformer

    model = aligner()
    cross_before = model.multi_modal_projector.layers[0].cross_attn.q_proj.weight.numpy().copy()
    dec_row = model.text_tower.word_embeddings.weight.numpy()[model.text_tokenizer.dec_token_id].copy()
    load_bert_into_qformer(model, BERT)
    ref = load_file(os.path.join(BERT, "reference.safetensors"))
    ids = paddle.to_tensor(ref["input_ids"])
    assert model.text_tokenizer.encode("is there a green triangle", 32) == \
        [int(i) for i, m in zip(ref["input_ids"][1], ref["attention_mask"][1]) if m]
    _, text = model._joint(None, ids, ref["attention_mask"].astype(bool), "itc", with_queries=False)
    valid = ref["attention_mask"].astype(bool)
    np.testing.assert_allclose(text.numpy()[valid], ref["last_hidden_state"][valid], rtol=1e-4, atol=1e-5)
    base = model.text_tokenizer.base_vocab_size  # [DEC] is ours, appended after BERT's words
    logits = model.lm_logits(text).numpy()[..., :base]
    np.testing.assert_allclose(logits[valid], ref["mlm_logits"][valid], rtol=1e-4, atol=1e-4)
    # The query FFN starts as a copy of the text FFN; cross-attention and [DEC] keep their fresh values.
    q, t = model.multi_modal_projector.layers[1], model.text_tower.layers[1]
    np.testing.assert_array_equal(q.mlp.fc1.weight.numpy(), t.mlp.fc1.weight.numpy())
    np.testing.assert_array_equal(q.mlp_norm.bias.numpy(), t.mlp_norm.bias.numpy())
    np.testing.assert_array_equal(model.multi_modal_projector.layers[0].cross_attn.q_proj.weight.numpy(), cross_before)
    np.testing.assert_array_equal(model.text_tower.word_embeddings.weight.numpy()[-1], dec_row)
    assert model.text_tokenizer.vocab_size == base + 1


def test_bert_loads_through_the_align_stage(tmp_path):
    from paddle_mm.alignment.stages import init_text_weights

    model = aligner()
    init_text_weights(model, model.config)
    bert = load_file(os.path.join(BERT, "model.safetensors"))
    np.testing.assert_array_equal(model.multi_modal_projector.layers[0].attn.k_proj.weight.numpy(),
                                  bert["bert.encoder.layer.0.attention.self.key.weight"].T)


def test_old_layernorm_names_and_unprefixed_names(tmp_path):
    from safetensors.numpy import save_file

    from paddle_mm.weights.bert import load_bert_into_qformer

    folder = tmp_path / "bert_old"
    shutil.copytree(BERT, folder)
    tensors = load_file(os.path.join(BERT, "model.safetensors"))
    renamed = {k.replace("bert.", "").replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in tensors.items() if not k.startswith("cls.")}
    save_file(renamed, str(folder / "model.safetensors"))
    a, b = aligner(), aligner()
    load_bert_into_qformer(a, BERT)
    load_bert_into_qformer(b, str(folder))
    np.testing.assert_array_equal(a.multi_modal_projector.query_norm.weight.numpy(),
                                  b.multi_modal_projector.query_norm.weight.numpy())
    np.testing.assert_array_equal(a.text_tower.layers[1].mlp_norm.weight.numpy(), b.text_tower.layers[1].mlp_norm.weight.numpy())


def test_mismatches_are_named(tmp_path):
    from safetensors.numpy import save_file

    from paddle_mm.weights.bert import load_bert_into_qformer

    with pytest.raises(CheckpointError, match="num_hidden_layers 2 vs 3"):
        load_bert_into_qformer(aligner(num_layers=3), BERT)
    folder = tmp_path / "bert_extra"
    shutil.copytree(BERT, folder)
    tensors = load_file(os.path.join(BERT, "model.safetensors"))
    tensors["bert.encoder.layer.0.attention.self.rotary.weight"] = np.zeros(2, "float32")
    del tensors["bert.encoder.layer.1.output.dense.bias"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1: encoder.layer.1.output.dense.bias.*unexpected 1: "
                                              "encoder.layer.0.attention.self.rotary.weight"):
        load_bert_into_qformer(aligner(), str(folder))


def test_blip2_align_recipe_is_bert_base_sized():
    """The real BLIP-2 stage-1 recipe: local paths, and a Q-Former the size of bert-base-uncased."""
    from paddle_mm.config import Recipe
    from paddle_mm.recipe import load_recipe

    recipe = load_recipe(os.path.join(RECIPES, "align.yaml"), Recipe)
    q, text = recipe.model.projector.qformer, recipe.model.text
    # bert-base-uncased's config.json
    assert (q.hidden_size, q.num_layers, q.num_heads, q.intermediate_size) == (768, 12, 12, 3072)
    assert text.max_position_embeddings == 512 and q.layer_norm_eps == 1e-12
    assert recipe.train.stage == "align" and "vision_tower" not in recipe.train.trainable
    assert set(recipe.train.trainable) == {"multi_modal_projector", "text_tower", "align_heads"}
    local = [text.tokenizer, text.init_from, recipe.train.vision_from] + [s.path for s in recipe.data.train]
    assert all(p and not os.path.isabs(p) and "://" not in p for p in local)
    assert all(s.format == "caption" for s in recipe.data.train)
