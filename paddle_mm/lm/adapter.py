"""The one adapter over the causal LMs: PaddleFormers' Qwen2, Llama, Qwen3, its M-RoPE text models
(lm/mrope.py: Qwen2-VL's and Qwen3-VL's), and our own OPT (lm/opt.py).

Everything family-specific about building and running the backbone lives here: which classes
build it, how its config fields are named, and how its forward is called. OPT, which
PaddleFormers 1.0 lacks, is built by lm/opt.py with the same forward and the same pieces, so
the running code below is shared. The rest of paddle_mm
only calls `build_language_model`, `run_backbone` and `run_language_model`. This module only builds: reading a
checkpoint folder's config.json and weights is weights/llm.py's (lm/ imports nothing from weights/).
"""
from __future__ import annotations

import paddle

from paddle_mm.config import LMConfig
from paddle_mm.lm import full_forward

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
        # generate() from inputs_embeds needs a bos id in PaddleFormers 1.0.0 (docs/ARCHITECTURE.md).
        bos_token_id=ids.get("bos", ids.get("eos", 0)),
        eos_token_id=ids.get("eos", 0),
        pad_token_id=ids.get("pad", 0),
    )
    config._attn_implementation = cfg.attn_implementation
    return config


def build_language_model(cfg: LMConfig, special_ids: dict[str, int] | None = None):
    """Build the backbone from the config fields alone; cfg.path is not read here.

    A backbone from a local folder is built from the folder's config, already filled in by
    weights/pretrained.resolved_model_config, and its weights are loaded after building by
    weights/pretrained.load_pretrained_parts (loading draws no random numbers).
    """
    if cfg.family == "opt":
        from paddle_mm.lm.opt import build_opt

        return build_opt(cfg, special_ids)
    if cfg.family in ("qwen2_vl", "qwen3_vl"):
        from paddle_mm.lm.mrope import build_mrope_lm

        return build_mrope_lm(cfg, special_ids)
    _, model_cls = _classes(cfg.family)
    return model_cls(backbone_config(cfg, special_ids))


def enable_recompute(lm) -> None:
    """Recompute every decoder layer in backward (PaddleFormers 1.0.0 does it per layer only
    for this combination of settings, in Qwen2, Llama and Qwen3 alike; lm/opt.py reads the same)."""
    lm.config.recompute_granularity = "full"
    lm.config.recompute_method = "uniform"
    lm.config.recompute_num_layers = 1


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
    return causal_mask(length) & (rows < row_indices.reshape([-1, 1, 1, length]))


def run_backbone(lm, inputs_embeds, attention_mask=None, past_key_values=None, use_cache=False,
                 position_ids=None, attn_mask_startend_row_indices=None, **extra):
    """Forward the backbone on embeddings, without the LM head; returns (hidden [B, L, D], cache or None).

    attention_mask covers the cached and the new positions ([B, past + L]). Packed rows pass
    attn_mask_startend_row_indices ([B, 1, L, 1]: for each key column, the first query row
    that may not see it) and their own position_ids instead; with attn_implementation
    "flashmask" (GPU) the backbone's variable-length kernel reads them directly; on CPU with
    sdpa, the Qwen2, Llama and Qwen3 layers attend sample by sample (full_forward.Segments);
    otherwise they become a dense [B, 1, L, L] mask here. extra: further inputs of the backbone's
    forward (Qwen3-VL's DeepStack features). Without a cache, the Qwen2, Llama and Qwen3
    layers run through lm/full_forward.py (the same arithmetic in cheaper ops).
    """
    b, length = inputs_embeds.shape[:2]
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    kwargs = dict(extra)
    uncached = past_key_values is None and not use_cache and not extra and full_forward.supports(lm)
    if attn_mask_startend_row_indices is not None:
        if lm.config._attn_implementation == "flashmask":
            kwargs["attn_mask_startend_row_indices"] = attn_mask_startend_row_indices
        elif uncached and position_ids is not None and full_forward.attends_by_segments(lm, inputs_embeds):
            segments = full_forward.Segments(attn_mask_startend_row_indices, lm.config.num_attention_heads,
                                             inputs_embeds.dtype)
            return full_forward.forward(lm, inputs_embeds, None, position_ids, segments=segments), None
        else:
            attention_mask = dense_mask_from_row_indices(attn_mask_startend_row_indices)
    elif attention_mask is None:
        attention_mask = paddle.ones([b, past + length], dtype="int64")
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask, past)
    if attention_mask.ndim == 2 and past == 0 and length > 1 and lm.config._attn_implementation == "sdpa" \
            and bool(attention_mask.astype("bool").all()):
        # No padding: on CPU, Paddle 3.3.1's sdpa builds a [B, H, L, L] triu mask in every layer
        # for a causal call without a mask (profiled); one causal mask per length does instead.
        attention_mask = causal_mask(length)
    if uncached:
        return full_forward.forward(lm, inputs_embeds, attention_mask, position_ids,
                                    kwargs.get("attn_mask_startend_row_indices")), None
    out = lm.model(
        input_ids=None,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=use_cache,
        return_dict=True,
        **kwargs,
    )
    return out.last_hidden_state, (out.past_key_values if use_cache else None)


_CAUSAL_MASKS: dict[int, paddle.Tensor] = {}


def causal_mask(length: int) -> paddle.Tensor:
    """A boolean [1, 1, L, L] lower-triangular mask (True: may attend), built once per length."""
    if length not in _CAUSAL_MASKS:
        if len(_CAUSAL_MASKS) > 64:  # lengths vary from batch to batch: keep the cache small
            _CAUSAL_MASKS.clear()
        rows = paddle.arange(length, dtype="int32").reshape([1, 1, length, 1])
        cols = paddle.arange(length, dtype="int32").reshape([1, 1, 1, length])
        _CAUSAL_MASKS[length] = cols <= rows
    return _CAUSAL_MASKS[length]


def run_language_model(lm, inputs_embeds, attention_mask=None, past_key_values=None, use_cache=False,
                       position_ids=None, attn_mask_startend_row_indices=None, last_only: bool = False, **extra):
    """run_backbone, then the LM head; returns (logits [B, L, V], cache or None).

    last_only: logits of the last position only ([B, 1, V]), what decoding reads. The vocabulary
    projection of a whole 265-token prompt was a third of 32 greedy steps (profiled).
    """
    hidden, cache = run_backbone(lm, inputs_embeds, attention_mask, past_key_values, use_cache, position_ids,
                                 attn_mask_startend_row_indices, **extra)
    return lm.lm_head(hidden[:, -1:] if last_only else hidden), cache
