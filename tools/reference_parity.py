"""Print, per family, the largest difference between paddle_mm and the stored reference outputs.

    python tools/reference_parity.py
Reference: tests/fixtures/reference/<family>/reference.safetensors (transformers, PyTorch).
Second opinion for the LMs: PaddleFormers' own from_pretrained on a copy of the same folder.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile
from dataclasses import replace

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "reference")


def diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def main() -> None:
    import paddle
    from safetensors.numpy import load_file

    from paddle_mm.config import LMConfig
    from paddle_mm.lm.adapter import _classes, run_language_model
    from paddle_mm.lm.decoding import decode
    from paddle_mm.model import VisionLanguageModel
    from paddle_mm.vision.vit import VisionTransformer
    from paddle_mm.weights.clip import load_clip_vision, vision_config_from_folder
    from paddle_mm.weights.llava import llava_model_config, load_llava
    from paddle_mm.weights.llm import load_language_model

    rows = []
    folder = os.path.join(FIXTURES, "clip")
    ref = load_file(os.path.join(folder, "reference.safetensors"))
    vit = VisionTransformer(replace(vision_config_from_folder(folder), feature_layer=-1, drop_cls_token=False,
                                    post_norm=True))
    load_clip_vision(vit, folder)
    vit.eval()
    with paddle.no_grad():
        features, hidden = vit(paddle.to_tensor(ref["pixel_values"]), output_hidden_states=True)
    worst = max(diff(h.numpy(), ref[f"hidden_states.{i}"]) for i, h in enumerate(hidden))
    rows.append(("clip", "hidden states / post-LN", max(worst, diff(features.numpy(), ref["post_layernorm"])), "-", "-"))

    for family, name in (("qwen2", "qwen2"), ("qwen2", "qwen2/bf16"), ("llama", "llama")):
        folder = os.path.join(FIXTURES, name)
        ref = load_file(os.path.join(folder, "reference.safetensors"))
        copy = tempfile.mkdtemp()
        for f in os.listdir(folder):
            if f != "reference.safetensors" and os.path.isfile(os.path.join(folder, f)):
                shutil.copy(os.path.join(folder, f), copy)
        ids = paddle.to_tensor(ref["input_ids"])
        out = {}
        for who, lm in (("ours", load_language_model(LMConfig(family=family, path=folder))),
                        ("pf", _classes(family)[1].from_pretrained(copy, dtype="float32"))):
            lm.eval()
            with paddle.no_grad():
                emb = lm.get_input_embeddings()(ids)
                out[who] = (run_language_model(lm, emb)[0].numpy(),
                            decode(lm, emb, paddle.ones(ids.shape, dtype="int64"), 16, None))
        shutil.rmtree(copy)
        rows.append((name, "logits", diff(out["ours"][0], ref["logits"]), diff(out["ours"][0], out["pf"][0]),
                     out["ours"][1] == ref["greedy"].tolist()))

    folder = os.path.join(FIXTURES, "llava")
    ref = load_file(os.path.join(folder, "reference.safetensors"))
    model = VisionLanguageModel(llava_model_config(folder))
    load_llava(model, folder)
    model.eval()
    pixels, ids = paddle.to_tensor(ref["pixel_values"]), paddle.to_tensor(ref["input_ids"])
    with paddle.no_grad():
        feats = model.image_features(pixels).numpy()
        logits = model(ids, pixel_values=pixels)[1].numpy()
        greedy = model.generate(ids, pixel_values=pixels, max_new_tokens=16, eos_token_id=None)
    rows.append(("llava", "image features", diff(feats, ref["image_features"]), "-", "-"))
    rows.append(("llava", "logits", diff(logits, ref["logits"]), "-", greedy == ref["greedy"].tolist()))

    # BLIP-2: the outputs and the PaddleMIX folder the tests build (tests/weights/test_blip2.py)
    sys.path.insert(0, os.path.join(ROOT, "tests", "weights"))
    from test_blip2 import outputs, paddlemix_folder

    from paddle_mm.weights.blip2 import load_blip2

    ref = load_file(os.path.join(FIXTURES, "blip2", "reference.safetensors"))
    scratch = tempfile.mkdtemp()
    for name, model in (("blip2/hf", load_blip2(os.path.join(FIXTURES, "blip2", "hf"))),
                        ("blip2/hf_bf16", load_blip2(os.path.join(FIXTURES, "blip2", "hf_bf16"))),
                        ("blip2/paddlemix", load_blip2(paddlemix_folder(pathlib.Path(scratch)),
                                                       layout="paddlemix", image_token_id=95))):
        out = outputs(model, ref)
        for what in ("vision_features", "qformer_output", "projected"):
            rows.append((name, what, diff(out[what], ref[what]), "-", "-"))
        rows.append((name, "logits", diff(out["logits"], ref["logits"]), "-",
                     out["greedy_tokens"].tolist() == ref["greedy_tokens"].tolist()))
    shutil.rmtree(scratch)

    print(f"{'fixture':16} {'output':24} {'max |d| vs transformers':>24} {'vs PaddleFormers':>17} {'16 greedy same':>15}")
    for name, what, d_ref, d_pf, same in rows:
        d_pf = d_pf if isinstance(d_pf, str) else f"{d_pf:.2e}"
        print(f"{name:16} {what:24} {d_ref:>24.2e} {d_pf:>17} {str(same):>15}")


if __name__ == "__main__":
    main()
