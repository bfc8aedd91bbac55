"""Reference outputs of transformers' Qwen2-VL and Qwen2.5-VL, for tiny folders as save_pretrained writes them.

Run by hand, once with each transformers version, each in its own venv with torch (the tests
import neither):
    python tools/make_qwen2_vl_fixtures.py --tag hf457   # transformers 4.57
    python tools/make_qwen2_vl_fixtures.py --tag hf5     # transformers 5.x
Models: qwen2_vl, qwen2_5_vl, and qwen3_vl (16-pixel patches, learned positions, DeepStack,
interleaved M-RoPE; images only: its video prompts carry timestamps this project does not write).
Each model gets tests/fixtures/reference/qwen2_vl/<model>/<tag>/: the folder (weights in bf16,
config, tokenizer, chat template, image processor settings) and reference.safetensors +
reference.json with, for each case (a wide image, a tall image, two images, a 4-frame video,
an image and a video in one prompt): the prompt ids, image/video grids, the M-RoPE position ids
and rope delta get_rope_index computes, the vision features, logits at every 16th position
and the last, and 16 greedy tokens. Pixel values are large, so each one is kept as its shape,
its per-row and per-column sums and 256 values at seeded positions.

Images go through the PIL image processor (Qwen2VLImageProcessor in 4.57,
Qwen2VLImageProcessorPil in 5.x). The video processor of both versions needs torchvision,
which does not import with the registry's CPU torch 2.13, so the video frames are sized so that
no resize happens (84 x 56, multiples of 28 within the pixel bounds) and their pixels are made:
4.57 by the image processor's own (deprecated) `videos=` path, 5.x by per-frame PIL
preprocessing arranged in temporal pairs as the video processor arranges them; the
<|video_pad|> of a prompt is expanded to t*h*w/4 tokens as the processor does.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from make_pipeline_fixtures import _tokenizer, _vocab, write_noise_images  # noqa: E402
from make_reference_fixtures import perturb_, save_reference, transformers_module  # noqa: E402

GREEDY_STEPS = 16
ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "reference", "qwen2_vl")
IMAGES = {"wide.png": (150, 50), "tall.png": (60, 200)}  # (width, height)
FRAMES = 4
FRAME_SIZE = (84, 56)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 12
VIDEO_FPS = 1.0  # Qwen2.5-VL: second_per_grid_ts = temporal_patch_size / fps
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
            "<|image_pad|>", "<|video_pad|>"]
# The chat template Qwen2-VL-Instruct checkpoints ship (the same in Qwen2.5-VL's).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# case -> (images, has video, question)
CASES = {
    "wide": (["wide.png"], False, "what colour is the circle?"),
    "tall": (["tall.png"], False, "what colour is the circle?"),
    "two_images": (["wide.png", "tall.png"], False, "which image has more circles?"),
    "video": ([], True, "which way does the circle move?"),
    "image_and_video": (["tall.png"], True, "is the red square in both?"),
}
CORPUS = ["which image has more circles?", "which way does the circle move?", "is the red square in both?",
          "what colour is the circle?", "the circle moves left", "the square is red", "system user assistant",
          "You are a helpful assistant."] * 20


def make_media() -> None:
    """Noise images, then the clip's noise frames, from one fixed-seed generator."""
    import numpy as np

    rng = np.random.default_rng(0)
    write_noise_images(os.path.join(ROOT, "images"), IMAGES, rng)
    write_noise_images(os.path.join(ROOT, "images"), {f"frame{k}.png": FRAME_SIZE for k in range(FRAMES)}, rng)


def _configs(tf, name: str, tok):
    """Tiny Qwen2-VL / Qwen2.5-VL configs: 2 vision blocks of 2 heads, 2 decoder layers (head_dim 16, GQA 2:1)."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    text = dict(vocab_size=_vocab(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, rope_theta=10000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.2,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    if name == "qwen3_vl":  # the Qwen3 decoder (per-head q/k norms), interleaved M-RoPE, DeepStack
        text.update(head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3],
                                               "mrope_interleaved": True})
        # a 4 x 4 table of learned positions, interpolated to each image's grid; DeepStack after block 0
        vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, in_channels=3, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=16,
                      deepstack_visual_indexes=[0], hidden_act="gelu_pytorch_tanh", initializer_range=0.2)
        cls = tf.Qwen3VLConfig
    elif name == "qwen2_vl":
        vision = dict(depth=2, embed_dim=16, hidden_size=32, mlp_ratio=2, num_heads=2, in_channels=3, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu", initializer_range=0.2)
        cls = tf.Qwen2VLConfig
    else:
        # window_size 56: 2 x 2 merged units a window, so the wide image has several windows
        vision = dict(depth=2, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2, in_channels=3,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="silu",
                      tokens_per_second=2, window_size=56, fullatt_block_indexes=[1], initializer_range=0.2)
        cls = tf.Qwen2_5_VLConfig
    return cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
               video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
               vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)


def _image_processor(tf, name: str):
    cls = getattr(tf, "Qwen2VLImageProcessorPil", None) or tf.Qwen2VLImageProcessor
    if name == "qwen3_vl":  # 16-pixel patches (a factor of 32), mean and std 0.5
        return cls(patch_size=16, min_pixels=MIN_PIXELS * 32 * 32 // 28 // 28, max_pixels=32 * 32 * 12,
                   image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return cls(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def _processor(tf, ip, tok, cls):
    """A Qwen2VLProcessor without a video processor (torchvision, see the module docstring): the
    processor's class check is skipped for that one argument."""
    check = tf.ProcessorMixin.check_argument_for_proper_class

    def lenient(self, name, arg):
        return None if name == "video_processor" and arg is None else check(self, name, arg)

    tf.ProcessorMixin.check_argument_for_proper_class = lenient
    try:
        return cls(image_processor=ip, tokenizer=tok, video_processor=None, chat_template=QWEN2_VL_TEMPLATE)
    finally:
        tf.ProcessorMixin.check_argument_for_proper_class = check


def _video_pixels(tf, ip, frames, tag: str):
    """(pixel_values_videos, video_grid_thw) of one clip (see the module docstring)."""
    import numpy as np
    import torch

    if tag == "hf457":
        out = ip(images=None, videos=[frames], return_tensors="np")
        return torch.tensor(out["pixel_values_videos"]), torch.tensor(out["video_grid_thw"])
    rows = []
    grid = None
    for k in range(0, len(frames), 2):
        pair = []
        for frame in frames[k:k + 2]:
            out = ip(images=[frame], return_tensors="np")
            grid = out["image_grid_thw"][0]
            pix = out["pixel_values"]
            pair.append(pix.reshape(pix.shape[0], 3, 2, 14, 14)[:, :, 0])
        rows.append(np.stack(pair, axis=2).reshape(pix.shape[0], -1))
    grid = np.asarray([[len(frames) // 2, grid[1], grid[2]]])
    return torch.tensor(np.concatenate(rows)), torch.tensor(grid)


def _pixel_summary(prefix: str, pixels) -> dict:
    import torch

    gen = torch.Generator().manual_seed(5)
    flat = pixels.reshape(-1)
    idx = torch.randint(0, flat.numel(), (256,), generator=gen)
    return {f"{prefix}.shape": torch.tensor(list(pixels.shape)), f"{prefix}.row_sums": pixels.double().sum(1).float(),
            f"{prefix}.col_sums": pixels.double().sum(0).float(), f"{prefix}.sample_index": idx,
            f"{prefix}.sample": flat[idx]}


def _visual(refs: dict, key: str, inner, pixels, grid) -> None:
    """The merged vision features (5.x returns them as the pooler output, 4.57 as the tensor; Qwen3-VL
    also its DeepStack features, one [tokens, D] per layer)."""
    import torch

    out = inner.visual(pixels, grid_thw=grid)
    deepstack = None
    if isinstance(out, tuple):  # Qwen3-VL in 4.57: (features, DeepStack list)
        out, deepstack = out
    elif getattr(out, "deepstack_features", None) is not None:
        deepstack = out.deepstack_features
    refs[f"{key}_features"] = getattr(out, "pooler_output", out)
    if deepstack is not None:
        refs[f"{key}_deepstack"] = torch.stack(list(deepstack))


def _greedy(model, **inputs):
    import torch

    out = model.generate(**inputs, max_new_tokens=GREEDY_STEPS, min_new_tokens=GREEDY_STEPS, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, eos_token_id=None)
    gaps = [torch.topk(s.float(), 2, dim=-1).values for s in out.scores]
    smallest = min(float((g[:, 0] - g[:, 1]).min()) for g in gaps)
    print(f"    {GREEDY_STEPS} greedy tokens, smallest top-1/top-2 gap {smallest:.4f}")
    return out.sequences[0, inputs["input_ids"].shape[1]:]


def make_model(tf, name: str, tag: str) -> None:
    import torch
    from PIL import Image

    folder = os.path.join(ROOT, name, tag)
    fast = _tokenizer(tf, SPECIALS, None, "<|im_end|>", "<|endoftext|>", False, QWEN2_VL_TEMPLATE)
    # the processor takes Qwen2's tokenizer class only (Qwen2TokenizerFast in 4.57, Qwen2Tokenizer in 5.x)
    tok_cls = getattr(tf, "Qwen2TokenizerFast", None) if tag == "hf457" else tf.Qwen2Tokenizer
    tok = tok_cls(tokenizer_object=fast.backend_tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                  unk_token=None, bos_token=None)
    tok.chat_template = QWEN2_VL_TEMPLATE
    config = _configs(tf, name, tok)
    torch.manual_seed(0)
    cls = {"qwen2_vl": tf.Qwen2VLForConditionalGeneration, "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
           "qwen3_vl": tf.Qwen3VLForConditionalGeneration}[name]
    model = cls(config).eval()
    perturb_(model, seed=14, scale=0.15)
    with torch.no_grad():  # weights a bf16 file holds exactly, so the fp32 references are the saved model's
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    ip = _image_processor(tf, name)
    processor = _processor(tf, ip, tok, tf.Qwen3VLProcessor if name == "qwen3_vl" else tf.Qwen2VLProcessor)
    media = os.path.join(ROOT, "images")
    frames = [Image.open(os.path.join(media, f"frame{k}.png")).convert("RGB") for k in range(FRAMES)]
    inner = model.model if hasattr(model.model, "get_rope_index") else model

    refs, prompts = {}, {}
    cases = {c: v for c, v in CASES.items() if not (name == "qwen3_vl" and v[1])}  # Qwen3-VL: images only
    for case, (image_names, video, question) in cases.items():
        images = [Image.open(os.path.join(media, n)).convert("RGB") for n in image_names]
        content = [{"type": "image"} for _ in images] + ([{"type": "video"}] if video else [])
        messages = [{"role": "user", "content": content + [{"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        prompts[case] = prompt
        extra = {}
        text = prompt
        if video:
            pv, vgrid = _video_pixels(tf, ip, frames, tag)
            text = text.replace("<|video_pad|>", "<|video_pad|>" * int(vgrid[0].prod() // 4))
            extra.update(pixel_values_videos=pv, video_grid_thw=vgrid)
            if name == "qwen2_5_vl":
                extra["second_per_grid_ts"] = torch.tensor([2 / VIDEO_FPS])
            refs.update(_pixel_summary(f"{case}.pixel_values_videos", pv))
            refs[f"{case}.video_grid_thw"] = vgrid
        if video and tag == "hf5":  # 5.x's processor refuses video pads without its video processor
            inputs = dict(ip(images=images, return_tensors="pt")) if images else {}
            for grid in inputs.get("image_grid_thw", []):
                text = text.replace("<|image_pad|>", "<|placeholder|>" * int(grid.prod() // 4), 1)
            inputs.update(tok(text.replace("<|placeholder|>", "<|image_pad|>"), return_tensors="pt"))
        else:
            inputs = processor(images=images or None, text=text, return_tensors="pt")
        inputs = {**dict(inputs), **extra}
        if tag == "hf5":  # 5.x's M-RoPE reads the modality of each token (text 0, image 1, video 2)
            ids = inputs["input_ids"]
            inputs["mm_token_type_ids"] = ((ids == config.image_token_id).int()
                                           + 2 * (ids == config.video_token_id).int())
        if images:
            refs.update(_pixel_summary(f"{case}.pixel_values", inputs["pixel_values"]))
            refs[f"{case}.image_grid_thw"] = inputs["image_grid_thw"]
        rope_kw = {"second_per_grid_ts": extra["second_per_grid_ts"]} if "second_per_grid_ts" in extra else {}
        if "mm_token_type_ids" in inputs:
            rope_kw["mm_token_type_ids"] = inputs["mm_token_type_ids"]
        with torch.no_grad():
            positions, delta = inner.get_rope_index(inputs["input_ids"], image_grid_thw=inputs.get("image_grid_thw"),
                                                    video_grid_thw=inputs.get("video_grid_thw"),
                                                    attention_mask=inputs["attention_mask"], **rope_kw)
            logits = model(**inputs).logits[0]
            if images:
                _visual(refs, f"{case}.image", inner, inputs["pixel_values"], inputs["image_grid_thw"])
            if video:
                _visual(refs, f"{case}.video", inner, inputs["pixel_values_videos"], inputs["video_grid_thw"])
        rows = torch.tensor(sorted(set(range(0, logits.shape[0], 16)) | {logits.shape[0] - 1}))
        print(f"  {name} {tag} {case}: {inputs['input_ids'].shape[1]} tokens")
        refs.update({f"{case}.input_ids": inputs["input_ids"][0], f"{case}.position_ids": positions[:, 0],
                     f"{case}.rope_delta": delta.reshape(-1), f"{case}.logit_rows": rows,
                     f"{case}.logits": logits[rows], f"{case}.greedy": _greedy(model, **inputs)})
    model.to(torch.bfloat16).save_pretrained(folder)
    # there is no video processor to save (4.57 reads `attributes`, 5.x `get_attributes()`)
    processor.attributes = ["image_processor", "tokenizer"]
    processor.get_attributes = lambda: ["image_processor", "tokenizer"]
    processor.save_pretrained(folder)
    save_reference(folder, refs)
    with open(os.path.join(folder, "reference.json"), "w", encoding="utf-8") as f:
        json.dump({"transformers": tf.__version__, "prompts": prompts, "video_fps": VIDEO_FPS,
                   "cases": {c: {"images": i, "video": v, "question": q} for c, (i, v, q) in cases.items()}}, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", required=True, help="hf457 or hf5: the subfolder each model is written to")
    parser.add_argument("models", nargs="*", default=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
    args = parser.parse_args()
    tf = transformers_module()
    make_media()
    for name in args.models:
        make_model(tf, name, args.tag)


if __name__ == "__main__":
    main()
