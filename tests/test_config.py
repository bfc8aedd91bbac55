"""Cross-field rules of the typed config, as a recipe author meets them."""
from __future__ import annotations

import pytest

from paddle_mm.config import ModelConfig, ProjectorConfig, QFormerConfig, Recipe, VisionConfig
from paddle_mm.errors import RecipeError
from paddle_mm.recipe import from_dict


def test_tokens_per_image_follows_patches_pooling_and_queries():
    cfg = ModelConfig(vision=VisionConfig(image_size=224, patch_size=14))
    assert cfg.vision.num_patches == 256 and cfg.tokens_per_image == 256
    assert ModelConfig(vision=VisionConfig(image_size=224, patch_size=14),
                       projector=ProjectorConfig(pool=2)).tokens_per_image == 64
    assert ModelConfig(projector=ProjectorConfig(type="qformer", qformer=QFormerConfig(num_queries=32))
                       ).tokens_per_image == 32


@pytest.mark.parametrize("section, message", [
    ({"model": {"vision": {"image_size": 50, "patch_size": 16}}}, "not a multiple of patch_size"),
    ({"model": {"vision": {"hidden_size": 100, "num_heads": 3}}}, "not divisible by num_heads"),
    ({"model": {"vision": {"num_layers": 2, "feature_layer": 5}}}, "feature_layer 5"),
    ({"model": {"projector": {"type": "mlp_gelu"}}}, "mlp<N>x_gelu"),
    ({"model": {"projector": {"pool": 3}, "vision": {"image_size": 32, "patch_size": 8}}}, "does not divide"),
    ({"model": {"projector": {"type": "qformer", "qformer": {"cross_attention_locality": -1.0}}}},
     "cross_attention_locality must be >= 0, got -1.0"),
    ({"model": {"projector": {"type": "qformer", "qformer": {"num_queries": 32, "cross_attention_locality": 2.0}}}},
     "num_queries must be a square number, got 32"),
])
def test_bad_model_settings_are_named(section, message):
    with pytest.raises(RecipeError, match=message):
        from_dict(Recipe, section, source="r.yaml")


def test_mlp_depth_parsed_from_the_type_name():
    assert ProjectorConfig(type="mlp3x_gelu").mlp_depth == 3
    assert ProjectorConfig(type="linear").mlp_depth == 1
