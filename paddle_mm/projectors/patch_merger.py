"""Qwen2-VL's patch merger: each merge x merge group of neighbouring patches (4 consecutive rows
of the vision encoder's output, data/qwen2_vl.py orders them so) becomes one LM token.

norm (LayerNorm for Qwen2-VL and Qwen3-VL, RMSNorm for Qwen2.5-VL, per patch; Qwen3-VL's
DeepStack mergers normalize the joined group instead), the group's features concatenated
(4 D), then Linear(4 D, 4 D) -> exact GELU -> Linear(4 D, out).
"""
from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

NORM_EPS = 1e-6


class PatchMerger(nn.Layer):
    def __init__(self, dim: int, out_dim: int, merge: int = 2, rms_norm: bool = False, norm_after_join: bool = False):
        super().__init__()
        self.group = dim * merge * merge
        self.rms_norm = rms_norm
        self.norm_after_join = norm_after_join
        self.ln_q = nn.LayerNorm(self.group if norm_after_join else dim, epsilon=NORM_EPS)
        if rms_norm:  # the same weight, no bias
            self.ln_q.bias = None
        self.fc1 = nn.Linear(self.group, self.group)
        self.fc2 = nn.Linear(self.group, out_dim)

    def _norm(self, x):
        if not self.rms_norm:
            return self.ln_q(x)
        h = x.astype("float32")
        h = h * paddle.rsqrt(h.pow(2).mean(-1, keepdim=True) + NORM_EPS)
        return self.ln_q.weight * h.astype(x.dtype)

    def forward(self, x):  # [N, dim] -> [N / merge^2, out_dim]
        joined = self._norm(x.reshape([-1, self.group])) if self.norm_after_join else self._norm(x).reshape([-1, self.group])
        return self.fc2(F.gelu(self.fc1(joined)))
