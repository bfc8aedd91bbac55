"""The uncached forward of PaddleFormers' Qwen2, Llama and Qwen3 backbones (training, scoring) in cheaper ops.

Why: in the bench's training step (benchmarks/profile_step.py --what train), two pieces of the
backbone's layers cost far more than their arithmetic, on Paddle 3.3.1's CPU kernels:
- RMSNorm's `pow(2)`: on [2, 321, 256], 3.45 ms forward and 7.3 ms with its gradient, against
  0.13 and 0.35 ms for `paddle.square` (the same products);
- rotate_half's two slices, negation and concat: 7.7 ms with gradients on [2, 4, 321, 64],
  against 0.65 ms for a matmul by the signed permutation that moves the halves (exact: one
  non-zero product per output).
Together with their gradients they were about a tenth of the step. Then, on CPU with the sdpa
implementation, the attention itself: Paddle's CPU sdpa moves q, k, v to [B, L, H, d] and back
(ten transposes a layer, each a strided copy in backward) and adds a [B, 1, L, L] mask by
broadcast in every layer; `attention` keeps [B, H, L, d] and adds a mask made additive and
spread over the heads once per forward. Everything else is the backbone's own: its mask
construction, rotary tables, projections (called as modules, so LoRA layers work), MLP, and its
attention function elsewhere (a GPU, other implementations), so hidden states match its forward
within float rounding (tests/lm/test_full_forward.py). Backbones this does not read (fused
projections, sliding-window layers, sequence or tensor parallelism, fused norms) keep their own
forward.
"""
from __future__ import annotations

import functools

import paddle

from paddle_mm.runtime import on_cpu, scale_columns

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
    return scale_columns(out, norm.weight)  # the gain's gradient by a matmul on CPU


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


def _layer(layer, x, mask, row_indices, bias, cos_q, sin_q, cos_k, sin_k, segments=None):
    """One decoder layer: x [B, L, D] -> [B, L, D]. cos/sin: the rotary tables spread over the query
    and key heads ([B, H, L, d], same-shape multiplies; [B, L, H, d] with segments); bias: the
    additive mask of `attention`, or None for the backbone's attention function (mask,
    row_indices); segments: packed rows' samples attended one by one (`Segments`)."""
    attn = layer.self_attn
    b, length = x.shape[0], x.shape[1]
    h = rms_norm(layer.input_layernorm, x)
    q = attn.q_proj(h).reshape([b, length, -1, attn.head_dim])
    k = attn.k_proj(h).reshape([b, length, -1, attn.head_dim])
    v = attn.v_proj(h).reshape([b, length, -1, attn.head_dim])
    if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before the rotation
        q, k = rms_norm(attn.q_norm, q), rms_norm(attn.k_norm, k)
    if segments is None:  # [B, H, L, d]; segments gather tokens from [B, L, H, d]
        q, k, v = q.transpose([0, 2, 1, 3]), k.transpose([0, 2, 1, 3]), v.transpose([0, 2, 1, 3])
    dtype = q.dtype
    if attn.config.__class__.__name__ == "LlamaConfig":  # Llama rotates in float32, Qwen in the weights' dtype
        q, k = q.astype("float32"), k.astype("float32")
    rotate = rotate_half_matrix(attn.head_dim, q.dtype)
    q = (q * cos_q + paddle.matmul(q, rotate) * sin_q).astype(dtype)
    k = (k * cos_k + paddle.matmul(k, rotate) * sin_k).astype(dtype)
    if segments is not None:
        out = segments.attention(attn, q, k, v)
    elif bias is not None:
        out = attention(attn, q, k, v, bias)
    else:
        from paddleformers.nn.attention.interface import ALL_ATTENTION_FUNCTIONS

        out, _ = ALL_ATTENTION_FUNCTIONS[attn.config._attn_implementation](
            attn, query=q, key=k, value=v, attention_mask=mask, attn_mask_startend_row_indices=row_indices,
            dropout=attn.attention_dropout if attn.training else 0.0, scaling=attn.scaling)
    x = x + attn.o_proj(out)
    return x + layer.mlp(rms_norm(layer.post_attention_layernorm, x))


class Segments:
    """Packed rows' attention sample by sample, instead of over the whole row with a dense mask.

    A packed row of L tokens attended at once costs L x L scores per head (and as much again in
    softmax and gradients), most of them masked: its samples see only themselves. Here each
    sample's tokens are gathered into a batch of samples of similar length (a new group begins
    where a sample is at most half the group's longest), each group attends with its own causal
    and key-padding mask, and the outputs are gathered back into row order: the scores cost the
    sum of the samples' squares instead of the rows'. The softmax runs over the same keys, so the
    result is the dense mask's up to float rounding. No Paddle CPU kernel attends variable-length
    samples (flash_attn_unpadded and flashmask are GPU kernels).
    """

    def __init__(self, row_indices, heads: int, dtype):
        """row_indices [B, 1, L, 1] (data/packing.py: for key column j, the end of j's sample)."""
        import numpy as np

        ends = row_indices.numpy().reshape(row_indices.shape[0], row_indices.shape[2])
        b, length = ends.shape
        spans = []  # (flat start, token count)
        for r in range(b):
            start = 0
            while start < length:
                end = int(ends[r, start])
                if not start < end <= length or (ends[r, start:end] != end).any():
                    raise ValueError(f"packed row {r}: column {start}'s sample ends at {end}, which is not the "
                                     f"end of a run of columns that all end there")
                spans.append((r * length + start, end - start))
                start = end
        spans.sort(key=lambda span: -span[1])
        self.groups, order = [], []
        i = 0
        while i < len(spans):
            width = spans[i][1]
            j = i
            while j < len(spans) and 2 * spans[j][1] > width:
                j += 1
            members = spans[i:j]
            t = np.arange(width)
            # Padding slots read the sample's first token; they are masked as keys and dropped as queries.
            gather = np.array([start + np.where(t < n, t, 0) for start, n in members], dtype="int64")
            valid = np.concatenate([k * width + t[:n] for k, (_, n) in enumerate(members)]).astype("int64")
            keys = paddle.to_tensor(np.array([t < n for _, n in members])).reshape([len(members), 1, 1, width])
            rows = paddle.arange(width, dtype="int32")  # adapter.causal_mask's: adapter imports this module
            bias = _additive((rows.reshape([1, 1, width, 1]) >= rows.reshape([1, 1, 1, width])) & keys, dtype)
            self.groups.append((paddle.to_tensor(gather.reshape(-1)), paddle.to_tensor(valid),
                                spread_bias(bias, len(members), heads), len(members), width))
            order.append(gather.reshape(-1)[valid])
            i = j
        self.batch, self.length = b, length
        self.inverse = paddle.to_tensor(np.argsort(np.concatenate(order)).astype("int64"))

    def attention(self, attn, q, k, v):
        """q [B, L, H, d], k and v [B, L, Hkv, d] -> [B, L, H * d], each sample attending to itself."""
        d = q.shape[-1]
        flat = [t.reshape([self.batch * self.length, t.shape[2], d]) for t in (q, k, v)]
        outs = []
        for gather, valid, bias, count, width in self.groups:
            qs, ks, vs = (paddle.gather(t, gather).reshape([count, width, t.shape[1], d]).transpose([0, 2, 1, 3])
                          for t in flat)
            out = attention(attn, qs, ks, vs, bias)  # [S, W, H * d]
            outs.append(paddle.gather(out.reshape([count * width, -1]), valid))
        out = paddle.gather(paddle.concat(outs) if len(outs) > 1 else outs[0], self.inverse)
        return out.reshape([self.batch, self.length, -1])


def _additive_bias(config, mask, row_indices, x):
    """The mask as Paddle's CPU sdpa adds it (a boolean one as 0 / -inf), made once for all layers;
    None where the backbone's own attention function runs (other implementations, a GPU, no mask)."""
    if config._attn_implementation != "sdpa" or row_indices is not None or mask is None \
            or not on_cpu(x):
        return None
    if mask.dtype == paddle.bool:
        mask = _additive(mask, x.dtype)
    return spread_bias(mask, x.shape[0], config.num_attention_heads)


def _additive(keep, dtype):
    """A boolean mask (True: may attend) as the 0 / -inf one `attention` adds."""
    return paddle.where(keep, paddle.zeros([], dtype), paddle.full([], -float("inf"), dtype))


SPREAD_LIMIT = 1 << 28  # bytes: a larger mask is added by broadcast


def spread_bias(bias, batch: int, heads: int):
    """An additive mask [B or 1, 1, L, L] made [B, H, L, L] once, so each layer's add is same-shape
    (a broadcast add over the heads took 3x as long on CPU); kept as it is past SPREAD_LIMIT."""
    if bias.shape[1] == heads and bias.shape[0] == batch:
        return bias
    shape = [batch, heads] + list(bias.shape[2:])
    size = batch * heads * bias.shape[2] * bias.shape[3] * paddle.finfo(bias.dtype).bits // 8
    return bias.expand(shape) if size <= SPREAD_LIMIT else bias


def forward(lm, inputs_embeds, attention_mask, position_ids, attn_mask_startend_row_indices=None,
            segments: Segments | None = None):
    """The backbone's last hidden state [B, L, D] for a whole sequence without a cache; the
    arguments as lm.model's forward takes them, or packed rows as `Segments` (with position_ids)."""
    from paddleformers.transformers.masking_utils import create_causal_mask_and_row_indices

    model = lm.model
    b, length = inputs_embeds.shape[:2]
    mask = row_indices = bias = None
    if segments is None:
        mask, row_indices = create_causal_mask_and_row_indices(
            config=model.config, inputs_embeds=inputs_embeds, batch_size=b, seq_length=length, cache_length=0,
            attention_mask=attention_mask, attn_mask_startend_row_indices=attn_mask_startend_row_indices,
            prepare_decoder_attention_mask=model._prepare_decoder_attention_mask)
        bias = _additive_bias(model.config, mask, row_indices, inputs_embeds)
    cos, sin = model.rotary_emb(inputs_embeds, position_ids)
    attn = model.layers[0].self_attn
    # The tables in the layout the layer rotates in: [B, H, L, d], or [B, L, H, d] for segments.
    axis, shape = (1, lambda n: [b, n, length, -1]) if segments is None else (2, lambda n: [b, length, n, -1])
    spread = {n: (cos.unsqueeze(axis).expand(shape(n)), sin.unsqueeze(axis).expand(shape(n)))
              for n in {attn.num_heads, attn.num_key_value_heads}}
    tables = spread[attn.num_heads] + spread[attn.num_key_value_heads]
    recompute = model.config.recompute_granularity == "full" and model.config.recompute_method == "uniform" \
        and model.config.recompute_num_layers == 1
    x = inputs_embeds
    for layer in model.layers:
        if recompute and not x.stop_gradient:
            from paddle.distributed.fleet.utils import recompute as checkpoint

            x = checkpoint(functools.partial(_layer, layer), x, mask, row_indices, bias, *tables, segments)
        else:
            x = _layer(layer, x, mask, row_indices, bias, *tables, segments)
    return rms_norm(model.norm, x)


def attends_by_segments(lm, x) -> bool:
    """Whether packed rows of a backbone this forward `supports` go through `Segments` (Paddle's CPU
    sdpa; flashmask reads them on GPU). run_backbone has checked supports() already."""
    return lm.config._attn_implementation == "sdpa" and on_cpu(x)
