import json
from dataclasses import replace

import numpy as np
import paddle
import pytest
from reference_fixtures import checkpoint_copy, folder_of, max_diff, reference, rewrite_tensors, snapshot

from paddle_mm.config import VisionConfig
from paddle_mm.errors import CheckpointError
from paddle_mm.vision.vit import VisionTransformer
from paddle_mm.weights.clip import load_clip_vision, vision_config_from_folder


def clip_vit(folder: str, **selection) -> VisionTransformer:
    cfg = replace(vision_config_from_folder(folder), **selection)
    vit = VisionTransformer(cfg)
    assert load_clip_vision(vit, folder) == []
    vit.eval()
    return vit


def test_config_from_a_clip_model_folder():
    cfg = vision_config_from_folder(folder_of("clip"))
    assert (cfg.image_size, cfg.patch_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
            cfg.hidden_act) == (32, 8, 32, 64, 3, 4, "quick_gelu")
    # feature selection is the caller's, not the checkpoint's
    kept = vision_config_from_folder(folder_of("clip"), VisionConfig(feature_layer=-1, drop_cls_token=False))
    assert (kept.feature_layer, kept.drop_cls_token) == (-1, False)


def test_every_hidden_state_matches_transformers():
    ref = reference("clip")
    vit = clip_vit(folder_of("clip"), feature_layer=-1, drop_cls_token=False, post_norm=True)
    with paddle.no_grad():
        features, hidden = vit(paddle.to_tensor(ref["pixel_values"]), output_hidden_states=True)
    assert len(hidden) == 4
    for i, h in enumerate(hidden):
        assert max_diff(h.numpy(), ref[f"hidden_states.{i}"]) <= 1e-4, i
    assert max_diff(features.numpy(), ref["post_layernorm"]) <= 1e-4


def test_llava_selection_penultimate_layer_without_class_token():
    ref = reference("clip")
    vit = clip_vit(folder_of("clip"), feature_layer=-2, drop_cls_token=True, post_norm=False)
    with paddle.no_grad():
        features = vit(paddle.to_tensor(ref["pixel_values"])).numpy()
    assert features.shape == (2, 16, 32)
    assert max_diff(features, ref["hidden_states.2"][:, 1:]) <= 1e-4


def test_vision_tower_layout_and_clip_vision_config(tmp_path):
    """A tower saved out of a LLaVA model: vision_tower.vision_model.*, clip_vision_model config."""
    folder = checkpoint_copy("clip", tmp_path / "tower")
    raw = json.loads((tmp_path / "tower" / "config.json").read_text())
    (tmp_path / "tower" / "config.json").write_text(json.dumps({**raw["vision_config"], "model_type": "clip_vision_model"}))

    def tower_only(tensors):
        for name in list(tensors):
            array = tensors.pop(name)
            if name.startswith("vision_model."):
                tensors["vision_tower." + name] = array

    rewrite_tensors(folder, tower_only)
    ref = reference("clip")
    vit = clip_vit(folder, feature_layer=-1, drop_cls_token=False, post_norm=False)
    with paddle.no_grad():
        assert max_diff(vit(paddle.to_tensor(ref["pixel_values"])).numpy(), ref["hidden_states.3"]) <= 1e-4


def test_position_ids_buffer_is_ignored_by_name(tmp_path):
    folder = checkpoint_copy("clip", tmp_path / "old")
    rewrite_tensors(folder, lambda t: t.update({"vision_model.embeddings.position_ids": np.arange(17)[None]}))
    clip_vit(folder)


def test_unexpected_missing_and_misshaped_tensors_are_listed(tmp_path):
    folder = checkpoint_copy("clip", tmp_path / "extra")
    rewrite_tensors(folder, lambda t: t.update({"vision_model.encoder.layers.0.self_attn.rope.weight": np.zeros(2, np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected 1: vision_model.encoder.layers.0.self_attn.rope.weight"):
        clip_vit(folder)

    folder = checkpoint_copy("clip", tmp_path / "missing")
    rewrite_tensors(folder, lambda t: t.pop("vision_model.encoder.layers.1.mlp.fc2.bias"))
    cfg = vision_config_from_folder(folder)
    with pytest.raises(CheckpointError, match=r"missing 1: blocks\.1\.mlp\.fc2\.bias"):
        load_clip_vision(VisionTransformer(cfg), folder)
    vit = VisionTransformer(cfg)
    before = vit.blocks[1].mlp.fc2.bias.numpy().copy()
    assert load_clip_vision(vit, folder, strict=False) == ["blocks.1.mlp.fc2.bias"]
    np.testing.assert_array_equal(vit.blocks[1].mlp.fc2.bias.numpy(), before)  # left at its initial value

    folder = checkpoint_copy("clip", tmp_path / "shape")
    bigger = VisionTransformer(replace(vision_config_from_folder(folder), intermediate_size=96))
    with pytest.raises(CheckpointError) as info:
        load_clip_vision(bigger, folder)
    message = str(info.value)
    assert f"{folder}/model.safetensors: vision_model.encoder.layers.0.mlp.fc1.weight has shape [64, 32]" in message
    assert "the model needs [96, 32]" in message


def test_loading_writes_nothing_into_the_source_folder():
    before = snapshot(folder_of("clip"))
    clip_vit(folder_of("clip"))
    assert snapshot(folder_of("clip")) == before


def test_unknown_config_family_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model"}))
    with pytest.raises(CheckpointError, match="config.json: model_type 'siglip_vision_model' is not a CLIP"):
        vision_config_from_folder(str(tmp_path))
