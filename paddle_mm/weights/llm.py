"""Qwen2, Llama (and Qwen3) causal LMs: Hugging Face names -> PaddleFormers 1.0.0 parameters.

PaddleFormers names its parameters as transformers does; what differs is the layout of the
Linear weights ([in, out] here, [out, in] in torch). The embedding and lm_head keep the
torch layout ([vocab, hidden]) in both. With tied embeddings the checkpoint has no
lm_head.weight and PaddleFormers' lm_head is the embedding parameter itself.
"""
from __future__ import annotations

from paddle_mm.errors import CheckpointError
from paddle_mm.weights.hf import read_config, read_tensors, tensor_index
from paddle_mm.weights.mapping import Rule, Table, load_mapped

# Relative to the decoder (LlamaModel / Qwen2Model): "model." in a CausalLM checkpoint.
LLAMA_DECODER = Table("llama", (
    Rule("embed_tokens.weight", "embed_tokens.weight"),
    Rule("layers.{i}.input_layernorm.weight", "layers.{i}.input_layernorm.weight"),
    Rule("layers.{i}.self_attn.q_proj.weight", "layers.{i}.self_attn.q_proj.weight", transpose=True),
    Rule("layers.{i}.self_attn.k_proj.weight", "layers.{i}.self_attn.k_proj.weight", transpose=True),
    Rule("layers.{i}.self_attn.v_proj.weight", "layers.{i}.self_attn.v_proj.weight", transpose=True),
    Rule("layers.{i}.self_attn.o_proj.weight", "layers.{i}.self_attn.o_proj.weight", transpose=True),
    Rule("layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_layernorm.weight"),
    Rule("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate_proj.weight", transpose=True),
    Rule("layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up_proj.weight", transpose=True),
    Rule("layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_proj.weight", transpose=True),
    Rule("norm.weight", "norm.weight"),
), ignore=(
    # Checkpoints written by transformers < 4.31 (Vicuna, the LLaVA-1.5 LMs) saved the rotary
    # frequencies as a buffer; they are a function of rope_theta and recomputed.
    "layers.{i}.self_attn.rotary_emb.inv_freq",
))

# Qwen2 is Llama plus biases on the q, k and v projections.
QWEN2_DECODER = Table("qwen2", LLAMA_DECODER.rules + (
    Rule("layers.{i}.self_attn.q_proj.bias", "layers.{i}.self_attn.q_proj.bias"),
    Rule("layers.{i}.self_attn.k_proj.bias", "layers.{i}.self_attn.k_proj.bias"),
    Rule("layers.{i}.self_attn.v_proj.bias", "layers.{i}.self_attn.v_proj.bias"),
), ignore=LLAMA_DECODER.ignore)

# Qwen3 is Llama plus an RMSNorm on each head's queries and keys.
QWEN3_DECODER = Table("qwen3", LLAMA_DECODER.rules + (
    Rule("layers.{i}.self_attn.q_norm.weight", "layers.{i}.self_attn.q_norm.weight"),
    Rule("layers.{i}.self_attn.k_norm.weight", "layers.{i}.self_attn.k_norm.weight"),
), ignore=LLAMA_DECODER.ignore)

DECODERS = {"llama": LLAMA_DECODER, "qwen2": QWEN2_DECODER, "qwen3": QWEN3_DECODER}

LM_HEAD = Table("lm-head", (Rule("lm_head.weight", "lm_head.weight"),))
TIED_LM_HEAD = Table("tied-lm-head", (), tied=("lm_head.weight",))


def decoder_table(family: str) -> Table:
    if family not in DECODERS:
        raise CheckpointError(f"no weight mapping for language model family {family!r} (have {sorted(DECODERS)})")
    return DECODERS[family]


def causal_lm_table(family: str, tie_word_embeddings: bool, decoder_prefix: str = "model.", head_prefix: str = "",
                    target_prefix: str = "") -> Table:
    """The table of a whole CausalLM, its decoder and head found under the given source prefixes."""
    head = TIED_LM_HEAD if tie_word_embeddings else LM_HEAD
    return (decoder_table(family).prefixed(decoder_prefix, target_prefix + "model.")
            + head.prefixed(head_prefix, target_prefix))


def lm_family(raw: dict, source: str) -> str:
    family = raw.get("model_type")
    if family not in DECODERS:
        raise CheckpointError(f"{source}: model_type {family!r} is not a supported language model ({sorted(DECODERS)})")
    return family


def load_causal_lm(lm, folder: str, strict: bool = True) -> list[str]:
    """Load a Qwen2 / Llama CausalLM folder in the Hugging Face layout into a PaddleFormers model."""
    raw = read_config(folder)
    table = causal_lm_table(lm_family(raw, f"{folder}/config.json"), bool(raw.get("tie_word_embeddings", False)))
    where = {k: path for k, (path, _) in tensor_index(folder).items()}
    return load_mapped(lm, read_tensors(folder), table, folder, where, strict)
