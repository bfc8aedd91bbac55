"""Decode steps over a preallocated KV cache, for PaddleFormers' Qwen2, Llama and Qwen3 backbones.

Why: on CPU a small model's decode step is mostly per-op dispatch, and PaddleFormers' step
grows every layer's cache with a concat (a quarter of the CPU time of 32 greedy tokens,
profiled: `concat` 577 calls) and runs rotary, masking and attention through generic
helpers. Here the prompt (`prefill`) and then each new token (`step`) run the backbone's
arithmetic on buffers sized for the whole answer, with fewer ops:
- the new key and value are written in place at the next column; columns not yet written
  and left padding are masked with the same additive minimum PaddleFormers uses, so the
  softmax sees exactly the columns it saw before;
- rotate_half is a matmul by a fixed signed permutation (exact: one non-zero product per
  output), not two slices, a negation and a concat;
- grouped-query heads are a reshape of the queries, not a repeat of the keys;
- RMSNorm is Paddle's fused kernel (one op instead of six: 20% less CPU time per step at
  batch 1, measured), the same formula (float32 variance, rsqrt, weight).
The rest of every layer is PaddleFormers' own (its rotary tables, activation and projections
are called as they are), so greedy tokens are the same as on its path;
tests/lm/test_kv_decode.py checks logits (<= 1e-5) and tokens against it.

Rows may leave (`keep`) and join (`merged`) between steps, for continuous batching
(decoding.RunningBatch): buffers are aligned on the column the next token goes to, a shorter
history padded on the left with masked columns, and columns no row attends any more are dropped.

Backbones this does not cover (OPT, LoRA-wrapped layers, sliding-window attention, flashmask)
keep the backbone's own cached step (`supports`).
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import _C_ops
from paddle.incubate.nn.functional import fused_rms_norm

from paddle_mm.lm.full_forward import attention, rotate_half_matrix, spread_bias

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def supports(lm) -> bool:
    """Whether the backbone's layers are the plain PaddleFormers decoder layers this reads."""
    config = lm.config
    if config.__class__.__name__ not in ("Qwen2Config", "LlamaConfig", "Qwen3Config"):
        return False
    if config._attn_implementation not in ("sdpa", "eager") or getattr(config, "fuse_attention_qkv", False) \
            or getattr(config, "fuse_attention_ffn", False):
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return False
    for layer in lm.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        parts = [getattr(attn, n) for n in _PROJECTIONS] + [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if any(not isinstance(p, paddle.nn.Linear) or hasattr(p, "lora_A") for p in parts):
            return False
        if getattr(mlp, "fuse_swiglu", False) or getattr(mlp, "fuse_up_gate", False):  # _mlp is the plain form
            return False
        if not all(hasattr(n, "variance_epsilon") for n in (layer.input_layernorm, layer.post_attention_layernorm)):
            return False
    rope_type = getattr(lm.model.rotary_emb, "rope_type", "default")
    if not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope":
        return False  # their frequencies follow the longest position asked for: no fixed table
    return True


def _rms_norm(norm, x):
    """PaddleFormers' RMSNorm layer `norm` applied to x, by Paddle's fused kernel (no backward needed)."""
    return fused_rms_norm(x, norm.weight, None, norm.variance_epsilon, x.ndim - 1)[0]


def _linear(layer, x):
    """A plain nn.Linear. A decode step's one position per row goes straight to the kernel F.linear
    calls, without its per-call flag lookups (a third of a Linear call's time at this size,
    profiled); a prompt's positions go through the layer's own forward, which the models'
    constructors make one addmm on CPU (runtime.cpu_linears: Paddle's linear adds the bias after
    the product with a broadcast add, 1.3 ms of 3.6 over [1028, 768])."""
    if x.shape[1] == 1:
        return _C_ops.linear(x, layer.weight, layer.bias)
    return layer(x)


def _mlp(mlp, x):
    """PaddleFormers' gated MLP, down(act(gate(x)) * up(x)), through _linear."""
    return _linear(mlp.down_proj, mlp.act_fn(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))


def _lm_head(lm, x):
    """Logits [B, 1, V] of x [B, 1, D]. For more than one row, PaddleFormers' LMHead product
    x W^T (W [V, D]) is taken as (W x^T)^T: MKL's SGEMM ran it in 2.6 against 3.6 ms at 4 rows
    and 2.4 against 4.9 at 8 (the bench's V = 32000, D = 256; the same at one row). The same
    products, summed in another order (logits agree within float rounding)."""
    head = lm.lm_head
    b = x.shape[0]
    if b == 1 or type(head).__name__ != "LMHead" or head.use_bias or head.vocab_parallel:
        return head(x)
    return paddle.matmul(head.weight, x.reshape([b, -1]), transpose_y=True).T.reshape([b, 1, -1])


class PreallocatedDecoder:
    """Holds the KV buffers of one generation; `step(embeds)` gives the next position's logits."""

    def __init__(self, lm, mask, max_new_tokens: int, dtype):
        """The attention bias for a prompt of mask's [B, L] (its padding) and max_new_tokens more;
        `prefill` makes the KV buffers, each layer's prompt keys and values followed by free columns."""
        self.lm = lm
        self.layers = list(lm.model.layers)
        attn = self.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_key_value_heads, attn.head_dim
        self.scaling = attn.scaling
        b, length = mask.shape
        capacity = length + max_new_tokens
        self.keys: list = []
        self.values: list = []
        minimum = paddle.finfo(dtype).min
        bias = paddle.full([b, 1, 1, capacity], minimum, dtype=dtype)
        bias[:, 0, 0, :length] = paddle.where(mask.astype("bool"), paddle.zeros([], dtype), paddle.full([], minimum, dtype))
        self.bias = bias  # [B, 1, 1, capacity]: 0 where a row may attend
        self.filled = 0  # columns written
        self.positions = mask.astype("int64").sum(axis=-1, keepdim=True)  # [B, 1]: the next token's position
        self.rotate = rotate_half_matrix(self.head_dim, dtype)
        self._cos = self._sin = None  # [P, d]: the backbone's rotary tables for positions 0..P-1

    def _rotary(self, x, positions, need: int):
        """cos, sin [B, 1, n, d] at positions [B, n] (all below `need`): rows of tables the backbone's
        rotary_emb made once (each position's angle is a single product, so a row is what a call at
        that position gives), instead of a call per step."""
        if self._cos is None or self._cos.shape[0] < need:
            size = max(need, 2 * (0 if self._cos is None else self._cos.shape[0]), 64)
            cos, sin = self.lm.model.rotary_emb(x, paddle.arange(size, dtype="int64").unsqueeze(0))
            self._cos, self._sin = cos[0], sin[0]
        b, n = positions.shape
        flat = positions.reshape([-1])
        return (paddle.gather(self._cos, flat).reshape([b, 1, n, -1]),
                paddle.gather(self._sin, flat).reshape([b, 1, n, -1]))

    @classmethod
    def prefill(cls, lm, embeds, mask, max_new_tokens: int):
        """Run the prompt (embeds [B, L, D], left-padded mask [B, L]) with the steps' arithmetic,
        its keys and values written straight into the buffers: (decoder, last position's logits
        [B, 1, V]). Against the backbone's own prompt pass (profiled, a tiny model's batch of 4 x 39
        tokens: 40 ms, a quarter of it in `pow` and broadcast multiplies of its RMSNorm and rotary,
        and the cache's concats), the same figures within float rounding."""
        from paddle_mm.lm.adapter import causal_mask, position_ids_from_mask

        dec = cls(lm, mask, max_new_tokens, embeds.dtype)
        b, length = mask.shape
        cos, sin = dec._rotary(embeds, position_ids_from_mask(mask), length)  # [B, 1, L, d]
        # Spread over the heads once: a broadcast multiply is 20x a same-shape one on CPU (full_forward.py).
        tables = [t.expand([b, n, length, dec.head_dim]) for n in (dec.heads, dec.kv_heads) for t in (cos, sin)]
        keep = causal_mask(length) & mask.astype("bool").reshape([b, 1, 1, length])  # [B, 1, L, L]
        minimum = paddle.finfo(embeds.dtype).min
        bias = spread_bias(paddle.where(keep, paddle.zeros([], embeds.dtype), paddle.full([], minimum, embeds.dtype)),
                           b, dec.heads)
        x = embeds
        # Free columns after the prompt's: a concat, not a write into zeros (set_value took 1.1 ms a
        # layer for the bench's 4 x 265-token prompt, the concat a fraction of it).
        free = paddle.zeros([b, dec.kv_heads, max_new_tokens, dec.head_dim], dtype=embeds.dtype)
        for layer in dec.layers:
            q, k, v = dec._rotated_qkv(layer, x, *tables)
            dec.keys.append(paddle.concat([k, free], axis=2))
            dec.values.append(paddle.concat([v, free], axis=2))
            x = x + _linear(layer.self_attn.o_proj, attention(layer.self_attn, q, k, v, bias))
            x = x + _mlp(layer.mlp, _rms_norm(layer.post_attention_layernorm, x))
        dec.filled = length
        return dec, _lm_head(lm, _rms_norm(lm.model.norm, x[:, -1:]))

    @property
    def rows(self) -> int:
        return self.bias.shape[0]

    def keep(self, rows: list[int]) -> None:
        """Only these rows (indices, in this order) go on; leading columns none of them attends are dropped."""
        index = paddle.to_tensor(rows, dtype="int64")
        self.keys = [paddle.gather(k, index) for k in self.keys]
        self.values = [paddle.gather(v, index) for v in self.values]
        self.bias, self.positions = paddle.gather(self.bias, index), paddle.gather(self.positions, index)
        open_columns = np.nonzero((self.bias[:, 0, 0, :self.filled].numpy() == 0).any(axis=0))[0]
        first = int(open_columns[0]) if open_columns.size else self.filled
        if first:
            self.keys = [k[:, :, first:] for k in self.keys]
            self.values = [v[:, :, first:] for v in self.values]
            self.bias = self.bias[:, :, :, first:]
            self.filled -= first

    def _padded(self, left: int, right: int) -> None:
        """`left` masked columns before the history and `right` more free ones after the buffers."""
        if not left and not right:
            return
        b, h, _, d = self.keys[0].shape
        dtype = self.keys[0].dtype
        minimum = paddle.finfo(dtype).min

        def grow(buf, fill, shape, axis):  # along the column axis, skipping empty parts
            before = [paddle.full(shape(left), fill, dtype)] if left else []
            after = [paddle.full(shape(right), fill, dtype)] if right else []
            return paddle.concat(before + [buf] + after, axis=axis)

        self.keys = [grow(k, 0.0, lambda n: [b, h, n, d], 2) for k in self.keys]
        self.values = [grow(v, 0.0, lambda n: [b, h, n, d], 2) for v in self.values]
        self.bias = grow(self.bias, minimum, lambda n: [b, 1, 1, n], 3)
        self.filled += left

    def merged(self, other: "PreallocatedDecoder") -> "PreallocatedDecoder":
        """This decoder with other's rows after its own (other is used up): both aligned on the
        next column, with room for whichever needs more steps."""
        room = max(self.bias.shape[-1] - self.filled, other.bias.shape[-1] - other.filled)
        filled = max(self.filled, other.filled)
        for dec in (self, other):
            dec._padded(filled - dec.filled, room - (dec.bias.shape[-1] - dec.filled))
        self.keys = [paddle.concat(pair) for pair in zip(self.keys, other.keys)]
        self.values = [paddle.concat(pair) for pair in zip(self.values, other.values)]
        self.bias = paddle.concat([self.bias, other.bias])
        self.positions = paddle.concat([self.positions, other.positions])
        if other._cos is not None and (self._cos is None or other._cos.shape[0] > self._cos.shape[0]):
            self._cos, self._sin = other._cos, other._sin
        return self

    def _rotated_qkv(self, layer, x, cos_q, sin_q, cos_k, sin_k):
        """x [B, n, D] -> q [B, H, n, d] and k [B, Hkv, n, d] rotated (by cos and sin tables that
        broadcast to each), v [B, Hkv, n, d]."""
        attn = layer.self_attn
        b, n = x.shape[0], x.shape[1]
        h = _rms_norm(layer.input_layernorm, x)
        q = _linear(attn.q_proj, h).reshape([b, n, self.heads, self.head_dim])
        k = _linear(attn.k_proj, h).reshape([b, n, self.kv_heads, self.head_dim])
        v = _linear(attn.v_proj, h).reshape([b, n, self.kv_heads, self.head_dim]).transpose([0, 2, 1, 3])
        if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before the rotation
            q, k = _rms_norm(attn.q_norm, q), _rms_norm(attn.k_norm, k)
        q = q.transpose([0, 2, 1, 3])
        k = k.transpose([0, 2, 1, 3])
        q = q * cos_q + paddle.matmul(q, self.rotate) * sin_q
        k = k * cos_k + paddle.matmul(k, self.rotate) * sin_k
        return q, k, v

    def step(self, embeds):
        """embeds [B, 1, D] of the newest token -> logits [B, 1, V]; the token's keys and values are kept."""
        t = self.filled
        if t >= self.bias.shape[-1]:
            raise ValueError(f"the KV buffers hold {t} positions; decode more tokens with a larger max_new_tokens")
        self.bias[:, :, :, t] = 0.0
        cos, sin = self._rotary(embeds, self.positions, t + 1)  # [B, 1, 1, d]; a position never exceeds t
        x = embeds
        b = x.shape[0]
        groups = self.heads // self.kv_heads
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._rotated_qkv(layer, x, cos, sin, cos, sin)
            self.keys[i][:, :, t:t + 1] = k
            self.values[i][:, :, t:t + 1] = v
            q = (q * self.scaling).reshape([b, self.kv_heads, groups, self.head_dim])
            scores = paddle.matmul(q, self.keys[i], transpose_y=True) + self.bias  # [B, Hkv, G, capacity]
            out = paddle.matmul(F.softmax(scores, axis=-1), self.values[i])  # [B, Hkv, G, d]
            x = x + _linear(attn.o_proj, out.reshape([b, 1, self.heads * self.head_dim]))
            x = x + _mlp(layer.mlp, _rms_norm(layer.post_attention_layernorm, x))
        self.filled = t + 1
        self.positions = self.positions + 1
        return _lm_head(self.lm, _rms_norm(self.lm.model.norm, x))
