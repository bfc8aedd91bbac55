"""Build tiny random SigLIP towers and a LLaVA with a SigLIP tower with transformers; save references.

Run by hand, once with each reference transformers (needs torch):
    python tools/make_siglip_fixtures.py --tag hf457 [--out tests/fixtures/reference]
    python tools/make_siglip_fixtures.py --tag hf5
Each run writes, under --out, folders named by --tag (the transformers version that saved them):
    siglip/TAG/        a SiglipVisionModel (with its attention-pooling head, which LLaVA-style
                       models do not use) and reference.safetensors: pixel_values, hidden_states.i
                       (embeddings, then each encoder layer) and post_layernorm
    siglip_model/TAG/  a whole SiglipModel whose vision tower holds the same weights as siglip/TAG
                       (no reference file: its tower must give siglip/TAG's numbers); a tiny text tower
    llava_siglip/TAG/  a LlavaForConditionalGeneration with a SigLIP tower (feature layer -1, the
                       "full" strategy, as LLaVA-OneVision configs read), an mlp2x_gelu projector and
                       a Qwen2 LM, a tokenizer holding <image>, and reference.safetensors: input_ids,
                       pixel_values, logits, image_features, image_features_default_m2 (layer -2,
                       strategy "default") and greedy (16 tokens)
It also prints each saved folder's tensor names and config keys, to compare the two versions,
and the smallest top-1/top-2 logit gap of the greedy run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from make_reference_fixtures import _greedy, _pixels, perturb_, save_reference, transformers_module

SIGLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     image_size=32, patch_size=8, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
# Smaller still, to keep the folder (weights, 2 x 21 x 320 logits) well under 300 KB: 16 x 16 images
# in 4 x 4 patches, no pooling head (LLaVA-OneVision's towers have none; siglip/ covers its names).
LLAVA_VISION = {**SIGLIP_VISION, "image_size": 16, "patch_size": 4, "vision_use_head": False}
QWEN2 = dict(vocab_size=320, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6,
             tie_word_embeddings=False, initializer_range=0.2, bos_token_id=1, eos_token_id=2)


def describe(folder: str) -> None:
    """Print the saved tensor names (layer indices folded) and the config keys, for comparing versions."""
    import re

    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        names = sorted({re.sub(r"\.\d+\.", ".{i}.", k) for k in f.keys()})
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    print(f"  {folder}: {len(names)} tensor kinds")
    for n in names:
        print(f"    {n}")
    print(f"  config keys: {sorted(raw)}")
    for sub in ("vision_config", "text_config"):
        if isinstance(raw.get(sub), dict):
            print(f"  {sub} keys: {sorted(raw[sub])}")


def make_siglip(out: str, tag: str) -> None:
    import torch
    tf = transformers_module()

    torch.manual_seed(0)
    vision = tf.SiglipVisionModel(tf.SiglipVisionConfig(**SIGLIP_VISION)).eval()
    perturb_(vision, seed=11, scale=0.1)
    folder = os.path.join(out, "siglip", tag)
    vision.save_pretrained(folder)
    pixels = _pixels(12, batch=2, size=32)
    with torch.no_grad():
        result = vision(pixel_values=pixels, output_hidden_states=True)
    refs = {"pixel_values": pixels, "post_layernorm": result.last_hidden_state}
    for i, h in enumerate(result.hidden_states):
        refs[f"hidden_states.{i}"] = h
    # transformers' hidden states are the encoder's outputs, before post_layernorm
    assert not torch.allclose(result.hidden_states[-1], result.last_hidden_state)
    save_reference(folder, refs)
    describe(folder)

    # A whole SiglipModel around the same vision weights: its text tower and logit scale/bias are ignored.
    torch.manual_seed(0)
    config = tf.SiglipConfig(vision_config=SIGLIP_VISION,
                             text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=4, max_position_embeddings=16))
    model = tf.SiglipModel(config).eval()
    perturb_(model, seed=13, scale=0.1)
    # 4.57's SiglipVisionModel wraps a .vision_model; 5.x's holds the layers itself (saved names agree)
    model.vision_model.load_state_dict(getattr(vision, "vision_model", vision).state_dict())
    folder = os.path.join(out, "siglip_model", tag)
    model.save_pretrained(folder)
    describe(folder)


def make_llava_siglip(out: str, tag: str) -> None:
    import torch
    tf = transformers_module()

    from paddle_mm.data.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(["a red circle left of a blue square", "what colour is the circle?"] * 20, 200, 1)
    image_id = tok.image_token_id
    tokens_per_image = (LLAVA_VISION["image_size"] // LLAVA_VISION["patch_size"]) ** 2  # "full": every patch
    torch.manual_seed(0)
    config = tf.LlavaConfig(
        vision_config=tf.SiglipVisionConfig(**LLAVA_VISION),
        text_config=tf.Qwen2Config(**QWEN2),
        image_token_index=image_id, vision_feature_layer=-1, vision_feature_select_strategy="full",
        projector_hidden_act="gelu", image_seq_length=tokens_per_image,
    )
    model = tf.LlavaForConditionalGeneration(config).eval()
    perturb_(model, seed=14, scale=0.1)
    folder = os.path.join(out, "llava_siglip", tag)
    model.save_pretrained(folder)
    tok.save(folder)

    text = tok.encode("what colour is the circle?")[:4]
    ids = torch.tensor([[1] + [image_id] * tokens_per_image + text,
                        [1] + text[:3] + [image_id] * tokens_per_image + text[3:]])
    pixels = _pixels(15, batch=2, size=LLAVA_VISION["image_size"])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
        features = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                                  vision_feature_select_strategy="full")
        default = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                                 vision_feature_select_strategy="default")
    # 4.57 gives a list of [T, D] tensors per image; 5.x an output whose pooler_output is that list
    features, default = (torch.stack(list(getattr(f, "pooler_output", f))) for f in (features, default))
    assert features.shape[1] == tokens_per_image and default.shape[1] == tokens_per_image - 1, \
        (features.shape, default.shape)  # "default" drops the first position even without a class token
    save_reference(folder, {
        "input_ids": ids, "pixel_values": pixels, "logits": logits,
        "image_features": features, "image_features_default_m2": default,
        "greedy": _greedy(model, f"LLaVA-SigLIP ({tag})", input_ids=ids, pixel_values=pixels,
                          attention_mask=torch.ones_like(ids)),
    })
    describe(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "reference"))
    parser.add_argument("--tag", required=True, help="the folder name: hf457 or hf5, after the transformers version")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(f"transformers {transformers_module().__version__} -> {args.tag}")
    make_siglip(args.out, args.tag)
    make_llava_siglip(args.out, args.tag)


if __name__ == "__main__":
    main()
