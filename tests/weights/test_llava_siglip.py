"""A LlavaForConditionalGeneration whose vision tower is SigLIP's (LLaVA-OneVision-style configs),
saved by transformers 4.57 (vision_tower.vision_model.*) and 5.x (vision_tower.*)."""
import json
import os
from dataclasses import replace

import numpy as np
import paddle
import pytest
from reference_fixtures import checkpoint_copy, folder_of, llava, llava_outputs, max_diff, reference, snapshot
from safetensors.numpy import save_file

from paddle_mm import builder
from paddle_mm.config import Recipe
from paddle_mm.errors import CheckpointError
from paddle_mm.run_folder import load_run
from paddle_mm.weights.convert import CONVERSION_FILE, convert, export
from paddle_mm.weights.hf import read_tensors
from paddle_mm.weights.llava import layout_of, llava_model_config

TAGS = ("hf457", "hf5")


def edit_config(folder: str, edit) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        raw = json.load(f)
    edit(raw)
    with open(path, "w") as f:
        json.dump(raw, f)


@pytest.mark.parametrize("tag", TAGS)
def test_config_reads_the_siglip_tower_and_the_full_selection(tag):
    cfg = llava_model_config(folder_of(f"llava_siglip/{tag}"))
    v = cfg.vision
    assert (v.class_token, v.pre_norm, v.patch_bias, v.hidden_act) == (False, False, True, "gelu_tanh")
    assert (v.feature_layer, v.drop_cls_token, v.post_norm) == (-1, False, False)
    assert (v.num_layers, v.image_size, v.patch_size, v.hidden_size) == (2, 16, 4, 32)
    assert (cfg.lm.family, cfg.lm.vocab_size, cfg.lm.hidden_size, cfg.lm.tie_word_embeddings) == ("qwen2", 320, 16, False)
    assert cfg.image_token_id == 3 and cfg.tokens_per_image == 16  # every patch: no class token to drop


@pytest.mark.parametrize("tag,layout", [("hf457", "legacy"), ("hf5", "transformers-5")])
def test_logits_and_greedy_tokens_match_transformers(tag, layout):
    folder = folder_of(f"llava_siglip/{tag}")
    ref = reference(f"llava_siglip/{tag}")
    before = snapshot(folder)
    assert layout_of(read_tensors(folder), folder) == layout
    features, logits, greedy = llava_outputs(llava(folder), ref)
    assert max_diff(features, ref["image_features"]) <= 1e-4
    assert max_diff(logits, ref["logits"]) <= 1e-4
    assert greedy == ref["greedy"].tolist()
    assert snapshot(folder) == before


@pytest.mark.parametrize("tag", TAGS)
def test_default_strategy_drops_the_first_patch_as_transformers_does(tag, tmp_path):
    ref = reference(f"llava_siglip/{tag}")
    folder = checkpoint_copy(f"llava_siglip/{tag}", tmp_path / "default")
    edit_config(folder, lambda raw: raw.update(vision_feature_layer=-2, vision_feature_select_strategy="default"))
    model = llava(folder)
    assert model.tokens_per_image == 15
    with paddle.no_grad():
        features = model.image_features(paddle.to_tensor(ref["pixel_values"])).numpy()
    assert max_diff(features, ref["image_features_default_m2"]) <= 1e-4


def test_the_pooling_head_of_the_tower_is_ignored_by_name(tmp_path):
    """vision_use_head true (transformers' default): the LLaVA holds the MAP head it never runs."""
    folder = checkpoint_copy("llava_siglip/hf457", tmp_path / "head")
    tensors = read_tensors(folder)
    tensors["vision_tower.vision_model.head.probe"] = np.zeros((1, 1, 32), np.float32)
    tensors["vision_tower.vision_model.head.attention.in_proj_weight"] = np.zeros((96, 32), np.float32)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    ref = reference("llava_siglip/hf457")
    assert max_diff(llava_outputs(llava(folder), ref)[1], ref["logits"]) <= 1e-4


def test_recipe_model_path_builds_the_checkpoint_with_its_tokenizer():
    recipe = Recipe()
    recipe.model.path = folder_of("llava_siglip/hf5")
    tokenizer = builder.load_tokenizer(recipe)
    cfg = builder.model_config_for(recipe, tokenizer)
    assert cfg.image_token_id == tokenizer.image_token_id == 3 and not cfg.vision.class_token
    model = builder.build_model(cfg, tokenizer)
    model.eval()
    ref = reference("llava_siglip/hf5")
    assert max_diff(llava_outputs(model, ref)[1], ref["logits"]) <= 1e-4


@pytest.mark.parametrize("tag", TAGS)
def test_converted_folder_is_a_run_folder_with_the_reference_numbers(tag, tmp_path):
    folder = convert(folder_of(f"llava_siglip/{tag}"), str(tmp_path / "pm"), "llava")
    _, cfg, _, model = load_run(folder)
    assert not cfg.vision.class_token
    ref = reference(f"llava_siglip/{tag}")
    with paddle.no_grad():
        _, logits = model(paddle.to_tensor(ref["input_ids"]), pixel_values=paddle.to_tensor(ref["pixel_values"]))
    assert max_diff(logits.numpy(), ref["logits"]) <= 1e-4


def test_export_of_a_run_trained_here_writes_a_siglip_tower_config_that_reads_back(tmp_path):
    src = folder_of("llava_siglip/hf457")
    converted = convert(src, str(tmp_path / "pm"), "llava")
    os.remove(os.path.join(converted, CONVERSION_FILE))  # as a run folder written by training
    out = export(converted, str(tmp_path / "hf"))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vision_config"]["model_type"] == "siglip_vision_model"
    assert llava_model_config(out) == replace(llava_model_config(src), path=out)
    ours, theirs = read_tensors(out), read_tensors(src)
    assert sorted(ours) == sorted(theirs)  # the legacy names, as 4.57 saves them
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_a_vision_tower_without_a_table_is_refused(tmp_path):
    folder = checkpoint_copy("llava_siglip/hf5", tmp_path / "other")
    edit_config(folder, lambda raw: raw["vision_config"].update(model_type="dinov2"))
    with pytest.raises(CheckpointError, match="config.json: vision tower 'dinov2' is not one of"):
        llava_model_config(folder)


def test_towers_llava_cannot_express_are_not_exported(tmp_path):
    from paddle_mm.weights.llava import hf_llava_config

    cfg = llava_model_config(folder_of("llava_siglip/hf5"))
    with pytest.raises(CheckpointError, match=r"SigLIP vision tower: vision.pre_norm \(SigLIP has none\)"):
        hf_llava_config(replace(cfg, vision=replace(cfg.vision, pre_norm=True)), "run")
    clip_like = replace(cfg.vision, class_token=True, pre_norm=True)
    with pytest.raises(CheckpointError, match="LLaVA: vision.patch_bias .*; vision hidden_act gelu_tanh"):
        hf_llava_config(replace(cfg, vision=clip_like), "run")
