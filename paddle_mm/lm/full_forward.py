"""The uncached forward of PaddleFormers' Qwen2, Llama and Qwen3 backbones (training, scoring) in cheaper ops.

Why: in the bench's training step (benchmarks/profile_step.py --what train), two pieces of the
backbone's layers cost far more than their arithmetic, on Paddle 3.3.1's CPU kernels:
- RMSNorm's `pow(2)`: on [2, 321, 256], 3.45 ms forward and 7.3 ms with its gradient, against
  0.13 and 0.35 ms for `paddle.square` (the same products);
- rotate_half's two slices, negation and concat: 7.7 ms with gradients on [2, 4, 321, 64],
  against 0.65 ms for a matmul by the signed permutation that moves the halves (exact: one
  non-zero product per output).
Together with their gradients they were about a tenth of the step. Everything else is the
backbone's own: its mask construction, rotary tables, projections (called as modules, so LoRA
layers work), attention function and MLP, so hidden states match its forward within float
rounding (tests/lm/test_full_forward.py). Backbones this does not read (fused projections,
sliding-window layers, sequence or tensor parallelism, fused norms) keep their own forward.
"""
from __future__ import annotations

import functools

import paddle

_ROTATIONS: dict[tuple[int, str], paddle.Tensor] = {}


def rotate_half_matrix(dim: int, dtype) -> paddle.Tensor:
    """R with x @ R == concat([-x2, x1]) for x = concat([x1, x2]) along the last axis (one per size and dtype)."""
    key = (dim, str(dtype))
    if key not in _ROTATIONS:
        half = dim // 2
        r = paddle.zeros([dim, dim], dtype="float32")
        idx = paddle.arange(half)
        r[idx + half, idx] = -1.0  # output column j < half takes -x[j + half]
        r[idx, idx + half] = 1.0  # output column j >= half takes x[j - half]
        _ROTATIONS[key] = r.astype(dtype)
    return _ROTATIONS[key]


def supports(lm) -> bool:
    """Whether the backbone is one whose layers this forward reads as they are."""
    config = lm.config
    if config.__class__.__name__ not in ("Qwen2Config", "LlamaConfig", "Qwen3Config"):
        return False
    if getattr(config, "fuse_attention_qkv", False) or getattr(config, "fuse_attention_ffn", False) \
            or getattr(config, "sequence_parallel", False) or getattr(config, "fuse_rms_norm", False) \
            or (getattr(config, "tensor_model_parallel_size", 1) or 1) > 1:
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return False
    return all(hasattr(layer.self_attn, "q_proj") and hasattr(layer.input_layernorm, "variance_epsilon")
               for layer in lm.model.layers)


def _ones_row(n: int, dtype) -> paddle.Tensor:
    key = (-n, str(dtype))  # beside the rotations, negative keys for these
    if key not in _ROTATIONS:
        _ROTATIONS[key] = paddle.ones([1, n], dtype=dtype)
    return _ROTATIONS[key]


def rms_norm(norm, x):
    """PaddleFormers' RMSNorm layer `norm` on x, its formula with square for pow(2). The per-row
    factor is spread over the row by a matmul with a row of ones (exact: each product is by 1):
    a broadcast multiply [B, L, 1] x [B, L, D] and its gradient took 3.2 ms on CPU against 0.8."""
    with paddle.amp.auto_cast(False):
        variance = paddle.square(x.astype("float32")).mean(-1, keepdim=True)
        factor = paddle.rsqrt(variance + norm.variance_epsilon)
        out = paddle.matmul(factor, _ones_row(x.shape[-1], factor.dtype)) * x
    if norm.weight.dtype in (paddle.float16, paddle.bfloat16):
        out = paddle.cast(out, norm.weight.dtype)
    return out * norm.weight


def attention(attn, q, k, v, bias):
    """The math path of Paddle's CPU sdpa (scaled queries, + bias, softmax, dropout) in [B, H, L, d]
    throughout: grouped heads as a reshape of the queries, not repeated keys, and four transposes
    a layer instead of ten (a transpose's gradient is a strided copy, 3-5 ms each here). Also
    kv_decode's prompt pass. q [B, H, L, d], k and v [B, Hkv, L, d], bias [B or 1, 1 or H, L, L] -> [B, L, H * d]."""
    import paddle.nn.functional as F

    b, heads, length, d = q.shape
    kv_heads = k.shape[1]
    q = (q * attn.scaling).reshape([b, kv_heads, heads // kv_heads * length, d])
    scores = paddle.matmul(q, k, transpose_y=True).reshape([b, heads, length, length]) + bias
    weights = F.softmax(scores)
    if attn.training and attn.attention_dropout > 0.0:
        weights = F.dropout(weights, attn.attention_dropout, training=True, mode="upscale_in_train")
    out = paddle.matmul(weights.reshape([b, kv_heads, -1, length]), v)  # [B, Hkv, G * L, d]
    return out.reshape([b, heads, length, d]).transpose([0, 2, 1, 3]).reshape([b, length, heads * d])


def _layer(layer, x, mask, row_indices, bias, cos_q, sin_q, cos_k, sin_k):
    """One decoder layer: x [B, L, D] -> [B, L, D]. cos/sin: the rotary tables spread over the query
    and key heads ([B, H, L, d], same-shape multiplies); bias: the additive mask of `attention`, or
    None for the backbone's attention function (mask, row_indices)."""
    attn = layer.self_attn
    b, length = x.shape[0], x.shape[1]
    h = rms_norm(layer.input_layernorm, x)
    q = attn.q_proj(h).reshape([b, length, -1, attn.head_dim])
    k = attn.k_proj(h).reshape([b, length, -1, attn.head_dim])
    v = attn.v_proj(h).reshape([b, length, -1, attn.head_dim]).transpose([0, 2, 1, 3])
    if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before the rotation
        q, k = rms_norm(attn.q_norm, q), rms_norm(attn.k_norm, k)
    q, k = q.transpose([0, 2, 1, 3]), k.transpose([0, 2, 1, 3])
    dtype = q.dtype
    if attn.config.__class__.__name__ == "LlamaConfig":  # Llama rotates in float32, Qwen in the weights' dtype
        q, k = q.astype("float32"), k.astype("float32")
    rotate = rotate_half_matrix(attn.head_dim, q.dtype)
    q = (q * cos_q + paddle.matmul(q, rotate) * sin_q).astype(dtype)
    k = (k * cos_k + paddle.matmul(k, rotate) * sin_k).astype(dtype)
    if bias is not None:
        out = attention(attn, q, k, v, bias)
    else:
        from paddleformers.nn.attention.interface import ALL_ATTENTION_FUNCTIONS

        out, _ = ALL_ATTENTION_FUNCTIONS[attn.config._attn_implementation](
            attn, query=q, key=k, value=v, attention_mask=mask, attn_mask_startend_row_indices=row_indices,
            dropout=attn.attention_dropout if attn.training else 0.0, scaling=attn.scaling)
    x = x + attn.o_proj(out)
    return x + layer.mlp(rms_norm(layer.post_attention_layernorm, x))


def _additive_bias(config, mask, row_indices, x):
    """The mask as Paddle's CPU sdpa adds it (a boolean one as 0 / -inf), made once for all layers;
    None where the backbone's own attention function runs (other implementations, a GPU, no mask)."""
    if config._attn_implementation != "sdpa" or row_indices is not None or mask is None \
            or "cpu" not in str(x.place).lower():
        return None
    if mask.dtype == paddle.bool:
        mask = paddle.where(mask, paddle.zeros([], x.dtype), paddle.full([], -float("inf"), x.dtype))
    return spread_bias(mask, x.shape[0], config.num_attention_heads)


SPREAD_LIMIT = 1 << 28  # bytes: a larger mask is added by broadcast


def spread_bias(bias, batch: int, heads: int):
    """An additive mask [B or 1, 1, L, L] made [B, H, L, L] once, so each layer's add is same-shape
    (a broadcast add over the heads took 3x as long on CPU); kept as it is past SPREAD_LIMIT."""
    if bias.shape[1] == heads and bias.shape[0] == batch:
        return bias
    shape = [batch, heads] + list(bias.shape[2:])
    size = batch * heads * bias.shape[2] * bias.shape[3] * paddle.finfo(bias.dtype).bits // 8
    return bias.expand(shape) if size <= SPREAD_LIMIT else bias


def forward(lm, inputs_embeds, attention_mask, position_ids, attn_mask_startend_row_indices=None):
    """The backbone's last hidden state [B, L, D] for a whole sequence without a cache; the
    arguments as lm.model's forward takes them."""
    from paddleformers.transformers.masking_utils import create_causal_mask_and_row_indices

    model = lm.model
    b, length = inputs_embeds.shape[:2]
    mask, row_indices = create_causal_mask_and_row_indices(
        config=model.config, inputs_embeds=inputs_embeds, batch_size=b, seq_length=length, cache_length=0,
        attention_mask=attention_mask, attn_mask_startend_row_indices=attn_mask_startend_row_indices,
        prepare_decoder_attention_mask=model._prepare_decoder_attention_mask)
    bias = _additive_bias(model.config, mask, row_indices, inputs_embeds)
    cos, sin = model.rotary_emb(inputs_embeds, position_ids)
    attn = model.layers[0].self_attn
    spread = {n: (cos.unsqueeze(1).expand([b, n, length, -1]), sin.unsqueeze(1).expand([b, n, length, -1]))
              for n in {attn.num_heads, attn.num_key_value_heads}}
    tables = spread[attn.num_heads] + spread[attn.num_key_value_heads]
    recompute = model.config.recompute_granularity == "full" and model.config.recompute_method == "uniform" \
        and model.config.recompute_num_layers == 1
    x = inputs_embeds
    for layer in model.layers:
        if recompute and not x.stop_gradient:
            from paddle.distributed.fleet.utils import recompute as checkpoint

            x = checkpoint(functools.partial(_layer, layer), x, mask, row_indices, bias, *tables)
        else:
            x = _layer(layer, x, mask, row_indices, bias, *tables)
    return rms_norm(model.norm, x)
