import json
from dataclasses import replace

import numpy as np
import paddle
import pytest
from reference_fixtures import checkpoint_copy, folder_of, max_diff, reference, rewrite_tensors, snapshot

from paddle_mm import builder
from paddle_mm.config import Recipe, VisionConfig
from paddle_mm.data.tokenizer import Tokenizer
from paddle_mm.errors import CheckpointError
from paddle_mm.vision.vit import VisionTransformer
from paddle_mm.weights.hf import read_tensors
from paddle_mm.weights.siglip import load_siglip_vision, vision_config_from_folder

# Saved by transformers 4.57 (the tower under vision_model.) and 5.x (the tower at the top level).
TAGS = ("hf457", "hf5")


def siglip_vit(folder: str, **selection) -> VisionTransformer:
    vit = VisionTransformer(replace(vision_config_from_folder(folder), **selection))
    assert load_siglip_vision(vit, folder) == []
    vit.eval()
    return vit


def run(vit, ref, **kwargs):
    with paddle.no_grad():
        return vit(paddle.to_tensor(ref["pixel_values"]), **kwargs)


@pytest.mark.parametrize("family", ["siglip", "siglip_model"])
@pytest.mark.parametrize("tag", TAGS)
def test_config_of_each_folder(family, tag):
    cfg = vision_config_from_folder(folder_of(f"{family}/{tag}"))
    assert (cfg.image_size, cfg.patch_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
            cfg.layer_norm_eps) == (32, 8, 32, 64, 2, 4, 1e-6)
    assert (cfg.hidden_act, cfg.class_token, cfg.pre_norm, cfg.patch_bias) == ("gelu_tanh", False, False, True)
    kept = vision_config_from_folder(folder_of(f"{family}/{tag}"), VisionConfig(feature_layer=-1, drop_cls_token=False))
    assert (kept.feature_layer, kept.drop_cls_token) == (-1, False)  # feature selection is the caller's


@pytest.mark.parametrize("tag", TAGS)
def test_every_hidden_state_and_the_post_norm_match_transformers(tag):
    ref = reference(f"siglip/{tag}")
    vit = siglip_vit(folder_of(f"siglip/{tag}"), feature_layer=-1, drop_cls_token=False, post_norm=True)
    features, hidden = run(vit, ref, output_hidden_states=True)
    assert len(hidden) == 3 and features.shape == [2, 16, 32]
    for i, h in enumerate(hidden):
        assert max_diff(h.numpy(), ref[f"hidden_states.{i}"]) <= 1e-4, i
    assert max_diff(features.numpy(), ref["post_layernorm"]) <= 1e-4


@pytest.mark.parametrize("tag", TAGS)
def test_a_siglip_model_folder_gives_its_towers_numbers(tag):
    """A whole SiglipModel: the text tower, logit scale and bias and the pooling head are skipped by name."""
    ref = reference(f"siglip/{tag}")  # siglip_model/TAG holds the same vision weights
    names = read_tensors(folder_of(f"siglip_model/{tag}"))
    assert "logit_bias" in names and "text_model.head.weight" in names and "vision_model.head.probe" in names
    vit = siglip_vit(folder_of(f"siglip_model/{tag}"), feature_layer=-1, drop_cls_token=False, post_norm=True)
    assert max_diff(run(vit, ref).numpy(), ref["post_layernorm"]) <= 1e-4


def test_llava_default_selection_drops_the_first_patch():
    ref = reference("siglip/hf5")
    vit = siglip_vit(folder_of("siglip/hf5"), feature_layer=-2, drop_cls_token=True)
    features = run(vit, ref).numpy()
    assert features.shape == (2, 15, 32)
    assert max_diff(features, ref["hidden_states.1"][:, 1:]) <= 1e-4


def test_other_image_sizes_interpolate_the_position_table():
    ref = reference("siglip/hf5")
    vit = siglip_vit(folder_of("siglip/hf5"), feature_layer=-1, drop_cls_token=False)
    bigger = np.repeat(np.repeat(ref["pixel_values"], 2, axis=2), 2, axis=3)[:, :, :48, :40]
    with paddle.no_grad():
        assert vit(paddle.to_tensor(bigger)).shape == [2, 6 * 5, 32]


def test_recipe_vision_path_names_a_siglip_folder():
    recipe = Recipe()
    recipe.model.vision.path = folder_of("siglip/hf5")
    recipe.model.vision.feature_layer, recipe.model.vision.drop_cls_token = -1, False
    for key, value in dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=4,
                           vocab_size=320).items():
        setattr(recipe.model.lm, key, value)
    tokenizer = Tokenizer.word_level(["a", "cat"])
    cfg = builder.model_config_for(recipe, tokenizer)
    assert (cfg.vision.class_token, cfg.vision.hidden_act, cfg.vision.num_layers) == (False, "gelu_tanh", 2)
    assert cfg.tokens_per_image == 16 and cfg.vision.path == folder_of("siglip/hf5")
    model = builder.build_model(cfg, tokenizer)
    model.eval()
    ref = reference("siglip/hf5")
    assert max_diff(run(model.vision_tower, ref).numpy(), ref["hidden_states.2"]) <= 1e-4


def test_unknown_and_misshaped_tensors_are_named(tmp_path):
    folder = checkpoint_copy("siglip/hf457", tmp_path / "extra")
    rewrite_tensors(folder, lambda t: t.update({"vision_model.head.extra": np.zeros(2, np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected 1: vision_model.head.extra"):
        siglip_vit(folder)
    folder = checkpoint_copy("siglip/hf5", tmp_path / "missing")
    rewrite_tensors(folder, lambda t: t.pop("embeddings.patch_embedding.bias"))
    with pytest.raises(CheckpointError, match=r"missing 1: patch_embedding\.bias \(embeddings\.patch_embedding\.bias\)"):
        siglip_vit(folder)
    folder = checkpoint_copy("siglip/hf5", tmp_path / "clip-sized")
    clip_like = VisionTransformer(replace(vision_config_from_folder(folder), class_token=True))
    with pytest.raises(CheckpointError) as info:
        load_siglip_vision(clip_like, folder)
    assert "embeddings.position_embedding.weight has shape [16, 32], the model needs [17, 32]" in str(info.value)
    assert "missing 1: class_embedding" in str(info.value)


def test_configs_it_cannot_build_are_refused(tmp_path):
    def config(**fields):
        raw = {"model_type": "siglip_vision_model", **fields}
        (tmp_path / "config.json").write_text(json.dumps(raw))
        return vision_config_from_folder(str(tmp_path))

    assert config(image_size=[32, 32], patch_size=[8, 8]).image_size == 32  # 5.x may write [height, width]
    assert config().patch_size == 16 and config().hidden_act == "gelu_tanh"  # SiglipVisionConfig's defaults
    with pytest.raises(CheckpointError, match=r"vision image_size \[32, 48\]: only square sizes"):
        config(image_size=[32, 48])
    with pytest.raises(CheckpointError, match="vision hidden_act 'relu' is not one of"):
        config(hidden_act="relu")
    with pytest.raises(CheckpointError, match="model_type 'clip_vision_model' is not a SigLIP vision model"):
        config(model_type="clip_vision_model")


def test_loading_writes_nothing_into_the_source_folder():
    before = snapshot(folder_of("siglip/hf457"))
    siglip_vit(folder_of("siglip/hf457"))
    assert snapshot(folder_of("siglip/hf457")) == before


def test_a_siglip_vision_path_that_would_drop_a_real_patch_is_refused():
    from paddle_mm.config import ModelConfig
    from paddle_mm.errors import RecipeError
    from paddle_mm.weights.pretrained import resolved_model_config

    folder = folder_of("siglip/hf5")
    with pytest.raises(RecipeError, match="drop_cls_token"):
        resolved_model_config(ModelConfig(vision=VisionConfig(path=folder)))
    kept = resolved_model_config(ModelConfig(vision=VisionConfig(path=folder, drop_cls_token=False)))
    assert not kept.vision.class_token and kept.tokens_per_image == 16
