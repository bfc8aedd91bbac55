"""Qwen2-VL's and Qwen2.5-VL's vision encoders: images and video at their own size, as patch rows.

Input: the processor's pixel rows [N, C * T * p * p] (data/qwen2_vl.py: each row one 3-D patch
of T frames, rows in the order the merger groups them) and each picture's grid (t, h, w) in
patches. Output: [N, D] patch features in the same order; the patch merger (projectors/
patch_merger.py) turns each 2 x 2 group of consecutive rows into one LM token.

- Patch embedding: a Conv3D whose kernel is the patch, i.e. one matrix product per row (the
  weight keeps the Conv3D shape [D, C, T, p, p], so checkpoints map unchanged).
- 2-D rotary positions: half of each head's rotary frequencies turn with the patch's row,
  half with its column.
- Attention stays within one picture's frame (cu_seqlens-style segments: a video's temporal
  patches do not see each other here; the LM relates them). Qwen2.5-VL narrows it further to
  windows of window_size pixels, except in the blocks fullatt_block_indexes names: its rows are
  put in window order for the blocks and back in picture order at the end.
- Qwen2-VL: LayerNorm and a fc1/fc2 MLP; Qwen2.5-VL: RMSNorm and SwiGLU (gate/up/down, biases).
- Qwen3-VL: Qwen2-VL's blocks (a tanh GELU), a bias on the patch embedding, and learned
  positions: a sqrt(n) x sqrt(n) table, bilinearly interpolated to each picture's grid, added to
  the patches. `encode` also returns the hidden states after the DeepStack blocks.
"""
from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from paddle_mm.config import Qwen2VLVisionConfig

_ACT = {"quick_gelu": lambda x: x * F.sigmoid(1.702 * x), "gelu": F.gelu, "silu": F.silu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate=True)}
NORM_EPS = 1e-6


class RMSNorm(nn.Layer):
    """Qwen2's RMSNorm: x / sqrt(mean(x^2) + eps) in float32, times a weight."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([dim], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x):
        h = x.astype("float32")
        h = h * paddle.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.astype(x.dtype)


def _norm(cfg: Qwen2VLVisionConfig, dim: int):
    return RMSNorm(dim) if cfg.variant == "qwen2_5_vl" else nn.LayerNorm(dim, epsilon=NORM_EPS)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return paddle.concat([-x[..., half:], x[..., :half]], axis=-1)


class VisionAttention(nn.Layer):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin, segments: list[int]):
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape([n, 3, self.num_heads, self.head_dim]).unbind(1)  # [N, H, d] each
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q.astype("float32") * c + _rotate_half(q.astype("float32")) * s).astype(x.dtype)
        k = (k.astype("float32") * c + _rotate_half(k.astype("float32")) * s).astype(x.dtype)
        q, k, v = (t.transpose([1, 0, 2]) for t in (q, k, v))  # [H, N, d]
        outs = []
        start = 0
        for length in segments:  # each segment attends within itself only
            end = start + length
            qs, ks, vs = q[:, start:end], k[:, start:end], v[:, start:end]
            weights = paddle.matmul(qs, ks, transpose_y=True) * self.head_dim ** -0.5
            weights = F.softmax(weights.astype("float32"), axis=-1).astype(x.dtype)
            outs.append(paddle.matmul(weights, vs))
            start = end
        out = paddle.concat(outs, axis=1).transpose([1, 0, 2]).reshape([n, -1])
        return self.proj(out)


class VisionMLP(nn.Layer):
    """Qwen2-VL: fc2(act(fc1 x)); Qwen2.5-VL: down(act(gate x) * up x), with biases."""

    def __init__(self, cfg: Qwen2VLVisionConfig):
        super().__init__()
        self.swiglu = cfg.variant == "qwen2_5_vl"
        self.act = _ACT[cfg.hidden_act]
        d, hidden = cfg.hidden_size, cfg.intermediate_size
        if self.swiglu:
            self.gate_proj = nn.Linear(d, hidden)
            self.up_proj = nn.Linear(d, hidden)
            self.down_proj = nn.Linear(hidden, d)
        else:
            self.fc1 = nn.Linear(d, hidden)
            self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        if self.swiglu:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Layer):
    def __init__(self, cfg: Qwen2VLVisionConfig):
        super().__init__()
        self.norm1 = _norm(cfg, cfg.hidden_size)
        self.norm2 = _norm(cfg, cfg.hidden_size)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


def patch_positions(grids: np.ndarray, merge: int) -> np.ndarray:
    """[N, 2] (row, column) of every patch row, in the processor's order (merge blocks of merge x merge)."""
    out = []
    for t, h, w in np.asarray(grids).reshape(-1, 3):
        rows = np.arange(h).reshape(h // merge, merge, 1, 1).repeat(w // merge, 2).repeat(merge, 3)
        cols = np.arange(w).reshape(1, 1, w // merge, merge).repeat(h // merge, 0).repeat(merge, 1)
        pair = np.stack([rows.transpose(0, 2, 1, 3).reshape(-1), cols.transpose(0, 2, 1, 3).reshape(-1)], -1)
        out.append(np.tile(pair, (int(t), 1)))
    return np.concatenate(out).astype(np.int64)


def frame_segments(grids: np.ndarray) -> list[int]:
    """Rows per attention segment: every temporal patch of every picture is its own."""
    return [int(h * w) for t, h, w in np.asarray(grids).reshape(-1, 3) for _ in range(int(t))]


def window_order(grids: np.ndarray, merge: int, window_merged: int) -> tuple[np.ndarray, list[int]]:
    """Qwen2.5-VL's windows: (the merge units in window order, rows per window).

    Each frame's grid of merge units is cut into window_merged x window_merged windows from the
    top left (the last row and column of windows may be smaller); windows go row by row."""
    order, sizes, offset = [], [], 0
    for t, h, w in np.asarray(grids).reshape(-1, 3):
        gh, gw = int(h) // merge, int(w) // merge
        for f in range(int(t)):
            index = np.arange(gh * gw).reshape(gh, gw) + offset + f * gh * gw
            for r in range(0, gh, window_merged):
                for c in range(0, gw, window_merged):
                    cell = index[r:r + window_merged, c:c + window_merged].reshape(-1)
                    order.append(cell)
                    sizes.append(cell.size * merge * merge)
        offset += int(t) * gh * gw
    return np.concatenate(order).astype(np.int64), sizes


class PatchEmbed(nn.Layer):
    """A Conv3D with kernel = stride = one patch, applied to patch rows as the one matrix product it is."""

    def __init__(self, cfg: Qwen2VLVisionConfig):
        super().__init__()
        kernel = [cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size]
        bias = None if cfg.variant == "qwen3_vl" else False  # Qwen3-VL's has a bias
        self.proj = nn.Conv3D(cfg.in_channels, cfg.hidden_size, kernel, stride=kernel, bias_attr=bias)

    def forward(self, rows):
        w = self.proj.weight  # [D, C, T, p, p]
        out = paddle.matmul(rows.astype(w.dtype), w.reshape([w.shape[0], -1]), transpose_y=True)
        return out if self.proj.bias is None else out + self.proj.bias


def interpolated_positions(grids: np.ndarray, side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-VL's learned positions at each patch row: (table indices [4, N], weights [4, N]) of the
    four corners of a bilinear interpolation of the side x side table onto each grid (its corners
    on the table's corners, float32 as transformers computes them), in the rows' merge order."""
    idx_out, w_out = [], []
    for t, h, w in np.asarray(grids).reshape(-1, 3):
        hs = np.linspace(0, side - 1, int(h), dtype=np.float32)
        ws = np.linspace(0, side - 1, int(w), dtype=np.float32)
        h0, w0 = hs.astype(np.int64), ws.astype(np.int64)
        h1, w1 = np.minimum(h0 + 1, side - 1), np.minimum(w0 + 1, side - 1)
        dh, dw = (hs - h0).astype(np.float32), (ws - w0).astype(np.float32)
        idx = [(a[:, None] * side + b[None]).reshape(-1) for a, b in ((h0, w0), (h0, w1), (h1, w0), (h1, w1))]
        wts = [(a[:, None] * b[None]).reshape(-1) for a, b in ((1 - dh, 1 - dw), (1 - dh, dw), (dh, 1 - dw), (dh, dw))]
        # raster order -> merge order (blocks of merge x merge), repeated for every temporal patch
        order = np.arange(h * w).reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
        order = np.tile(order, int(t))
        idx_out.append(np.stack(idx)[:, order])
        w_out.append(np.stack(wts)[:, order])
    return np.concatenate(idx_out, axis=1), np.concatenate(w_out, axis=1).astype(np.float32)


class Qwen2VLVisionEncoder(nn.Layer):
    def __init__(self, cfg: Qwen2VLVisionConfig):
        super().__init__()
        self.config = cfg
        c = cfg
        self.patch_embed = PatchEmbed(c)
        if c.variant == "qwen3_vl":
            self.pos_embed = nn.Embedding(c.num_position_embeddings, c.hidden_size)
        self.blocks = nn.LayerList([VisionBlock(c) for _ in range(c.depth)])
        head_dim = c.hidden_size // c.num_heads
        rot = head_dim // 2  # the rotary dimension of each axis pair (row, column)
        self.register_buffer("inv_freq", 1.0 / (10000.0 ** (paddle.arange(0, rot, 2, dtype="float32") / rot)),
                             persistable=False)

    def _rotary(self, grids: np.ndarray):
        positions = patch_positions(grids, self.config.spatial_merge_size)
        seq = paddle.arange(int(np.asarray(grids)[:, 1:].max()), dtype="float32")
        table = paddle.outer(seq, self.inv_freq)  # [max side, rot / 2]
        freqs = paddle.gather(table, paddle.to_tensor(positions.reshape(-1))).reshape([positions.shape[0], -1])
        emb = paddle.concat([freqs, freqs], axis=-1)  # [N, head_dim]
        return emb.cos(), emb.sin()

    def forward(self, pixel_values, grid_thw):
        """pixel_values [N, C*T*p*p], grid_thw [n, 3] (array or tensor) -> [N, D]."""
        return self.encode(pixel_values, grid_thw)[0]

    def _learned_positions(self, grids):
        idx, weights = interpolated_positions(grids, math.isqrt(self.config.num_position_embeddings),
                                              self.config.spatial_merge_size)
        table = self.pos_embed(paddle.to_tensor(idx))  # [4, N, D]
        scaled = table * paddle.to_tensor(weights).unsqueeze(-1).astype(table.dtype)
        return scaled[0] + scaled[1] + scaled[2] + scaled[3]

    def encode(self, pixel_values, grid_thw):
        """(features [N, D], the hidden states [N, D] after each block deepstack_visual_indexes names)."""
        c = self.config
        grids = np.asarray(grid_thw.numpy() if isinstance(grid_thw, paddle.Tensor) else grid_thw).reshape(-1, 3)
        x = self.patch_embed(pixel_values)
        if c.variant == "qwen3_vl":
            x = x + self._learned_positions(grids)
        cos, sin = self._rotary(grids)
        full = frame_segments(grids)
        windowed = c.variant == "qwen2_5_vl"
        if windowed:
            unit = c.spatial_merge_size ** 2
            order, windows = window_order(grids, c.spatial_merge_size, c.window_size // c.spatial_merge_size // c.patch_size)
            rows = paddle.to_tensor((order[:, None] * unit + np.arange(unit)).reshape(-1))
            x, cos, sin = (paddle.gather(t, rows) for t in (x, cos, sin))
        deepstack = []
        for i, block in enumerate(self.blocks):
            # full attention is per frame: in window order a frame's rows are still contiguous
            x = block(x, cos, sin, windows if windowed and i not in c.fullatt_block_indexes else full)
            if i in c.deepstack_visual_indexes:
                deepstack.append(x)
        if windowed:
            x = paddle.scatter(paddle.zeros_like(x), rows, x)  # back to picture order
        return x, deepstack
