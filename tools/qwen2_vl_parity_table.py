"""The parity table of the Qwen2-VL, Qwen2.5-VL and Qwen3-VL (images only) folders transformers 4.57 and 5.x wrote
(tools/make_qwen2_vl_fixtures.py): for each case, prompt ids, pixels, vision features, M-RoPE
positions, logits and 16 greedy tokens against transformers', as Markdown.

    python tools/qwen2_vl_parity_table.py

tests/data/test_qwen2_vl.py, tests/vision/test_qwen2_vl.py and tests/test_qwen2_vl.py assert the same
comparisons against their limits (pixels 1e-5, features and logits 1e-4, tokens identical).
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "reference", "qwen2_vl")
FOLDERS = [("qwen2_vl", "hf457"), ("qwen2_vl", "hf5"), ("qwen2_5_vl", "hf457"), ("qwen2_5_vl", "hf5"),
           ("qwen3_vl", "hf457"), ("qwen3_vl", "hf5")]
MROPE_RULE = {"hf457": "max", "hf5": "extent"}  # transformers 4.57's and 5.x's (data/qwen2_vl.RopeTokens)


def _pixel_error(pixels, ref: dict, prefix: str) -> float:
    """Against the fixture's summary: per-row and per-column means and 256 sampled values."""
    pixels = np.asarray(pixels, np.float64)
    rows, cols = pixels.shape
    return max(float(np.abs(pixels.sum(1) / cols - ref[f"{prefix}.row_sums"] / cols).max()),
               float(np.abs(pixels.sum(0) / rows - ref[f"{prefix}.col_sums"] / rows).max()),
               float(np.abs(pixels.reshape(-1)[ref[f"{prefix}.sample_index"]] - ref[f"{prefix}.sample"]).max()))


def _rows(model_name: str, tag: str) -> list[tuple]:
    import paddle

    from paddle_mm.data.qwen2_vl import Qwen2VLProcessor, encode_conversation, settings_from_folder
    from paddle_mm.data.tokenizer import IMAGE_TOKEN, Tokenizer
    from paddle_mm.model import Qwen2VLModel
    from paddle_mm.weights.qwen2_vl import load_qwen2_vl, qwen2_vl_model_config

    folder = os.path.join(ROOT, model_name, tag)
    ref = load_file(os.path.join(folder, "reference.safetensors"))
    with open(os.path.join(folder, "reference.json"), encoding="utf-8") as f:
        meta = json.load(f)
    tok = Tokenizer.load(folder)
    model = Qwen2VLModel(qwen2_vl_model_config(folder, MROPE_RULE[tag]), tok.special_ids())
    load_qwen2_vl(model, folder)
    model.eval()
    proc = Qwen2VLProcessor(settings_from_folder(folder))
    proc.settings.fps = meta["video_fps"]
    cfg = model.config
    out = []
    for case, c in meta["cases"].items():
        images = [os.path.join(ROOT, "images", n) for n in c["images"]]
        frames = [os.path.join(ROOT, "images", f"frame{k}.png") for k in range(4)] if c["video"] else []
        media = images + frames
        enc = encode_conversation(tok, proc, [("user", f"{IMAGE_TOKEN}\n" * len(media) + c["question"])], media,
                                  [(len(images), len(frames))] if frames else [], image_pad_id=cfg.image_token_id,
                                  video_pad_id=cfg.video_token_id, add_generation_prompt=True)
        kw = {k: paddle.to_tensor(enc[k]) for k in ("pixel_values", "pixel_values_videos") if enc[k] is not None}
        kw.update(image_grid_thw=enc["image_grid_thw"], video_grid_thw=enc["video_grid_thw"],
                  second_per_grid_ts=enc["second_per_grid_ts"] or None)
        pixel, feature = 0.0, 0.0
        with paddle.no_grad():
            for key, grid, name in (("pixel_values", "image_grid_thw", "image"),
                                    ("pixel_values_videos", "video_grid_thw", "video")):
                if enc[key] is not None:
                    pixel = max(pixel, _pixel_error(enc[key], ref, f"{case}.{key}"))
                    got = model.vision_features(kw[key], enc[grid]).numpy()
                    feature = max(feature, float(np.abs(got - ref[f"{case}.{name}_features"]).max()))
            x = paddle.to_tensor([enc["input_ids"]])
            positions, _ = model.rope_positions(x, None, enc["image_grid_thw"], enc["video_grid_thw"],
                                                kw["second_per_grid_ts"])
            _, logits = model(x, **kw)
        greedy = model.generate(x, max_new_tokens=16, **kw)[0]
        out.append((model_name, tag, case, enc["input_ids"] == ref[f"{case}.input_ids"].tolist(), pixel, feature,
                    bool((positions.numpy()[:, 0] == ref[f"{case}.position_ids"]).all()),
                    float(np.abs(logits.numpy()[0][ref[f"{case}.logit_rows"]] - ref[f"{case}.logits"]).max()),
                    greedy == ref[f"{case}.greedy"].tolist()))
    return out


def main() -> None:
    print("| model | layout | case | prompt ids identical | pixels max abs diff | vision features max abs diff | "
          "M-RoPE positions identical | logits max abs diff | 16 greedy tokens identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model_name, tag in FOLDERS:
        for name, t, case, same_ids, pixel, feature, same_pos, logits, same_greedy in _rows(model_name, tag):
            yes = {True: "yes", False: "NO"}
            print(f"| {name} | {t} | {case} | {yes[same_ids]} | {pixel:.1e} | {feature:.1e} | {yes[same_pos]} | "
                  f"{logits:.1e} | {yes[same_greedy]} |")


if __name__ == "__main__":
    main()
