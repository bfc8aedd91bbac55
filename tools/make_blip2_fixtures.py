"""Build tiny random BLIP-2 models with transformers and save reference outputs.

Run by hand (needs torch, the optional extra in requirements-bench.txt):
    python tools/make_blip2_fixtures.py [--out tests/fixtures/reference/blip2]
    python tools/make_blip2_fixtures.py --opt [--out tests/fixtures/reference/blip2_opt]
The first (a Qwen2 text model) writes into the folder:
    hf/                     the checkpoint in the Hugging Face layout, fp32, one file
    hf_bf16/                the same weights in bf16, sharded with an index file
    reference.safetensors   inputs and outputs: pixel_values, input_ids, vision_features,
                            qformer_output, projected, logits, greedy_tokens (16 steps)
Every weight is rounded to bf16 before the reference is computed, so the fp32 and the bf16
folders hold the same values and must give the same numbers. With OMP_NUM_THREADS=1 a rerun
writes every file byte for byte as committed; with more threads torch's CPU kernels sum in
another order and the reference outputs move by up to ~4e-7 (the checkpoints stay identical).

--opt (build_opt below) writes a BLIP-2 with an OPT text model, as the Salesforce/blip2-opt-*
checkpoints are, into OUT/hf457 or OUT/hf5 by the major version of the transformers that runs
it (run it once with each): the checkpoint as that version saves it (4.57: fp32 in one file;
5.x: bf16 in shards with an index), its Blip2Processor (image processor and a tiny byte-level
BPE tokenizer), the two PNG images it processed and reference.safetensors: the processor's
input_ids, attention_mask and pixel_values, the logits, 16 greedy tokens of generate(), and
the same for the OPT text model alone on a left-padded text batch (lm_*).
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


# ---- BLIP-2 with an OPT text model -------------------------------------------------------------
OPT_VOCAB = 300  # the model's vocabulary: larger than the tokenizer's, as in blip2-opt-2.7b (50304 > 50266)
OPT_TOKENIZER_VOCAB = 296  # 4 special tokens, 256 bytes, 36 merges; the processor adds <image> after them
OPT_IMAGES = ((40, 24), (17, 31))  # (width, height): both resized to image_size x image_size
OPT_PROMPTS = ("what colour is the square?", "a photo of")  # left-padded to one length
OPT_LM_TEXTS = ("the red square", "a photo")
OPT_CORPUS = OPT_PROMPTS + OPT_LM_TEXTS


def opt_tokenizer(tf):
    """A byte-level BPE in the OPT convention: ids 0-3 are <s>, <pad>, </s>, <unk>, and every text
    starts with </s> (id 2, OPT's bos and eos). Left padding, as batched generation needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=OPT_TOKENIZER_VOCAB, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(OPT_CORPUS) * 10, trainer)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", 2)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>", padding_side="left", model_input_names=["input_ids", "attention_mask"])


def opt_config(tf, image_token_id: int):
    # The image side is narrower than the LM (16 against 32) to keep the fixture small; the
    # qwen2 fixture in blip2/ checks it at full tiny width.
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, initializer_range=0.02)
    qformer = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                   cross_attention_frequency=2, layer_norm_eps=1e-12)
    # OPT's own defaults otherwise (dropout 0.1, relu, pre-LayerNorm, tied embeddings), as opt-2.7b's config
    text = dict(model_type="opt", vocab_size=OPT_VOCAB, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, do_layer_norm_before=True,
                pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return tf.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                          num_query_tokens=NUM_QUERIES, image_token_index=image_token_id)


def _greedy(generate, label: str, **inputs):
    """GREEDY_STEPS greedy tokens (no early stop) of a generate() call; prints the smallest top-1/top-2 gap."""
    import torch

    out = generate(**inputs, max_new_tokens=GREEDY_STEPS, min_new_tokens=GREEDY_STEPS, do_sample=False, num_beams=1,
                   eos_token_id=None, pad_token_id=1, output_scores=True, return_dict_in_generate=True)
    gaps = [torch.topk(s.float(), 2, dim=-1).values for s in out.scores]
    assert len(gaps) == GREEDY_STEPS
    print(f"  {label}: smallest top-1/top-2 gap over {GREEDY_STEPS} greedy steps: "
          f"{min(float((g[:, 0] - g[:, 1]).min()) for g in gaps):.4f}")
    return out.sequences[:, -GREEDY_STEPS:]


def _logit_gap(logits, mask) -> float:
    top2 = logits.topk(2, dim=-1).values
    return float((top2[..., 0] - top2[..., 1])[mask.bool()].min())


def build_opt(root: str) -> None:
    """A BLIP-2 with an OPT text model, saved as the running transformers saves it (see the docstring)."""
    import numpy as np
    import torch
    from PIL import Image

    tf = transformers_module()
    tag = "hf5" if int(tf.__version__.split(".")[0]) >= 5 else "hf457"
    out = os.path.join(root, tag)
    os.makedirs(out, exist_ok=True)

    tokenizer = opt_tokenizer(tf)
    processor = tf.Blip2Processor(image_processor=tf.BlipImageProcessor(size={"height": 16, "width": 16}),
                                  tokenizer=tokenizer, num_query_tokens=NUM_QUERIES)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    model = tf.Blip2ForConditionalGeneration(opt_config(tf, image_token_id)).eval()
    perturb_(model, seed=7, scale=0.5)  # the widest smallest gaps of 0.2, 0.3, 0.5 (tried)
    with torch.no_grad():  # bf16-exact weights: a bf16 copy holds the very same values
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    if tag == "hf5":  # the two dtypes and file layouts, one per fixture (the tests also write a bf16 copy of hf457)
        model.to(torch.bfloat16).save_pretrained(out, max_shard_size="50KB")
        model.float()
    else:
        model.save_pretrained(out)
    processor.save_pretrained(out)

    rng = np.random.default_rng(3)
    for k, (w, h) in enumerate(OPT_IMAGES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(os.path.join(out, f"image_{k}.png"))
    images = [Image.open(os.path.join(out, f"image_{k}.png")).convert("RGB") for k in range(len(OPT_IMAGES))]
    enc = processor(images=images, text=list(OPT_PROMPTS), padding=True, return_tensors="pt")
    lm_enc = tokenizer(list(OPT_LM_TEXTS), padding=True, return_tensors="pt")
    print(f"{tag}: transformers {tf.__version__}; prompt ids {enc['input_ids'].tolist()}")
    with torch.no_grad():
        logits = model(**enc).logits
        greedy = _greedy(model.generate, "Blip2ForConditionalGeneration", **enc)
        lm_logits = model.language_model(**lm_enc).logits
        lm_greedy = _greedy(model.language_model.generate, "OPTForCausalLM", **lm_enc)
    print(f"  smallest top-1/top-2 logit gap at the real positions: BLIP-2 {_logit_gap(logits, enc['attention_mask']):.4f}, "
          f"OPT {_logit_gap(lm_logits, lm_enc['attention_mask']):.4f}")
    save_reference(out, {
        "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pixel_values": enc["pixel_values"],
        "logits": logits, "greedy_tokens": greedy,
        "lm_input_ids": lm_enc["input_ids"], "lm_attention_mask": lm_enc["attention_mask"], "lm_logits": lm_logits,
        "lm_greedy_tokens": lm_greedy,
    })
    for name in sorted(os.listdir(out)):
        print(f"  {name}: {os.path.getsize(os.path.join(out, name))} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--opt", action="store_true", help="the BLIP-2 with an OPT text model (blip2_opt/)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    reference = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "reference")
    out = os.path.abspath(args.out or os.path.join(reference, "blip2_opt" if args.opt else "blip2"))
    (build_opt if args.opt else build)(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
