"""Build a tiny random BLIP-2 (Qwen2 text model) with transformers and save reference outputs.

Run by hand (needs torch, the optional extra in requirements-bench.txt):
    python tools/make_blip2_fixtures.py [--out tests/fixtures/reference/blip2]
Writes into the folder:
    hf/                     the checkpoint in the Hugging Face layout, fp32, one file
    hf_bf16/                the same weights in bf16, sharded with an index file
    reference.safetensors   inputs and outputs: pixel_values, input_ids, vision_features,
                            qformer_output, projected, logits, greedy_tokens (16 steps)
Every weight is rounded to bf16 before the reference is computed, so the fp32 and the bf16
folders hold the same values and must give the same numbers. With OMP_NUM_THREADS=1 a rerun
writes every file byte for byte as committed; with more threads torch's CPU kernels sum in
another order and the reference outputs move by up to ~4e-7 (the checkpoints stay identical).
"""
from __future__ import annotations

import argparse
import os

from make_reference_fixtures import perturb_, save_reference

NUM_QUERIES = 4
VOCAB = 96
IMAGE_TOKEN = VOCAB - 1  # the last id, as BLIP-2 checkpoints add the image token at the end
GREEDY_STEPS = 16


def transformers_module():
    """transformers with its torchcodec probe off.

    paddlecodec (a PaddleFormers dependency) installs a `torchcodec` module without package
    metadata, and transformers 4.57 then fails every model import looking up its version.
    (Helper 3a adds the same function to make_reference_fixtures.py; use that one after the merge.)
    """
    import transformers.utils.import_utils as import_utils

    import_utils._torchcodec_available = False
    import transformers

    return transformers


def tiny_config():
    Blip2Config = transformers_module().Blip2Config

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
                  initializer_range=0.02)  # the default 1e-10 would leave the ViT near zero
    qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   cross_attention_frequency=2, layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
    text = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                       num_query_tokens=NUM_QUERIES, image_token_index=IMAGE_TOKEN)


def inputs(seed: int = 0):
    """Two images and two prompts: NUM_QUERIES image tokens, bos, then text (no padding)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, 32, 32, generator=gen)
    text = torch.randint(3, VOCAB - 1, (2, 5), generator=gen)
    image = torch.full((2, NUM_QUERIES), IMAGE_TOKEN)
    bos = torch.ones(2, 1, dtype=torch.long)
    return pixel_values, torch.cat([image, bos, text], dim=1)


def build(out: str) -> None:
    import torch

    Blip2ForConditionalGeneration = transformers_module().Blip2ForConditionalGeneration

    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(tiny_config()).eval()
    perturb_(model, seed=1)
    with torch.no_grad():  # bf16-exact weights: the bf16 copy then holds the very same values
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.save_pretrained(os.path.join(out, "hf"), safe_serialization=True)
    model.to(torch.bfloat16).save_pretrained(os.path.join(out, "hf_bf16"), safe_serialization=True,
                                              max_shard_size="100KB")
    model.float()

    pixel_values, input_ids = inputs()
    with torch.no_grad():
        features, vision_out, qformer_out = model.get_image_features(pixel_values, return_dict=True)
        logits = model(pixel_values=pixel_values, input_ids=input_ids).logits
        model.generation_config.eos_token_id = None  # always GREEDY_STEPS tokens
        generated = model.generate(pixel_values=pixel_values, input_ids=input_ids, do_sample=False,
                                   num_beams=1, max_new_tokens=GREEDY_STEPS, pad_token_id=0)
    greedy = generated[:, -GREEDY_STEPS:]
    save_reference(out, {
        "pixel_values": pixel_values, "input_ids": input_ids,
        "vision_features": vision_out.last_hidden_state, "qformer_output": qformer_out.last_hidden_state,
        "projected": features, "logits": logits, "greedy_tokens": greedy,
    })
    top2 = logits.topk(2, dim=-1).values
    print(f"smallest top-1/top-2 logit gap: {(top2[..., 0] - top2[..., 1]).min().item():.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "reference", "blip2")
    parser.add_argument("--out", default=default)
    args = parser.parse_args()
    build(os.path.abspath(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
