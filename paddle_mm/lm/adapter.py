"""The one adapter over PaddleFormers causal LMs (Qwen2, Llama, Qwen3).

Everything family-specific about the backbone lives here: which classes build it, how its
config fields are named, and how its forward is called. The rest of paddle_mm only calls
`build_language_model` and `run_language_model`.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace

import paddle

from paddle_mm.config import LMConfig
from paddle_mm.errors import CheckpointError

# family -> (config class, model class) names in paddleformers.transformers
_FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def _classes(family: str):
    import paddleformers.transformers as pf  # heavy import: only when a backbone is built
    from paddleformers.utils.log import logger

    logger.set_level("WARNING")  # it logs its loss settings at INFO on every model built

    config_name, model_name = _FAMILIES[family]
    return getattr(pf, config_name), getattr(pf, model_name)


def backbone_config(cfg: LMConfig, special_ids: dict[str, int] | None = None):
    """A PaddleFormers config for a backbone built from scratch."""
    config_cls, _ = _classes(cfg.family)
    ids = special_ids or {}
    config = config_cls(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        # generate() from inputs_embeds needs a bos id in PaddleFormers 1.0.0 (see DESIGN.md).
        bos_token_id=ids.get("bos", ids.get("eos", 0)),
        eos_token_id=ids.get("eos", 0),
        pad_token_id=ids.get("pad", 0),
    )
    config._attn_implementation = cfg.attn_implementation
    return config


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


def lm_config_from_hf(raw: dict, path: str, source: str) -> LMConfig:
    """A Hugging Face Qwen2/Llama/Qwen3 config dict as our LMConfig."""
    family = raw.get("model_type", "")
    if family not in _FAMILIES:
        raise CheckpointError(f"{source}: model_type {family!r} is not one of {sorted(_FAMILIES)}")
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
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )


def build_language_model(cfg: LMConfig, special_ids: dict[str, int] | None = None):
    """Build the backbone from the config fields, or load it from the local folder `cfg.path`."""
    _, model_cls = _classes(cfg.family)
    if not cfg.path:
        return model_cls(backbone_config(cfg, special_ids))
    if not os.path.isdir(cfg.path):
        raise CheckpointError(f"{cfg.path}: language model folder does not exist")
    _require_safetensors(cfg.path)
    from paddle_mm.weights.llm import load_causal_lm

    # Built from our config fields, then filled through the explicit name table, so a run
    # rebuilt later from its saved config.json is the same network.
    model = model_cls(backbone_config(resolved_lm_config(cfg), special_ids))
    load_causal_lm(model, cfg.path)
    return model


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


def enable_recompute(lm) -> None:
    """Recompute every decoder layer in backward (PaddleFormers 1.0.0 does it per layer only
    for this combination of settings, in Qwen2, Llama and Qwen3 alike)."""
    lm.config.recompute_granularity = "full"
    lm.config.recompute_method = "uniform"
    lm.config.recompute_num_layers = 1


def resolved_lm_config(cfg: LMConfig) -> LMConfig:
    """The config with the fields of a local folder filled in, so a saved run is self-describing."""
    if not cfg.path:
        return cfg
    loaded = lm_config_from_folder(cfg.path)
    return replace(loaded, attn_implementation=cfg.attn_implementation)


def position_ids_from_mask(attention_mask: paddle.Tensor, past_length: int = 0) -> paddle.Tensor:
    """Positions that skip padding: the k-th real token of a row gets position k.

    PaddleFormers' Qwen2 does not derive positions from the cache length, so cached decoding
    gives wrong logits unless positions are passed explicitly (measured here).
    """
    pos = paddle.cumsum(attention_mask.astype("int64"), axis=-1) - 1
    pos = paddle.clip(pos, min=0)
    return pos[:, past_length:]


def dense_mask_from_row_indices(row_indices: paddle.Tensor) -> paddle.Tensor:
    """[B, 1, L, 1] first-hidden-row indices -> a boolean causal mask [B, 1, L, L] (True: may attend).

    Built here because PaddleFormers 1.0.0's own expansion, on the sdpa path, also sets
    is_causal, and Paddle 3.3.1's CPU attention then ignores the mask: packed samples saw
    each other (measured).
    """
    length = row_indices.shape[2]
    rows = paddle.arange(length, dtype="int32").reshape([1, 1, length, 1])
    cols = paddle.arange(length, dtype="int32").reshape([1, 1, 1, length])
    return (cols <= rows) & (rows < row_indices.reshape([-1, 1, 1, length]))


def run_language_model(lm, inputs_embeds, attention_mask=None, past_key_values=None, use_cache=False,
                       position_ids=None, attn_mask_startend_row_indices=None, last_only: bool = False):
    """Forward the backbone on embeddings; returns (logits [B, L, V], cache or None).

    attention_mask covers the cached and the new positions ([B, past + L]). Packed rows pass
    attn_mask_startend_row_indices ([B, 1, L, 1]: for each key column, the first query row
    that may not see it) and their own position_ids instead; with attn_implementation
    "flashmask" (GPU) the backbone's variable-length kernel reads them directly, with the
    others they become a dense [B, 1, L, L] mask here.

    last_only: logits of the last position only ([B, 1, V]), what decoding reads. The vocabulary
    projection of a whole 265-token prompt was a third of 32 greedy steps (profiled).
    """
    b, length = inputs_embeds.shape[:2]
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    kwargs = {}
    if attn_mask_startend_row_indices is not None:
        if lm.config._attn_implementation == "flashmask":
            kwargs["attn_mask_startend_row_indices"] = attn_mask_startend_row_indices
        else:
            attention_mask = dense_mask_from_row_indices(attn_mask_startend_row_indices)
    elif attention_mask is None:
        attention_mask = paddle.ones([b, past + length], dtype="int64")
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask, past)
    out = (lm.model if last_only else lm)(
        input_ids=None,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=use_cache,
        return_dict=True,
        **kwargs,
    )
    logits = lm.lm_head(out.last_hidden_state[:, -1:]) if last_only else out.logits
    return logits, (out.past_key_values if use_cache else None)
