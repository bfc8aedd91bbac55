"""Qwen2, Llama (and Qwen3) causal LMs: Hugging Face names -> PaddleFormers 1.0.0 parameters.

PaddleFormers names its parameters as transformers does; what differs is the layout of the
Linear weights ([in, out] here, [out, in] in torch). The embedding and lm_head keep the
torch layout ([vocab, hidden]) in both. With tied embeddings the checkpoint has no
lm_head.weight and PaddleFormers' lm_head is the embedding parameter itself.
"""
from __future__ import annotations

from paddle_mm.config import LMConfig
from paddle_mm.errors import CheckpointError
from paddle_mm.lm.adapter import lm_config_from_hf
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
# PaddleNLP's LM heads (PaddleMIX checkpoints) store [hidden, vocab]; PaddleFormers' [vocab, hidden].
PADDLENLP_LM_HEAD = Table("paddlenlp-lm-head", (Rule("lm_head.weight", "lm_head.weight", transpose=True),))

# transformers writes only the fields of a nested text_config (LLaVA, BLIP-2) that differ from
# the family's defaults (llava-1.5-7b-hf's names no hidden_size), so those defaults are needed to read it.
TEXT_CONFIG_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                  tie_word_embeddings=False),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=False),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=False),
}


def decoder_table(family: str) -> Table:
    if family not in DECODERS:
        raise CheckpointError(f"no weight mapping for language model family {family!r} (have {sorted(DECODERS)})")
    return DECODERS[family]


def causal_lm_table(family: str, tie_word_embeddings: bool, decoder_prefix: str = "model.", head_prefix: str = "",
                    target_prefix: str = "", paddle_layout: bool = False) -> Table:
    """The table of a whole CausalLM, its decoder and head found under the given source prefixes.

    paddle_layout: a PaddleNLP checkpoint (PaddleMIX), Linear weights [in, out] and head [hidden, vocab].
    """
    decoder = decoder_table(family)
    head = TIED_LM_HEAD if tie_word_embeddings else LM_HEAD
    if paddle_layout:
        decoder = decoder.in_paddle_layout()
        head = TIED_LM_HEAD if tie_word_embeddings else PADDLENLP_LM_HEAD
    return decoder.prefixed(decoder_prefix, target_prefix + "model.") + head.prefixed(head_prefix, target_prefix)


def nested_lm_config(text: dict, source: str, default_family: str = "llama") -> LMConfig:
    """Our LMConfig from the text_config section of a multimodal model's config.json."""
    family = text.get("model_type", default_family)
    if family not in TEXT_CONFIG_DEFAULTS:
        raise CheckpointError(f"{source}: text model type {family!r} is not one of {sorted(TEXT_CONFIG_DEFAULTS)}")
    return lm_config_from_hf({"model_type": family, **TEXT_CONFIG_DEFAULTS[family], **text}, "", source)


def hf_text_config(lm: LMConfig) -> dict:
    """A transformers text_config for our LMConfig (inside a LLaVA or BLIP-2 config written by export)."""
    return {
        "model_type": lm.family, "vocab_size": lm.vocab_size, "hidden_size": lm.hidden_size,
        "intermediate_size": lm.intermediate_size, "num_hidden_layers": lm.num_layers,
        "num_attention_heads": lm.num_heads, "num_key_value_heads": lm.num_kv_heads,
        "max_position_embeddings": lm.max_position_embeddings, "rope_theta": lm.rope_theta,
        "rms_norm_eps": lm.rms_norm_eps, "tie_word_embeddings": lm.tie_word_embeddings, "hidden_act": "silu",
    }


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
