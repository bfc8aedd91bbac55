"""BLIP-2 stage 1: the Q-Former learns to read images with three losses on image-caption pairs.

    ITC  contrastive: each query's embedding against the text [CLS] embedding, the best
         query counts (max over queries); learned temperature, clamped to [0.001, 0.5]
    ITM  matching: a 2-way head on the queries' outputs (mean over queries) for the true
         pairs and for hard negatives drawn from the ITC similarities
    ITG  generation: the caption predicted token by token from the queries ([DEC] first)

Submodules: `vision_tower` and `multi_modal_projector` (the query branch, with the same
names the pretrain/instruct model uses, so stage 2 starts from them), `text_tower` (the
Q-Former's text branch) and `align_heads` (projections, ITM and LM heads, temperature).
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from paddle_mm.alignment.losses import attention_mask as build_mask
from paddle_mm.alignment.losses import contrastive_loss, hard_negatives, same_text
from paddle_mm.config import ModelConfig
from paddle_mm.data.tokenizer import IGNORE_INDEX
from paddle_mm.model import causal_lm_loss
from paddle_mm.projectors import build_projector
from paddle_mm.projectors.qformer import QFormerTextBranch
from paddle_mm.vision.vit import VisionTransformer


class QFormerHeads(nn.Layer):
    """ITC projections, the ITM head, the ITG LM head (BERT's prediction head) and the temperature.

        lm_transform.dense / norm, lm_bias  <- cls.predictions.transform.{dense,LayerNorm}, cls.predictions.bias
    The LM head's output matrix is the text tower's word embeddings (tied, as in BERT and BLIP-2).
    """

    def __init__(self, hidden: int, embed_dim: int, vocab_size: int, eps: float):
        super().__init__()
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.lm_dense = nn.Linear(hidden, hidden)
        self.lm_norm = nn.LayerNorm(hidden, epsilon=eps)
        self.lm_bias = self.create_parameter([vocab_size], default_initializer=nn.initializer.Constant(0.0))
        self.temp = self.create_parameter([1], default_initializer=nn.initializer.Constant(0.07))

    def temperature(self):
        return paddle.clip(self.temp, 0.001, 0.5)


class QFormerAligner(nn.Layer):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_token_id: int, dec_token_id: int, seed: int = 0):
        super().__init__()
        if cfg.projector.type != "qformer":
            raise ValueError(f"the align stage trains a Q-Former; projector.type is {cfg.projector.type!r}")
        q = cfg.projector.qformer
        self.config = cfg
        self.pad_token_id, self.dec_token_id = pad_token_id, dec_token_id
        self.vision_tower = VisionTransformer(cfg.vision)
        self.multi_modal_projector = build_projector(cfg.projector, cfg.vision.hidden_size, cfg.lm.hidden_size)
        self.text_tower = QFormerTextBranch(vocab_size, q.hidden_size, q.num_layers, q.intermediate_size,
                                            cfg.text.max_position_embeddings, q.layer_norm_eps)
        self.align_heads = QFormerHeads(q.hidden_size, cfg.text.embed_dim, vocab_size, q.layer_norm_eps)
        self._rng = np.random.default_rng(seed)  # hard-negative draws

    # pieces ---------------------------------------------------------------------------------
    def _joint(self, image_features, input_ids, valid: np.ndarray, kind: str, with_queries: bool = True):
        nq = self.multi_modal_projector.num_queries if with_queries else 0
        mask = paddle.to_tensor(build_mask(kind, nq, valid))
        text = self.text_tower.embed(input_ids, self.multi_modal_projector.query_norm)
        return self.multi_modal_projector.joint_states(image_features, text, mask, self.text_tower, with_queries)

    def _clean_ids(self, input_ids, attention_mask):
        # Padding may carry any id (the batch is padded with the LM's pad id): use the text's own.
        return paddle.where(attention_mask.astype("bool"), input_ids,
                            paddle.full_like(input_ids, self.pad_token_id))

    def image_embeddings(self, pixel_values):
        """L2-normalized ITC embedding of each query: [N, Q, E]."""
        states = self.multi_modal_projector.query_states(self.vision_tower(pixel_values))
        return F.normalize(self.align_heads.vision_proj(states), axis=-1)

    def text_embeddings(self, input_ids, attention_mask):
        """L2-normalized ITC embedding of each text's [CLS], from the text alone: [M, E]."""
        valid = attention_mask.numpy().astype(bool)
        _, text = self._joint(None, self._clean_ids(input_ids, attention_mask), valid, "itc", with_queries=False)
        return F.normalize(self.align_heads.text_proj(text[:, 0]), axis=-1)

    def similarity(self, image_embeds, text_embeds):
        """[N, M]: for image n and text m, the best query's cosine similarity (max over queries)."""
        n, q, e = image_embeds.shape
        sim = paddle.matmul(image_embeds.reshape([n * q, e]), text_embeds, transpose_y=True)
        return sim.reshape([n, q, -1]).max(axis=1)

    def lm_logits(self, text_states):
        h = self.align_heads.lm_norm(F.gelu(self.align_heads.lm_dense(text_states)))
        return paddle.matmul(h, self.text_tower.word_embeddings.weight, transpose_y=True) + self.align_heads.lm_bias

    # the three losses ---------------------------------------------------------------------------
    def losses(self, input_ids, attention_mask, pixel_values, labels=None) -> dict:
        """{"itc", "itm", "itg"} losses of a batch of image-caption pairs (row i: image i, caption i)."""
        ids = self._clean_ids(input_ids, attention_mask)
        valid = attention_mask.numpy().astype(bool)
        b = ids.shape[0]
        image_features = self.vision_tower(pixel_values)  # [B, P, Dv]

        # ITC: one pass, queries and text blind to each other.
        queries, text = self._joint(image_features, ids, valid, "itc")
        image_embeds = F.normalize(self.align_heads.vision_proj(queries), axis=-1)  # [B, Q, E]
        text_embeds = F.normalize(self.align_heads.text_proj(text[:, 0]), axis=-1)  # [B, E]
        sim = self.similarity(image_embeds, text_embeds) / self.align_heads.temperature()
        positives = same_text(ids.numpy(), valid)
        itc = contrastive_loss(sim, positives)

        # ITM: true pairs, then (hard negative image, text) and (image, hard negative text).
        # In eval mode (validation) the negatives come from a fixed stream: the held-out loss is
        # repeatable and training's own draws are left where they were.
        rng = self._rng if self.training else np.random.default_rng(0)
        neg_image, neg_text = hard_negatives(sim.detach().numpy(), positives, rng)
        has_img, has_txt = np.nonzero(neg_image >= 0)[0], np.nonzero(neg_text >= 0)[0]
        image_rows = np.concatenate([np.arange(b), neg_image[has_img], has_txt])
        text_rows = np.concatenate([np.arange(b), has_img, neg_text[has_txt]])
        match = np.concatenate([np.ones(b), np.zeros(len(has_img) + len(has_txt))]).astype("int64")
        pair_queries, _ = self._joint(paddle.gather(image_features, paddle.to_tensor(image_rows)),
                                      paddle.gather(ids, paddle.to_tensor(text_rows)), valid[text_rows], "itm")
        itm_logits = self.align_heads.itm_head(pair_queries).mean(axis=1)  # [3B, 2]
        itm = F.cross_entropy(itm_logits, paddle.to_tensor(match).unsqueeze(-1))

        # ITG: [DEC] in place of [CLS]; predict each next caption token from the queries and the text so far.
        dec_ids = paddle.concat([paddle.full_like(ids[:, :1], self.dec_token_id), ids[:, 1:]], axis=1)
        _, text = self._joint(image_features, dec_ids, valid, "itg")
        targets = paddle.where(attention_mask.astype("bool"), ids, paddle.full_like(ids, IGNORE_INDEX))
        itg = causal_lm_loss(self.lm_logits(text), targets)
        return {"itc": itc, "itm": itm, "itg": itg}

    def forward(self, input_ids, attention_mask, pixel_values, labels=None):
        """(ITC + ITM + ITG, the three parts): the call signature the training loop uses."""
        parts = self.losses(input_ids, attention_mask, pixel_values)
        return parts["itc"] + parts["itm"] + parts["itg"], parts
