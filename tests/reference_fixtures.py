"""Reference fixtures written by tools/make_reference_fixtures.py (transformers, PyTorch)."""
from __future__ import annotations

import os
import shutil

import numpy as np

REFERENCE = os.path.join(os.path.dirname(__file__), "fixtures", "reference")


def folder_of(family: str) -> str:
    return os.path.normpath(os.path.join(REFERENCE, family))


def reference(family: str) -> dict:
    """{output name: array} that transformers computed for the family's checkpoint."""
    from safetensors.numpy import load_file

    return load_file(os.path.join(folder_of(family), "reference.safetensors"))


def checkpoint_copy(family: str, dst) -> str:
    """Copy the checkpoint files alone (no reference outputs) to the new folder dst."""
    src = folder_of(family)
    os.makedirs(dst)
    for name in os.listdir(src):
        if name != "reference.safetensors" and os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    return str(dst)


def snapshot(folder: str) -> dict:
    """Every file under folder with its size and mtime: to check nothing was written there."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), folder)] = (st.st_size, st.st_mtime_ns)
    return out


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def llava(folder: str):
    """A VisionLanguageModel with every weight of a LLaVA folder loaded (none left out), in eval mode."""
    from paddle_mm.model import VisionLanguageModel
    from paddle_mm.weights.llava import llava_model_config, load_llava

    model = VisionLanguageModel(llava_model_config(folder))
    assert load_llava(model, folder) == []
    model.eval()
    return model


def llava_outputs(model, ref: dict):
    """(image features, logits, 16 greedy tokens without stopping) of a LLaVA on a reference's inputs."""
    import paddle

    pixels, ids = paddle.to_tensor(ref["pixel_values"]), paddle.to_tensor(ref["input_ids"])
    with paddle.no_grad():
        features = model.image_features(pixels).numpy()
        _, logits = model(ids, pixel_values=pixels)
        greedy = model.generate(ids, pixel_values=pixels, max_new_tokens=16, eos_token_id=None)
    return features, logits.numpy(), greedy


def rewrite_tensors(folder: str, edit) -> None:
    """Read a folder's tensors, let edit(tensors) change the dict in place, write model.safetensors back."""
    from safetensors.numpy import save_file

    from paddle_mm.weights.hf import read_tensors

    tensors = read_tensors(folder)
    edit(tensors)
    save_file(tensors, os.path.join(folder, "model.safetensors"))


# ---- Qwen2-VL / Qwen2.5-VL (tools/make_qwen2_vl_fixtures.py) ---------------------------------------
QWEN2_VL_MEDIA = os.path.join(REFERENCE, "qwen2_vl", "images")
# (model, transformers tag) of every folder, and the M-RoPE rule of that transformers version
QWEN2_VL_FOLDERS = [("qwen2_vl", "hf457"), ("qwen2_vl", "hf5"), ("qwen2_5_vl", "hf457"), ("qwen2_5_vl", "hf5"),
                    ("qwen3_vl", "hf457"), ("qwen3_vl", "hf5")]  # Qwen3-VL: images only
MROPE_RULE = {"hf457": "max", "hf5": "extent"}


def qwen2_vl_folder(model: str, tag: str) -> str:
    return folder_of(f"qwen2_vl/{model}/{tag}")


def qwen2_vl_cases(model: str, tag: str) -> dict:
    """{case: {"images": [paths], "frames": [paths] or [], "question": text}} of a folder's reference.json."""
    import json

    with open(os.path.join(qwen2_vl_folder(model, tag), "reference.json"), encoding="utf-8") as f:
        meta = json.load(f)
    frames = [os.path.join(QWEN2_VL_MEDIA, f"frame{k}.png") for k in range(4)]
    return {case: {"images": [os.path.join(QWEN2_VL_MEDIA, n) for n in c["images"]],
                   "frames": frames if c["video"] else [], "question": c["question"]}
            for case, c in meta["cases"].items()}


def pixel_summary_error(pixels, ref: dict, prefix: str) -> float:
    """The largest difference between pixel rows and the fixture's summary of them (shape, per-row and
    per-column means, sampled values)."""
    pixels = np.asarray(pixels, dtype=np.float64)
    assert list(pixels.shape) == ref[f"{prefix}.shape"].tolist()
    rows, cols = pixels.shape
    return max(max_diff(pixels.sum(1) / cols, ref[f"{prefix}.row_sums"] / cols),
               max_diff(pixels.sum(0) / rows, ref[f"{prefix}.col_sums"] / rows),
               max_diff(pixels.reshape(-1)[ref[f"{prefix}.sample_index"]], ref[f"{prefix}.sample"]))
