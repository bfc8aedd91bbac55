"""BLIP-2 style Q-Former input projector.

A fixed set of learned query tokens reads the image features through
cross-attention and is projected to the language model's hidden size, so the
LM always sees ``num_queries`` visual tokens whatever the number of patches.

Structure follows BLIP-2's Q-Former (a BERT encoder): post-norm layers
(``LayerNorm(x + sublayer(x))``), cross-attention only on every
``cross_attention_every``-th layer, GELU feed-forward, and a final Linear
(BLIP-2's ``language_projection``). This class is the query branch, all a projector
needs; the text branch used by the stage-1 losses (word/position embeddings and each
layer's text feed-forward) is ``QFormerTextBranch``, which runs through the same layers
with ``QFormerLayer.forward_joint`` (BLIP-2 shares self-attention between queries and text).

One addition, off by default: ``cross_attention_locality > 0`` lays the queries on a
sqrt(Q) x sqrt(Q) grid over the image and adds ``-strength * distance**2`` (distance from the
query's cell to the patch, in query cells) to every cross-attention logit, one learned strength
per head and layer (``layers.{i}.cross_attn_locality``, a tensor BLIP-2 checkpoints do not have).
Honeybee (Cha et al., 2024) reports that resamplers lose the image's spatial layout; the demo
measured the same (every query read the same patch), and this prior keeps each query near its
own part of the image while a head is free to learn a strength near 0 and read globally.

Parameter layout (maps one-to-one onto HF ``Blip2QFormerModel``; Paddle Linear
weights are ``[in, out]``, i.e. transposed w.r.t. torch):
    query_tokens                         <- query_tokens
    query_norm                           <- qformer.layernorm
    layers.{i}.attn.{q,k,v}_proj         <- layer.{i}.attention.attention.{query,key,value}
    layers.{i}.attn.out_proj             <- layer.{i}.attention.output.dense
    layers.{i}.attn_norm                 <- layer.{i}.attention.output.LayerNorm
    layers.{i}.cross_attn.*              <- layer.{i}.crossattention.* (same split)
    layers.{i}.cross_attn_norm           <- layer.{i}.crossattention.output.LayerNorm
    layers.{i}.mlp.fc1 / fc2             <- layer.{i}.intermediate_query.dense / output_query.dense
    layers.{i}.mlp_norm                  <- layer.{i}.output_query.LayerNorm
    proj                                 <- language_projection
"""

from __future__ import annotations

import functools
import math

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F


@functools.lru_cache(maxsize=8)
def query_patch_distances(num_queries: int, num_tokens: int) -> np.ndarray:
    """[Q, P] squared distances, in query cells, from each query's cell to each patch centre.

    Queries and patches are both square row-major grids over the same image (the ViT's patch
    order); with a leading [CLS] token (P = g*g + 1) its column is 0: it summarises the image,
    so no query is kept from it.
    """
    gq = math.isqrt(num_queries)
    if gq * gq != num_queries:
        raise ValueError(f"cross_attention_locality lays the queries on a square grid: "
                         f"num_queries must be a square number, got {num_queries}")
    has_cls = math.isqrt(num_tokens) ** 2 != num_tokens
    gp = math.isqrt(num_tokens - has_cls)
    if gp * gp != num_tokens - has_cls:
        raise ValueError(f"cross_attention_locality needs a square patch grid (g*g image features, or "
                         f"g*g + 1 with [CLS]); got {num_tokens}")

    def centres(g):  # [g*g, 2] (row, col) in units of the image side
        rows, cols = np.divmod(np.arange(g * g), g)
        return np.stack([rows, cols], axis=1) / g + 0.5 / g

    delta = (centres(gq)[:, None, :] - centres(gp)[None, :, :]) * gq  # [Q, P, 2] in query cells
    dist = (delta ** 2).sum(-1).astype("float32")
    if has_cls:
        dist = np.concatenate([np.zeros([num_queries, 1], "float32"), dist], axis=1)
    return dist


class MultiHeadAttention(nn.Layer):
    """Multi-head attention; q from ``hidden``, k/v from ``kv_hidden``.

    ``kv_hidden`` differs from ``hidden`` for cross-attention, where k/v are
    projected straight from the vision encoder's width (as in BLIP-2).
    """

    def __init__(self, hidden: int, num_heads: int, kv_hidden: int | None = None):
        super().__init__()
        if hidden % num_heads != 0:
            raise ValueError(f"hidden ({hidden}) must be divisible by num_heads ({num_heads})")
        kv_hidden = hidden if kv_hidden is None else kv_hidden
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(kv_hidden, hidden)
        self.v_proj = nn.Linear(kv_hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def _split(self, x: paddle.Tensor) -> paddle.Tensor:
        # [B, L, D] -> [B, L, H, Dh]: the layout Paddle's SDPA expects.
        b, l = x.shape[0], x.shape[1]
        return x.reshape([b, l, self.num_heads, self.head_dim])

    def forward(self, x: paddle.Tensor, kv: paddle.Tensor | None = None,
                attn_mask: paddle.Tensor | None = None) -> paddle.Tensor:
        """attn_mask: bool [B, 1, Lq, Lk], True where a query position may read a key position,
        or float [B or 1, H or 1, Lq, Lk], added to the attention logits."""
        kv = x if kv is None else kv
        q = self._split(self.q_proj(x))  # [B, Q, H, Dh]
        k = self._split(self.k_proj(kv))  # [B, K, H, Dh]
        v = self._split(self.v_proj(kv))  # [B, K, H, Dh]
        # Without a mask (queries over queries or patches) every position is valid. Paddle's
        # SDPA (checked on CPU, paddle 3.3.1) uses the 1/sqrt(Dh) scale and takes a bool mask
        # or a float one it adds to the scaled logits.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, Q, H, Dh]
        out = out.reshape([out.shape[0], out.shape[1], -1])  # [B, Q, D]
        return self.out_proj(out)


class QFormerMLP(nn.Layer):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        # Exact (erf) GELU, as BERT/BLIP-2 use "gelu", not the tanh approximation.
        return self.fc2(F.gelu(self.fc1(x)))


class QFormerLayer(nn.Layer):
    """One post-norm BERT layer over the queries, optionally with cross-attention."""

    def __init__(self, hidden: int, vision_hidden: int, num_heads: int, intermediate: int,
                 has_cross_attention: bool, eps: float, locality: float = 0.0):
        super().__init__()
        self.has_cross_attention = has_cross_attention
        self.cross_attn_locality = None
        self.attn = MultiHeadAttention(hidden, num_heads)
        self.attn_norm = nn.LayerNorm(hidden, epsilon=eps)
        if has_cross_attention:
            # Only created when used, so state_dict has no dead cross-attn weights
            # (matches HF, where such layers lack `crossattention`).
            self.cross_attn = MultiHeadAttention(hidden, num_heads, kv_hidden=vision_hidden)
            if locality > 0:  # per-head strength of the distance penalty (see the module docstring)
                self.cross_attn_locality = self.create_parameter(
                    [num_heads], default_initializer=nn.initializer.Constant(locality))
            self.cross_attn_norm = nn.LayerNorm(hidden, epsilon=eps)
        self.mlp = QFormerMLP(hidden, intermediate)
        self.mlp_norm = nn.LayerNorm(hidden, epsilon=eps)

    def forward(self, x: paddle.Tensor, image_features: paddle.Tensor | None,
                attn_mask: paddle.Tensor | None = None) -> paddle.Tensor:
        # Post-norm (residual, then LayerNorm) as in BERT, not pre-norm.
        x = self.attn_norm(x + self.attn(x, attn_mask=attn_mask))  # [B, Q, D]
        if self.has_cross_attention:
            x = self.read_image(x, image_features)  # [B, Q, D]
        return self.mlp_norm(x + self.mlp(x))  # [B, Q, D]

    def read_image(self, q: paddle.Tensor, image_features: paddle.Tensor) -> paddle.Tensor:
        """The cross-attention sublayer: queries [B, Q, D] read image features [B, P, Dv]."""
        bias = None
        if self.cross_attn_locality is not None:
            dist = paddle.to_tensor(query_patch_distances(q.shape[1], image_features.shape[1]), dtype=q.dtype)
            bias = -self.cross_attn_locality.astype(q.dtype).reshape([1, -1, 1, 1]) * dist  # [1, H, Q, P]
        return self.cross_attn_norm(q + self.cross_attn(q, image_features, attn_mask=bias))

    def forward_joint(self, queries: paddle.Tensor | None, text: paddle.Tensor, image_features,
                      attn_mask: paddle.Tensor, text_ffn: "TextFeedForward"):
        """Queries [B, Q, D] (or None) and text [B, T, D] through one layer; returns both.

        Self-attention runs over the concatenation under `attn_mask` ([B, 1, Q+T, Q+T]);
        only the queries read the image, and each side has its own feed-forward (BLIP-2's
        ``intermediate_query``/``output_query`` for queries, ``intermediate``/``output`` for text).
        """
        nq = 0 if queries is None else queries.shape[1]
        x = text if queries is None else paddle.concat([queries, text], axis=1)  # [B, Q+T, D]
        x = self.attn_norm(x + self.attn(x, attn_mask=attn_mask))
        q, t = x[:, :nq], x[:, nq:]
        if nq:
            if self.has_cross_attention:
                q = self.read_image(q, image_features)
            q = self.mlp_norm(q + self.mlp(q))
        t = text_ffn.mlp_norm(t + text_ffn.mlp(t))
        return (q if nq else None), t


class TextFeedForward(nn.Layer):
    """A Q-Former layer's feed-forward for text tokens (BERT's intermediate/output)."""

    def __init__(self, hidden: int, intermediate: int, eps: float):
        super().__init__()
        self.mlp = QFormerMLP(hidden, intermediate)
        self.mlp_norm = nn.LayerNorm(hidden, epsilon=eps)


class QFormerTextBranch(nn.Layer):
    """The Q-Former's text side: BERT word and position embeddings, one text FFN per layer.

    The embeddings LayerNorm is the projector's ``query_norm`` (BLIP-2 normalizes queries and
    text with the same one), so it is not repeated here.

        word_embeddings, position_embeddings  <- bert.embeddings.{word,position}_embeddings
        layers.{i}.mlp.fc1 / fc2              <- bert.encoder.layer.{i}.intermediate.dense / output.dense
        layers.{i}.mlp_norm                   <- bert.encoder.layer.{i}.output.LayerNorm
    """

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int, intermediate_size: int,
                 max_positions: int, layer_norm_eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_positions, hidden_size)
        self.layers = nn.LayerList([TextFeedForward(hidden_size, intermediate_size, layer_norm_eps)
                                    for _ in range(num_layers)])

    def embed(self, input_ids: paddle.Tensor, norm: nn.Layer) -> paddle.Tensor:
        """[B, T] ids -> [B, T, D]: word + position embeddings through the shared LayerNorm."""
        if input_ids.shape[1] > self.position_embeddings.weight.shape[0]:
            raise ValueError(f"text of {input_ids.shape[1]} tokens exceeds the "
                             f"{self.position_embeddings.weight.shape[0]} position embeddings")
        positions = paddle.arange(input_ids.shape[1], dtype="int64").unsqueeze(0)
        return norm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class QFormerProjector(nn.Layer):
    """[B, P, vision_hidden] image features -> [B, num_queries, output_hidden]."""

    def __init__(self, vision_hidden: int, output_hidden: int, num_queries: int = 32,
                 hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                 intermediate_size: int = 3072, cross_attention_every: int = 2,
                 layer_norm_eps: float = 1e-12, cross_attention_locality: float = 0.0):
        super().__init__()
        if cross_attention_every < 1:
            raise ValueError("cross_attention_every must be >= 1")
        if cross_attention_locality < 0:
            raise ValueError(f"cross_attention_locality must be >= 0, got {cross_attention_locality}")
        if cross_attention_locality > 0:
            query_patch_distances(num_queries, 1)  # refuses a non-square query count now, not at the first batch
        self.num_queries = num_queries
        self.query_tokens = self.create_parameter(
            shape=[1, num_queries, hidden_size],
            default_initializer=nn.initializer.Normal(mean=0.0, std=0.02),
        )
        # BLIP-2 runs the queries through the embeddings LayerNorm before layer 0.
        self.query_norm = nn.LayerNorm(hidden_size, epsilon=layer_norm_eps)
        self.layers = nn.LayerList([
            QFormerLayer(hidden_size, vision_hidden, num_heads, intermediate_size,
                         has_cross_attention=(i % cross_attention_every == 0), eps=layer_norm_eps,
                         locality=cross_attention_locality)
            for i in range(num_layers)
        ])
        self.proj = nn.Linear(hidden_size, output_hidden)

    @property
    def num_output_tokens(self) -> int:
        return self.num_queries

    def query_states(self, image_features: paddle.Tensor) -> paddle.Tensor:
        """The Q-Former's output before the projection (HF's qformer last_hidden_state): [B, Q, D]."""
        b = image_features.shape[0]
        # Same learned queries for every image; expand keeps them shared so
        # gradients from all batch rows accumulate into one parameter.
        x = self.query_tokens.expand([b, -1, -1])  # [B, Q, D]
        x = self.query_norm(x)
        for layer in self.layers:
            x = layer(x, image_features)  # [B, Q, D]
        return x

    def forward(self, image_features: paddle.Tensor) -> paddle.Tensor:
        return self.proj(self.query_states(image_features))  # [B, Q, output_hidden]

    def joint_states(self, image_features, text_embeds, attn_mask, text_branch: QFormerTextBranch,
                     with_queries: bool = True):
        """Queries and embedded text [B, T, D] through every layer under one attention mask.

        Returns (query states [B, Q, D] or None, text states [B, T, D]); with_queries=False
        runs the text alone (BLIP-2's text-only pass for ITC).
        """
        queries = None
        if with_queries:
            queries = self.query_norm(self.query_tokens.expand([text_embeds.shape[0], -1, -1]))
        t = text_embeds
        for layer, ffn in zip(self.layers, text_branch.layers):
            queries, t = layer.forward_joint(queries, t, image_features, attn_mask, ffn)
        return queries, t
