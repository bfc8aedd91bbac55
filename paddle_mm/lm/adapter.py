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

# family -> (config class, model class) names in paddleformers.transformers
_FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def _classes(family: str):
    import paddleformers.transformers as pf  # heavy import: only when a backbone is built
    from paddleformers.nn.attention.interface import ALL_ATTENTION_FUNCTIONS
    from paddleformers.utils.log import logger

    logger.set_level("WARNING")  # it logs its loss settings at INFO on every model built
    ALL_ATTENTION_FUNCTIONS[PACKED_SDPA] = packed_sdpa

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
    # sdpa goes through packed_sdpa (below), which is PaddleFormers' sdpa for every call but packed rows.
    config._attn_implementation = PACKED_SDPA if cfg.attn_implementation == "sdpa" else cfg.attn_implementation
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

        lm = build_mrope_lm(cfg, special_ids, PACKED_SDPA if cfg.attn_implementation == "sdpa" else "")
        from paddleformers.nn.attention.interface import ALL_ATTENTION_FUNCTIONS  # after PaddleFormers' imports

        ALL_ATTENTION_FUNCTIONS[PACKED_SDPA] = packed_sdpa  # packed rows attend by sample here too
        return lm
    _, model_cls = _classes(cfg.family)
    return model_cls(backbone_config(cfg, special_ids))


PACKED_SDPA = "paddle_mm_sdpa"  # the attention implementation name sdpa backbones are built with


def packed_sdpa(module, query, key, value, attention_mask=None, attn_mask_startend_row_indices=None, **kwargs):
    """PaddleFormers' sdpa attention, except for packed rows: there each sample attends within
    itself only, its queries and keys gathered into a batch of samples ([S, longest sample]),
    so attention costs the sum of the samples' squared lengths, not rows x pack_length squared,
    and no dense [rows, 1, L, L] mask is built.

    Why not Paddle's own: on CPU, Paddle 3.3.1 has no variable-length attention kernel
    (flash_attn_unpadded and variable_length_memory_efficient_attention are not registered,
    flashmask_attention fails), and PaddleFormers' sdpa expands the row indices to a dense mask
    that it also marks causal, after which CPU attention ignores the mask (samples saw each
    other: measured). Exact: within a sample, its queries see the same keys as before; padding
    at the end of a shorter sample is after every real query and so never seen (causal).
    query [B, H, L, d], key and value [B, Hkv, L, d]; returns ([B, L, H * d], None).
    """
    from paddleformers.nn.attention.sdpa_attention import sdpa_attention_forward

    if attn_mask_startend_row_indices is None or attn_mask_startend_row_indices.shape[-1] != 1 \
            or attn_mask_startend_row_indices.shape[-2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, attn_mask_startend_row_indices,
                                      **kwargs)
    b, heads, length, d = query.shape
    flat_index, take, longest = _segments(attn_mask_startend_row_indices.numpy().reshape([b, length]))
    gather = paddle.to_tensor(flat_index)  # [S * longest] positions in [B * L]

    def segments(x):  # [B, h, L, d] -> [S, longest, h, d]
        h = x.shape[1]
        return paddle.gather(x.transpose([0, 2, 1, 3]).reshape([b * length, h, d]), gather).reshape([-1, longest, h, d])

    out = paddle.nn.functional.scaled_dot_product_attention(
        segments(query), segments(key), segments(value), causal_mask(longest), training=module.training)
    out = paddle.gather(out.reshape([-1, heads * d]), paddle.to_tensor(take))  # back to [B * L] order
    return out.reshape([b, length, heads * d]), None


def _segments(ends):
    """From [B, L] sample ends (row indices): for each sample s and offset t < longest, the flat
    position of its t-th token (its last token where it is shorter), and for each flat position,
    its place in that [S * longest] layout."""
    import numpy as np

    b, length = ends.shape
    starts = []  # (flat start, length) of each sample
    for row in range(b):
        col = 0
        while col < length:
            end = int(ends[row, col])
            end = min(max(end, col + 1), length)
            starts.append((row * length + col, end - col))
            col = end
    longest = max(n for _, n in starts)
    offsets = np.arange(longest)
    flat_index = np.concatenate([s + np.minimum(offsets, n - 1) for s, n in starts]).astype("int64")
    take = np.concatenate([k * longest + np.arange(n) for k, (_, n) in enumerate(starts)]).astype("int64")
    return flat_index, take, longest


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
    cols = paddle.arange(length, dtype="int32").reshape([1, 1, 1, length])
    return (cols <= rows) & (rows < row_indices.reshape([-1, 1, 1, length]))


def run_backbone(lm, inputs_embeds, attention_mask=None, past_key_values=None, use_cache=False,
                 position_ids=None, attn_mask_startend_row_indices=None, **extra):
    """Forward the backbone on embeddings, without the LM head; returns (hidden [B, L, D], cache or None).

    attention_mask covers the cached and the new positions ([B, past + L]). Packed rows pass
    attn_mask_startend_row_indices ([B, 1, L, 1]: for each key column, the first query row
    that may not see it) and their own position_ids instead; with attn_implementation
    "flashmask" (GPU) the backbone's variable-length kernel reads them directly, with the
    others they become a dense [B, 1, L, L] mask here. extra: further inputs of the backbone's
    forward (Qwen3-VL's DeepStack features).
    """
    b, length = inputs_embeds.shape[:2]
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    kwargs = dict(extra)
    if attn_mask_startend_row_indices is not None:
        if lm.config._attn_implementation in ("flashmask", PACKED_SDPA):  # they read the row indices themselves
            kwargs["attn_mask_startend_row_indices"] = attn_mask_startend_row_indices
        else:
            attention_mask = dense_mask_from_row_indices(attn_mask_startend_row_indices)
    elif attention_mask is None:
        attention_mask = paddle.ones([b, past + length], dtype="int64")
    if position_ids is None:
        position_ids = position_ids_from_mask(
            attention_mask if attention_mask is not None else paddle.ones([b, past + length], dtype="int64"), past)
    if attention_mask is not None and attention_mask.ndim == 2 and past == 0 and length > 1 \
            and lm.config._attn_implementation in ("sdpa", PACKED_SDPA) and bool(attention_mask.astype("bool").all()):
        # No padding: on CPU, Paddle 3.3.1's sdpa builds a [B, H, L, L] triu mask in every layer
        # for a causal call without a mask (profiled); one causal mask per length does instead.
        attention_mask = causal_mask(length)
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
