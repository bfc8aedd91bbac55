"""CLIP-style two-tower training: an image tower and a text tower meet in one embedding space.

Image embedding: the vision tower's selected features, averaged over positions, projected
and L2-normalized (the mean rather than CLIP's class token, so the ViT configs that drop the
class token, as the demo's does, work unchanged). Text embedding: the [CLS] output of a
post-norm BERT-style text encoder, projected and normalized. The loss is the symmetric
InfoNCE of the cosine similarities times a learned scale exp(logit_scale), initialized to
1/0.07 and capped at 100 as in CLIP.
"""
from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from paddle_mm.alignment.losses import attention_mask as build_mask
from paddle_mm.alignment.losses import contrastive_loss, same_text
from paddle_mm.config import ModelConfig, TextConfig
from paddle_mm.projectors.qformer import QFormerLayer
from paddle_mm.vision.vit import VisionTransformer

MAX_LOGIT_SCALE = math.log(100.0)


class TextEncoder(nn.Layer):
    """Word + position embeddings, LayerNorm, then post-norm BERT layers over the valid tokens."""

    def __init__(self, cfg: TextConfig, vocab_size: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps)
        self.layers = nn.LayerList([
            QFormerLayer(cfg.hidden_size, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size,
                         has_cross_attention=False, eps=cfg.layer_norm_eps)
            for _ in range(cfg.num_layers)
        ])

    def forward(self, input_ids, valid: np.ndarray):
        positions = paddle.arange(input_ids.shape[1], dtype="int64").unsqueeze(0)
        x = self.norm(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        mask = paddle.to_tensor(build_mask("itc", 0, valid))  # text reads valid text only
        for layer in self.layers:
            x = layer(x, None, attn_mask=mask)
        return x  # [B, T, D]


class ClipHeads(nn.Layer):
    def __init__(self, vision_hidden: int, text_hidden: int, embed_dim: int):
        super().__init__()
        self.vision_proj = nn.Linear(vision_hidden, embed_dim, bias_attr=False)
        self.text_proj = nn.Linear(text_hidden, embed_dim, bias_attr=False)
        self.logit_scale = self.create_parameter(
            [1], default_initializer=nn.initializer.Constant(math.log(1 / 0.07)))


class ClipModel(nn.Layer):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_token_id: int):
        super().__init__()
        self.config = cfg
        self.pad_token_id = pad_token_id
        self.vision_tower = VisionTransformer(cfg.vision)
        self.text_tower = TextEncoder(cfg.text, vocab_size)
        self.align_heads = ClipHeads(cfg.vision.hidden_size, cfg.text.hidden_size, cfg.text.embed_dim)

    def image_embeddings(self, pixel_values):
        """[N, 1, E]: one normalized embedding per image (the shape the Q-Former's queries have)."""
        pooled = self.vision_tower(pixel_values).mean(axis=1)
        return F.normalize(self.align_heads.vision_proj(pooled), axis=-1).unsqueeze(1)

    def text_embeddings(self, input_ids, attention_mask):
        valid = attention_mask.numpy().astype(bool)
        ids = paddle.where(attention_mask.astype("bool"), input_ids, paddle.full_like(input_ids, self.pad_token_id))
        cls = self.text_tower(ids, valid)[:, 0]
        return F.normalize(self.align_heads.text_proj(cls), axis=-1)

    def similarity(self, image_embeds, text_embeds):
        return paddle.matmul(image_embeds[:, 0], text_embeds, transpose_y=True)

    def scale(self):
        return paddle.exp(paddle.clip(self.align_heads.logit_scale, max=MAX_LOGIT_SCALE))

    def losses(self, input_ids, attention_mask, pixel_values, labels=None) -> dict:
        text = self.text_embeddings(input_ids, attention_mask)
        sim = self.similarity(self.image_embeddings(pixel_values), text) * self.scale()
        positives = same_text(input_ids.numpy(), attention_mask.numpy().astype(bool))
        return {"contrastive": contrastive_loss(sim, positives)}

    def forward(self, input_ids, attention_mask, pixel_values, labels=None):
        parts = self.losses(input_ids, attention_mask, pixel_values)
        return parts["contrastive"], parts
