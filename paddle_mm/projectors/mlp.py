"""Linear and MLP projectors (LLaVA): image features [B, P, Dv] -> LM embeddings [B, P', D]."""
from __future__ import annotations

import math

import paddle.nn as nn
import paddle.nn.functional as F


class MLPProjector(nn.Layer):
    """`depth` Linear layers with GELU between them; depth 1 is the plain linear projector.

    Layers are named linear_1, linear_2, ... as in HF LLaVA's multi_modal_projector, so its
    weights map by name. `pool` > 1 average-pools the square patch grid first, which cuts the
    number of image tokens the LM has to read by pool**2.
    """

    def __init__(self, vision_hidden: int, output_hidden: int, depth: int = 2, pool: int = 1):
        super().__init__()
        self.pool = pool
        dims = [vision_hidden] + [output_hidden] * depth
        for i in range(depth):
            setattr(self, f"linear_{i + 1}", nn.Linear(dims[i], dims[i + 1]))
        self.depth = depth

    def forward(self, features):  # [B, P, Dv]
        x = features
        if self.pool > 1:
            b, p, d = x.shape
            g = math.isqrt(p)
            grid = x.transpose([0, 2, 1]).reshape([b, d, g, g])
            x = F.avg_pool2d(grid, self.pool).flatten(2).transpose([0, 2, 1])  # [B, P / pool^2, Dv]
        for i in range(1, self.depth + 1):
            if i > 1:
                x = F.gelu(x)
            x = getattr(self, f"linear_{i}")(x)
        return x  # [B, P', D]
