"""Every recipe under recipes/ loads and validates; the LLaVA-1.5-7B ones say what LLaVA-1.5 does."""
import glob
import os

import pytest
from reference_fixtures import folder_of

from paddle_mm import builder
from paddle_mm.config import Recipe
from paddle_mm.data.tokenizer import Tokenizer
from paddle_mm.recipe import load_recipe

ROOT = os.path.join(os.path.dirname(__file__), "..", "recipes")
RECIPES = sorted(glob.glob(os.path.join(ROOT, "**", "*.yaml"), recursive=True))
LLAVA = os.path.join(ROOT, "llava-1.5-7b")


def test_recipes_are_found():
    assert {os.path.relpath(p, ROOT) for p in RECIPES} >= {
        "demo/pretrain.yaml", "llava-1.5-7b/pretrain.yaml", "llava-1.5-7b/instruct.yaml",
        "llava-1.5-7b/instruct_lora.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, ROOT))
def test_recipe_loads_and_validates(path):
    recipe = load_recipe(path, Recipe)  # unknown keys, wrong types and cross-field rules raise
    fixed = builder.fixed_image_tokens(recipe.model)
    assert fixed is None if recipe.model.family == "qwen2_vl" else fixed > 0  # qwen2_vl: each image its own


def test_llava_15_7b_stages():
    pre, full, lora = (load_recipe(os.path.join(LLAVA, f"{n}.yaml"), Recipe) for n in ("pretrain", "instruct", "instruct_lora"))
    for r in (pre, full, lora):
        assert r.model.vision.path and r.model.lm.path and r.model.lm.family == "llama"
        assert r.model.tokens_per_image == 576  # (336 / 14)^2 patches, class token dropped
        assert (r.model.vision.feature_layer, r.model.projector.type) == (-2, "mlp2x_gelu")
    assert pre.train.trainable == ["multi_modal_projector"] and pre.train.batch_size * pre.train.grad_accum == 256
    assert full.train.projector_from == os.path.join(pre.train.output_dir, "projector.safetensors")
    assert full.train.trainable == ["multi_modal_projector", "language_model"]
    assert full.train.batch_size * full.train.grad_accum == 128
    assert lora.train.lora.enabled and "language_model" not in lora.train.trainable
    assert len({pre.train.output_dir, full.train.output_dir, lora.train.output_dir}) == 3


def test_llava_recipe_paths_resolve_through_the_weight_tables():
    """The same recipe pointed at tiny local folders: configs from config.json, weights loaded."""
    recipe = load_recipe(os.path.join(LLAVA, "pretrain.yaml"), Recipe,
                         [f"model.vision.path={folder_of('clip')}", f"model.lm.path={folder_of('llama')}"])
    tokenizer = Tokenizer.word_level(["a", "cat"])  # the tiny LM folder has no tokenizer of its own
    cfg = builder.model_config_for(recipe, tokenizer)
    assert (cfg.vision.hidden_size, cfg.vision.num_layers, cfg.vision.image_size) == (32, 3, 32)
    assert (cfg.lm.hidden_size, cfg.lm.num_layers, cfg.lm.vocab_size) == (32, 2, 256)
    assert cfg.vision.feature_layer == -2 and cfg.tokens_per_image == 16  # selection stays the recipe's
    model = builder.build_model(cfg, tokenizer)
    from paddle_mm.weights.hf import read_tensors

    clip = read_tensors(folder_of("clip"))
    assert (model.vision_tower.blocks[0].attn.q_proj.weight.numpy() ==
            clip["vision_model.encoder.layers.0.self_attn.q_proj.weight"].T).all()
