"""Qwen2, Llama (and Qwen3) causal LMs: Hugging Face folders -> PaddleFormers 1.0.0 backbones;
OPT (BLIP-2's text model) -> lm/opt.py's decoder, whose names are transformers' own.

Here: reading a folder's config.json into our LMConfig (and refusing what it cannot carry),
the name tables, loading a folder's weights into a backbone lm/adapter.py built, and the
qwen2 / llama records of `paddle-mm convert`. lm/ only builds; it imports nothing from here.

PaddleFormers names its parameters as transformers does; what differs is the layout of the
Linear weights ([in, out] here, [out, in] in torch). The embedding and lm_head keep the
torch layout ([vocab, hidden]) in both. With tied embeddings the checkpoint has no
lm_head.weight and PaddleFormers' lm_head is the embedding parameter itself.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, replace

from paddle_mm.config import LMConfig
from paddle_mm.errors import CheckpointError
from paddle_mm.lm.adapter import build_language_model
from paddle_mm.weights.hf import read_config, read_tensors, tensor_index
from paddle_mm.weights.mapping import Family, Rule, Table, load_mapped

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

# OPT (lm/opt.py names its parameters as transformers' OPTModel): relative to "model." as well.
OPT_DECODER = Table("opt", (
    Rule("decoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
    Rule("decoder.embed_positions.weight", "decoder.embed_positions.weight"),
    *(Rule(f"decoder.layers.{{i}}.self_attn.{proj}.{kind}", f"decoder.layers.{{i}}.self_attn.{proj}.{kind}",
           transpose=kind == "weight")
      for proj in ("q_proj", "k_proj", "v_proj", "out_proj") for kind in ("weight", "bias")),
    *(Rule(f"decoder.layers.{{i}}.{fc}.{kind}", f"decoder.layers.{{i}}.{fc}.{kind}", transpose=kind == "weight")
      for fc in ("fc1", "fc2") for kind in ("weight", "bias")),
    *(Rule(f"decoder.layers.{{i}}.{norm}.{kind}", f"decoder.layers.{{i}}.{norm}.{kind}")
      for norm in ("self_attn_layer_norm", "final_layer_norm") for kind in ("weight", "bias")),
    Rule("decoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"),
    Rule("decoder.final_layer_norm.bias", "decoder.final_layer_norm.bias"),
))

DECODERS = {"llama": LLAMA_DECODER, "qwen2": QWEN2_DECODER, "qwen3": QWEN3_DECODER, "opt": OPT_DECODER}


# ---- configs -----------------------------------------------------------------------------------
def lm_config_from_folder(path: str) -> LMConfig:
    """Read a local backbone folder's config.json into our LMConfig (path kept)."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{path}: no config.json in the language model folder")
    with open(config_file, encoding="utf-8") as f:
        raw = json.load(f)
    return lm_config_from_hf(raw, path, config_file)


# Config fields LMConfig cannot carry: a checkpoint that sets them would be rebuilt as a
# different network, so it is refused instead (value that is fine -> accepted values).
_UNSUPPORTED = {"rope_scaling": (None,), "attention_bias": (False,), "mlp_bias": (False,), "hidden_act": ("silu",),
                "use_sliding_window": (False,)}


def _rope_theta(raw: dict, source: str) -> float:
    """rope_theta of a 4.x config, or of transformers 5.x's rope_parameters (only the default rope)."""
    params = raw.get("rope_parameters")
    if params is None:
        return float(raw.get("rope_theta", 10000.0))
    if not isinstance(params, dict) or params.get("rope_type", "default") != "default":
        raise CheckpointError(f"{source}: rope_parameters={params!r} is not supported (only rope_type 'default')")
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def lm_config_from_hf(raw: dict, path: str, source: str) -> LMConfig:
    """A Hugging Face Qwen2/Llama/Qwen3/OPT config dict (transformers 4.x or 5.x) as our LMConfig."""
    family = raw.get("model_type", "")
    if family not in DECODERS:  # the families lm/adapter.py builds, each with its name table here
        raise CheckpointError(f"{source}: model_type {family!r} is not one of {sorted(DECODERS)}")
    if family == "opt":
        return _opt_lm_config(raw, path, source)
    for key, accepted in _UNSUPPORTED.items():
        if key in raw and raw[key] not in accepted:
            raise CheckpointError(f"{source}: {key}={raw[key]!r} is not supported (only {accepted[0]!r})")
    absent = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
              if k not in raw]
    if absent:
        raise CheckpointError(f"{source}: the language model config has no {', '.join(map(repr, absent))}")
    heads = raw["num_attention_heads"]
    # PaddleFormers' Llama and Qwen2 derive the head size from hidden_size; Qwen3 has its own field
    if family != "qwen3" and raw.get("head_dim") not in (None, raw["hidden_size"] // heads):
        raise CheckpointError(f"{source}: head_dim={raw['head_dim']!r} is not supported "
                              f"(only hidden_size / num_attention_heads = {raw['hidden_size'] // heads})")
    return LMConfig(
        family=family,
        path=path,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        rope_theta=_rope_theta(raw, source),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )


# OPT config fields lm/opt.py does not build otherwise (field -> the one value it builds), each
# with what a checkpoint that sets another value is.
_OPT_FIXED = {
    "do_layer_norm_before": (True, "post-LayerNorm layers, as OPT-350m has"),
    "activation_function": ("relu", "another MLP activation"),
    "enable_bias": (True, "projections without biases"),
    "layer_norm_elementwise_affine": (True, "LayerNorms without weights"),
    "_remove_final_layer_norm": (False, "no final LayerNorm (checkpoints from before transformers 4.20)"),
}


def _opt_lm_config(raw: dict, path: str, source: str) -> LMConfig:
    """An OPTConfig dict as our LMConfig; what lm/opt.py cannot build is refused by its field name."""
    for key, (value, meaning) in _OPT_FIXED.items():
        if key in raw and raw[key] != value:
            raise CheckpointError(f"{source}: OPT with {key}={raw[key]!r} ({meaning}) is not supported "
                                  f"(only {key}={value!r})")
    absent = [k for k in ("vocab_size", "hidden_size", "ffn_dim", "num_hidden_layers", "num_attention_heads")
              if k not in raw]
    if absent:
        raise CheckpointError(f"{source}: the language model config has no {', '.join(map(repr, absent))}")
    proj = raw.get("word_embed_proj_dim")
    if proj is not None and proj != raw["hidden_size"]:
        raise CheckpointError(f"{source}: OPT with word_embed_proj_dim={proj} != hidden_size={raw['hidden_size']} "
                              "(embeddings projected in and out, as OPT-350m has) is not supported")
    if raw["hidden_size"] % raw["num_attention_heads"]:
        raise CheckpointError(f"{source}: hidden_size {raw['hidden_size']} is not divisible by num_attention_heads "
                              f"{raw['num_attention_heads']}")
    heads = raw["num_attention_heads"]
    return LMConfig(family="opt", path=path, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
                    intermediate_size=raw["ffn_dim"], num_layers=raw["num_hidden_layers"], num_heads=heads,
                    num_kv_heads=heads, max_position_embeddings=raw.get("max_position_embeddings", 2048),
                    tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)))


def resolved_lm_config(cfg: LMConfig) -> LMConfig:
    """The config with the fields of a local folder filled in, so a saved run is self-describing."""
    if not cfg.path:
        return cfg
    loaded = lm_config_from_folder(cfg.path)
    return replace(loaded, attn_implementation=cfg.attn_implementation)

LM_HEAD = Table("lm-head", (Rule("lm_head.weight", "lm_head.weight"),))
TIED_LM_HEAD = Table("tied-lm-head", (), tied=("lm_head.weight",))
# transformers ties OPT's head over any lm_head.weight a checkpoint still holds (older saves wrote
# it): skipped, and kept aside by convert so export writes it back.
TIED_OPT_LM_HEAD = Table("tied-lm-head", (), ignore=("lm_head.weight",), tied=("lm_head.weight",))
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
    # transformers 4.57 writes no tie_word_embeddings for OPT (5.x does): OPT ties by default
    "opt": dict(vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=2048, tie_word_embeddings=True),
}


# ---- tables ------------------------------------------------------------------------------------
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
    head = (TIED_OPT_LM_HEAD if family == "opt" else TIED_LM_HEAD) if tie_word_embeddings else LM_HEAD
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
    if lm.family == "opt":
        return {
            "model_type": "opt", "vocab_size": lm.vocab_size, "hidden_size": lm.hidden_size,
            "word_embed_proj_dim": lm.hidden_size, "ffn_dim": lm.intermediate_size,
            "num_hidden_layers": lm.num_layers, "num_attention_heads": lm.num_heads,
            "max_position_embeddings": lm.max_position_embeddings, "do_layer_norm_before": True,
            "activation_function": "relu", "tie_word_embeddings": lm.tie_word_embeddings,
        }
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


# ---- loading -----------------------------------------------------------------------------------
_PICKLE_WEIGHTS = (".pdparams", ".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _require_safetensors(path: str) -> None:
    """Refuse a folder without safetensors weights rather than let PaddleFormers unpickle.

    PaddleFormers falls back to model_state.pdparams (read with pickle, which can run code
    from the file) when a folder has no safetensors; paddle_mm never takes that fallback.
    """
    names = os.listdir(path)
    if any(n.endswith(".safetensors") for n in names):
        return
    pickled = sorted(n for n in names if n.endswith(_PICKLE_WEIGHTS))
    found = f"; it holds {', '.join(pickled)}, a pickle format" if pickled else ""
    raise CheckpointError(
        f"{path}: no safetensors weights in the language model folder{found}. paddle_mm does not "
        "unpickle weights: convert them to safetensors first (for files you trust)"
    )


def _require_lm_folder(path: str) -> None:
    """The checks before a language model folder's weights are read (model.lm.path)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: language model folder does not exist")
    _require_safetensors(path)


def load_lm_folder(lm, folder: str) -> list[str]:
    """Fill a backbone built from the folder's (resolved) config with the folder's weights."""
    _require_lm_folder(folder)
    return load_causal_lm(lm, folder)


def load_language_model(cfg: LMConfig, special_ids: dict[str, int] | None = None):
    """The backbone of the local folder `cfg.path`: built from its config.json, then its weights loaded."""
    _require_lm_folder(cfg.path)
    # Built from our config fields, then filled through the explicit name table, so a run
    # rebuilt later from its saved config.json is the same network.
    lm = build_language_model(resolved_lm_config(cfg), special_ids)
    load_causal_lm(lm, cfg.path)
    return lm


def load_causal_lm(lm, folder: str, strict: bool = True) -> list[str]:
    """Load a Qwen2 / Llama / Qwen3 / OPT CausalLM folder in the Hugging Face layout into a model lm/ built."""
    raw = read_config(folder)
    source = f"{folder}/config.json"
    lm_family(raw, source)
    # the family's default when the file names none (OPT ties, and 4.57 writes no tie_word_embeddings for it)
    table = causal_lm_table(raw["model_type"], lm_config_from_hf(raw, folder, source).tie_word_embeddings)
    where = {k: path for k, (path, _) in tensor_index(folder).items()}
    return load_mapped(lm, read_tensors(folder), table, folder, where, strict)


# ---- the convert records -----------------------------------------------------------------------
def _causal_lm_family(name: str) -> Family:
    def table(raw: dict, layout: str, source: str) -> Table:
        if lm_family(raw, f"{source}/config.json") != name:
            raise CheckpointError(f"{source}/config.json: model_type {raw.get('model_type')!r} is not {name!r}")
        return causal_lm_table(name, bool(raw.get("tie_word_embeddings", False)), target_prefix="language_model.")

    def config(src: str) -> dict:
        cfg = lm_config_from_folder(src)
        cfg.path = ""  # the converted folder holds the weights itself
        return asdict(cfg)

    return Family(name, layout=lambda names, source: "causal-lm", table=table, config=config)


QWEN2 = _causal_lm_family("qwen2")
LLAMA = _causal_lm_family("llama")
