"""Reading Qwen2-VL / Qwen2.5-VL folders: config.json of 4.57, 5.x and the released flat form, and
both tensor layouts."""
import json
import os
import shutil
from dataclasses import replace

import numpy as np
import paddle
import pytest
from reference_fixtures import max_diff, qwen2_vl_folder, rewrite_tensors

from paddle_mm.errors import CheckpointError
from paddle_mm.weights.hf import read_tensors
from paddle_mm.weights.qwen2_vl import layout_of, load_qwen2_vl, qwen2_vl_model_config


def _copy(model, tag, dst):
    shutil.copytree(qwen2_vl_folder(model, tag), dst)
    return str(dst)


def _state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model", ["qwen2_vl", "qwen2_5_vl"])
def test_4_57_and_5_configs_read_the_same(model):
    a = qwen2_vl_model_config(qwen2_vl_folder(model, "hf457"))
    b = qwen2_vl_model_config(qwen2_vl_folder(model, "hf5"))
    assert (a.vision, a.lm, a.image_token_id, a.video_token_id) == (b.vision, b.lm, b.image_token_id, b.video_token_id)
    assert a.lm.family == "qwen2_vl" and a.lm.mrope_section == [2, 3, 3] and a.lm.tie_word_embeddings
    assert a.vision.variant == model and a.vision.out_hidden_size == a.lm.hidden_size == 32
    if model == "qwen2_5_vl":
        assert (a.vision.window_size, a.vision.fullatt_block_indexes, a.vision.tokens_per_second) == (56, [1], 2.0)
    else:  # Qwen2-VL's embed_dim is the vision width, its hidden_size the merger's output
        assert (a.vision.hidden_size, a.vision.intermediate_size) == (16, 32)


def test_the_released_flat_config_reads_as_the_nested_one(tmp_path):
    """Qwen2-VL-7B-Instruct's config.json: the LM's fields at the top, rope_scaling type mrope."""
    folder = _copy("qwen2_vl", "hf457", tmp_path / "flat")
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        raw = json.load(f)
    text = raw.pop("text_config")
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    text.pop("model_type")
    with open(path, "w") as f:
        json.dump({**raw, **text}, f)
    nested = qwen2_vl_model_config(qwen2_vl_folder("qwen2_vl", "hf457"))
    assert replace(qwen2_vl_model_config(folder), path="") == replace(nested, path="")


def test_the_in_memory_layout_loads_the_same_weights(tmp_path):
    from paddle_mm.model import Qwen2VLModel

    src = qwen2_vl_folder("qwen2_5_vl", "hf5")
    folder = _copy("qwen2_5_vl", "hf5", tmp_path / "mem")
    def in_memory(tensors):  # visual.* -> model.visual.*, model.* -> model.language_model.*
        for name in list(tensors):
            if name.startswith("visual."):
                tensors["model." + name] = tensors.pop(name)
            elif name.startswith("model."):
                tensors["model.language_model." + name[len("model."):]] = tensors.pop(name)

    rewrite_tensors(folder, in_memory)
    assert layout_of(read_tensors(folder), folder) == "in-memory" and layout_of(read_tensors(src), src) == "saved"
    cfg = qwen2_vl_model_config(src)
    a, b = Qwen2VLModel(cfg), Qwen2VLModel(cfg)
    load_qwen2_vl(a, src)
    load_qwen2_vl(b, folder)
    sa, sb = _state(a), _state(b)
    assert max(max_diff(sa[k], sb[k]) for k in sa) == 0


def test_a_folder_without_vision_blocks_is_refused_with_the_prefixes(tmp_path):
    folder = _copy("qwen2_vl", "hf457", tmp_path / "novision")
    def rename(tensors):
        for name in [n for n in tensors if n.startswith("visual.blocks.")]:
            tensors[name.replace("visual.blocks.", "visual.layers.")] = tensors.pop(name)

    rewrite_tensors(folder, rename)
    with pytest.raises(CheckpointError, match=r"not a Qwen2-VL checkpoint \(no decoder and vision blocks under model\. and visual\."):
        layout_of(read_tensors(folder), folder)


def test_a_config_without_mrope_section_is_refused(tmp_path):
    folder = _copy("qwen2_vl", "hf5", tmp_path / "nomrope")
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        raw = json.load(f)
    raw["text_config"]["rope_parameters"].pop("mrope_section")
    with open(path, "w") as f:
        json.dump(raw, f)
    with pytest.raises(CheckpointError, match="config.json: no mrope_section"):
        qwen2_vl_model_config(folder)


def test_weights_load_in_bf16_exactly():
    """The fixtures are bf16 files: every value widens to the fp32 the references were computed with."""
    from paddle_mm.model import Qwen2VLModel

    folder = qwen2_vl_folder("qwen2_vl", "hf457")
    m = Qwen2VLModel(qwen2_vl_model_config(folder))
    load_qwen2_vl(m, folder)
    w = m.vision_tower.patch_embed.proj.weight.numpy()
    bits = w.view(np.uint32) & 0xFFFF
    assert w.dtype == np.float32 and not bits.any() and float(paddle.to_tensor(w).abs().sum()) > 0
