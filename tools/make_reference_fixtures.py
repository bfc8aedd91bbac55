"""Build tiny random models with Hugging Face transformers (PyTorch) and save reference outputs.

Run by hand (needs torch and transformers, which the tests do not):
    python tools/make_reference_fixtures.py [--out tests/fixtures/reference] [family ...]
Each family gets a folder holding a checkpoint in the Hugging Face layout and
`reference.safetensors` with the outputs the tests compare paddle_mm against, without torch.
Weights are drawn with a wide initializer and then perturbed, so the logits of these tiny
models have clear winners (greedy decoding is not decided by rounding) and no LayerNorm
weight is 1 or bias 0. The script prints the smallest top-1/top-2 logit gap of each greedy
run: a gap far above 1e-4 is what makes "identical greedy tokens" a fair test.
"""
from __future__ import annotations

import argparse
import os

GREEDY_STEPS = 16


def transformers_module():
    """Import transformers with its torchcodec probe off.

    paddlecodec (a PaddleFormers dependency) installs a `torchcodec` module without package
    metadata, and transformers 4.57 then fails every model import looking up its version.
    """
    import transformers.utils.import_utils as import_utils

    import_utils._torchcodec_available = False
    import transformers

    return transformers


def perturb_(model, seed: int, scale: float = 0.02) -> None:
    """Move every parameter away from its initial value (LayerNorm weights off 1, biases off 0)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def save_reference(folder: str, outputs: dict) -> None:
    """Save {name: torch.Tensor} as fp32 safetensors (int tensors kept as int64)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    arrays = {k: (v.detach().float() if v.is_floating_point() else v.detach().long()).contiguous() for k, v in outputs.items()}
    save_file(arrays, os.path.join(folder, "reference.safetensors"))


def _greedy(model, margin_label: str, **inputs):
    """Greedy tokens for GREEDY_STEPS steps (no early stop), printing the smallest logit gap."""
    import torch

    out = model.generate(**inputs, max_new_tokens=GREEDY_STEPS, min_new_tokens=GREEDY_STEPS, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    gaps = [torch.topk(s.float(), 2, dim=-1).values for s in out.scores]
    smallest = min(float((g[:, 0] - g[:, 1]).min()) for g in gaps)
    print(f"  {margin_label}: smallest top-1/top-2 gap over {GREEDY_STEPS} greedy steps: {smallest:.4f}")
    return out.sequences[:, -GREEDY_STEPS:]


def _pixels(seed: int, batch: int, size: int):
    import torch

    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _token_ids(seed: int, batch: int, length: int, vocab: int):
    import torch

    return torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# CLIP: a whole CLIPModel (vision + a tiny text tower), the form openai/clip-vit-large-patch14-336
# ships in; paddle_mm reads its vision_model.* part and must skip the rest by name.
CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   image_size=32, patch_size=8, hidden_act="quick_gelu", initializer_range=0.2)


def make_clip(folder: str) -> None:
    import torch
    tf = transformers_module()
    CLIPConfig, CLIPModel = tf.CLIPConfig, tf.CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        vision_config=CLIP_VISION,
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    perturb_(model, seed=1, scale=0.1)
    model.save_pretrained(folder)
    pixels = _pixels(2, batch=2, size=32)
    with torch.no_grad():
        out = model.vision_model(pixel_values=pixels, output_hidden_states=True)
    refs = {"pixel_values": pixels, "post_layernorm": model.vision_model.post_layernorm(out.last_hidden_state)}
    for i, h in enumerate(out.hidden_states):
        refs[f"hidden_states.{i}"] = h
    save_reference(folder, refs)


# ---------------------------------------------------------------------------------------------
# Causal LMs. Qwen2 ties its embeddings (as Qwen2-0.5B does: no lm_head.weight on disk) and has
# q/k/v biases; Llama is saved in shards with an index file; Qwen2 also gets a bf16 copy.
LM_COMMON = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                 initializer_range=0.2, bos_token_id=1, eos_token_id=2)


def _lm_references(model, vocab: int) -> dict:
    import torch

    ids = _token_ids(3, batch=2, length=12, vocab=vocab)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    refs = {"input_ids": ids, "logits": out.logits, "last_hidden_state": out.hidden_states[-1]}
    refs["greedy"] = _greedy(model, type(model).__name__, input_ids=ids, attention_mask=torch.ones_like(ids))
    return refs


def _bf16_copy(model, folder: str, vocab: int) -> None:
    """Save the model in bf16 and references computed in fp32 from the bf16-rounded weights."""
    import torch

    rounded = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    model.to(torch.bfloat16).save_pretrained(folder)
    model.to(torch.float32)
    # A fresh fp32 model: casting back would leave the rotary frequencies rounded to bf16.
    fresh = type(model)(model.config).eval()
    fresh.load_state_dict(rounded)
    save_reference(folder, _lm_references(fresh, vocab))


def make_qwen2(folder: str) -> None:
    import torch
    tf = transformers_module()
    Qwen2Config, Qwen2ForCausalLM = tf.Qwen2Config, tf.Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**LM_COMMON, tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6)
    model = Qwen2ForCausalLM(config).eval()
    perturb_(model, seed=4, scale=0.1)
    model.save_pretrained(folder)
    save_reference(folder, _lm_references(model, config.vocab_size))
    _bf16_copy(model, os.path.join(folder, "bf16"), config.vocab_size)


def make_llama(folder: str) -> None:
    import torch
    tf = transformers_module()
    LlamaConfig, LlamaForCausalLM = tf.LlamaConfig, tf.LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**LM_COMMON, tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config).eval()
    perturb_(model, seed=5, scale=0.1)
    model.save_pretrained(folder, max_shard_size="40KB")  # several shards + model.safetensors.index.json
    save_reference(folder, _lm_references(model, config.vocab_size))


# ---------------------------------------------------------------------------------------------
# LLaVA-1.5: CLIP vision tower (feature layer -2, class token dropped), mlp2x_gelu projector,
# a Llama LM; saved in the transformers 4.57 layout, with a tokenizer holding <image>.
def make_llava(folder: str) -> None:
    import torch
    tf = transformers_module()
    CLIPVisionConfig, LlamaConfig, LlavaConfig = tf.CLIPVisionConfig, tf.LlamaConfig, tf.LlavaConfig
    LlavaForConditionalGeneration = tf.LlavaForConditionalGeneration

    from paddle_mm.data.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(["a red circle left of a blue square", "what colour is the circle?"] * 20, 200, 1)
    image_id = tok.image_token_id
    vision = CLIPVisionConfig(**CLIP_VISION)
    tokens_per_image = (vision.image_size // vision.patch_size) ** 2
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=vision,
        # a byte-level BPE has at least 256 + 4 tokens: the LM vocabulary must hold them all
        text_config=LlamaConfig(**{**LM_COMMON, "vocab_size": 320}, tie_word_embeddings=False, rms_norm_eps=1e-5),
        image_token_index=image_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=tokens_per_image,
    )
    model = LlavaForConditionalGeneration(config).eval()
    perturb_(model, seed=6, scale=0.1)
    model.save_pretrained(folder)
    tok.save(folder)

    text = tok.encode("what colour is the circle?")
    ids = torch.tensor([[1] + [image_id] * tokens_per_image + text,
                        [1] + text[:3] + [image_id] * tokens_per_image + text[3:]])
    pixels = _pixels(7, batch=2, size=vision.image_size)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
        features = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default")
        full = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                              vision_feature_select_strategy="full")
    # get_image_features gives one [T, D] tensor per image in 4.57
    features, full = (torch.stack(list(f)) if isinstance(f, (list, tuple)) else f for f in (features, full))
    save_reference(folder, {
        "input_ids": ids, "pixel_values": pixels, "logits": out.logits,
        "image_features": features, "image_features_last_full": full,
        "greedy": _greedy(model, "LlavaForConditionalGeneration", input_ids=ids, pixel_values=pixels,
                          attention_mask=torch.ones_like(ids)),
    })


FAMILIES: dict = {"clip": make_clip, "qwen2": make_qwen2, "llama": make_llama, "llava": make_llava}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "reference"))
    parser.add_argument("families", nargs="*", help=f"default: all ({', '.join(FAMILIES)})")
    args = parser.parse_args()
    for name in args.families or list(FAMILIES):
        FAMILIES[name](os.path.join(args.out, name))
        print(f"wrote {name}")


if __name__ == "__main__":
    main()
