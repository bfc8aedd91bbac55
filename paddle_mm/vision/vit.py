"""ViT image encoder with the CLIP vision layout.

Parameter names mirror CLIPVisionModel one to one (class_embedding, patch_embedding,
position_embedding, pre_norm, blocks.i.{norm1, attn.{q,k,v,out}_proj, norm2, mlp.fc1/fc2},
post_norm) so a CLIP checkpoint maps onto it with a flat name table. Other towers are the
same network with config switches. BLIP-2's EVA ViT: no pre_norm, a patch bias, gelu,
post_norm on the last layer's features, class token kept (its fused qkv is split by the
weight table). SigLIP's: no class token (so P position embeddings, not P + 1), no pre_norm,
a patch bias, the tanh-approximated gelu.
"""
from __future__ import annotations

import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.distributed.fleet.utils import recompute

from paddle_mm.config import VisionConfig


class QuickGELU(nn.Layer):
    """CLIP's activation x * sigmoid(1.702 x); kept because CLIP weights were trained with it."""

    def forward(self, x):
        return x * F.sigmoid(1.702 * x)


def _activation(name: str) -> nn.Layer:
    if name == "quick_gelu":
        return QuickGELU()
    return nn.GELU(approximate=name == "gelu_tanh")  # gelu_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))


class Attention(nn.Layer):
    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x):  # [B, L, D]
        b, length, d = x.shape
        split = [b, length, self.num_heads, d // self.num_heads]
        q = self.q_proj(x).reshape(split)
        k = self.k_proj(x).reshape(split)
        v = self.v_proj(x).reshape(split)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, L, H, Dh], no mask: every patch sees every patch
        return self.out_proj(out.reshape([b, length, d]))


class MLP(nn.Layer):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.act = _activation(act)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Layer):
    """Pre-norm transformer block."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Layer):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        # A convolution whose kernel and stride are the patch size = a linear map of each
        # flattened patch (patch*patch*channels values) to D. CLIP has no bias here; BLIP-2 has one.
        self.patch_embedding = nn.Conv2D(
            cfg.num_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size,
            bias_attr=None if cfg.patch_bias else False,
        )
        init = nn.initializer.Normal(std=d**-0.5)
        self.has_class_token = cfg.class_token
        if cfg.class_token:
            self.class_embedding = self.create_parameter([d], default_initializer=init)
        self.position_embedding = self.create_parameter([cfg.num_patches + int(cfg.class_token), d],
                                                        default_initializer=init)
        self.pre_norm = nn.LayerNorm(d, epsilon=cfg.layer_norm_eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.LayerList([Block(cfg) for _ in range(cfg.num_layers)])
        self.post_norm = nn.LayerNorm(d, epsilon=cfg.layer_norm_eps)
        self.recompute = False  # train.recompute: keep only block inputs, rerun blocks in backward

    def position_embeddings_for(self, grid_h: int, grid_w: int) -> paddle.Tensor:
        """Position table for a grid_h x grid_w patch grid, bicubic-interpolated from the trained grid.

        With a class token its position is row 0 and is kept as it is.
        """
        table = self.position_embedding  # [(1 +) P, D]
        first = int(self.has_class_token)
        trained = int(math.isqrt(table.shape[0] - first))
        if (grid_h, grid_w) == (trained, trained):
            return table
        cls_pos, patch_pos = table[:first], table[first:]
        d = table.shape[1]
        grid = patch_pos.reshape([1, trained, trained, d]).transpose([0, 3, 1, 2])  # [1, D, g, g]
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = grid.transpose([0, 2, 3, 1]).reshape([grid_h * grid_w, d])
        return paddle.concat([cls_pos, patch_pos], axis=0) if first else patch_pos

    def embed(self, pixel_values):  # [B, C, H, W] -> [B, (1 +) P, D]
        patches = self.patch_embedding(pixel_values)  # [B, D, H/p, W/p]
        b, d, gh, gw = patches.shape
        x = patches.flatten(2).transpose([0, 2, 1])  # [B, P, D]
        if self.has_class_token:
            cls = self.class_embedding.reshape([1, 1, d]).expand([b, 1, d])
            x = paddle.concat([cls, x], axis=1)
        return x + self.position_embeddings_for(gh, gw).unsqueeze(0)

    def forward(self, pixel_values, output_hidden_states: bool = False):
        """Return the selected features [B, vision.num_features, D], and all hidden states if asked."""
        x = self.pre_norm(self.embed(pixel_values))
        hidden_states = [x]
        # Blocks past the selected layer cannot change the features: skip them (LLaVA's -2
        # saves one block in 24) unless the caller wants every hidden state.
        layer = self.config.feature_layer % (len(self.blocks) + 1)
        for block in self.blocks if output_hidden_states else self.blocks[:layer]:
            x = recompute(block, x) if self.recompute and self.training and not x.stop_gradient else block(x)
            hidden_states.append(x)
        features = hidden_states[layer]
        if self.config.post_norm:
            features = self.post_norm(features)
        if self.config.drop_cls_token:  # the first position: the class token, or SigLIP's first patch
            features = features[:, 1:]
        return (features, hidden_states) if output_hidden_states else features
