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

Two additions, both off by default and without parameters (the layout below holds):
``image_position_embedding="sincos_2d"`` adds a fixed 2D sine-cosine table of the patch grid to
the image features every cross-attention reads, and ``query_position_embedding="sincos_2d"``
adds the table of a sqrt(Q) x sqrt(Q) grid to the queries as they read them. QFormerConfig says
why the demo needs them.

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
def sincos_2d_table(num_tokens: int, dim: int) -> np.ndarray:
    """[num_tokens, dim] fixed 2D sine-cosine positions for a square patch grid, row-major.

    The first dim/2 channels encode the row, the rest the column, each half as sines then
    cosines over dim/4 geometric frequencies (base 10000). A leading [CLS] token (num_tokens =
    g*g + 1) gets zeros: it has no place on the grid.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d needs an image feature width divisible by 4, got {dim}")
    grid = math.isqrt(num_tokens)
    has_cls = grid * grid != num_tokens
    if has_cls:
        grid = math.isqrt(num_tokens - 1)
        if grid * grid != num_tokens - 1:
            raise ValueError(f"sincos_2d needs a square patch grid (g*g tokens, or g*g + 1 with [CLS]); "
                             f"got {num_tokens} image feature tokens")
    freqs = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))  # [dim/4]
    rows, cols = np.divmod(np.arange(grid * grid), grid)  # row-major, as the ViT flattens patches

    def encode(coord):  # [g*g] -> [g*g, dim/2]
        angles = coord[:, None] * freqs[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(rows), encode(cols)], axis=1).astype("float32")
    if has_cls:
        table = np.concatenate([np.zeros([1, dim], "float32"), table], axis=0)
    return table


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
        """attn_mask: bool [B, 1, Lq, Lk], True where a query position may read a key position."""
        kv = x if kv is None else kv
        q = self._split(self.q_proj(x))  # [B, Q, H, Dh]
        k = self._split(self.k_proj(kv))  # [B, K, H, Dh]
        v = self._split(self.v_proj(kv))  # [B, K, H, Dh]
        # Without a mask (queries over queries or patches) every position is valid. Paddle's
        # SDPA (checked on CPU, paddle 3.3.1) uses the 1/sqrt(Dh) scale and takes a bool mask.
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
                 has_cross_attention: bool, eps: float):
        super().__init__()
        self.has_cross_attention = has_cross_attention
        self.attn = MultiHeadAttention(hidden, num_heads)
        self.attn_norm = nn.LayerNorm(hidden, epsilon=eps)
        if has_cross_attention:
            # Only created when used, so state_dict has no dead cross-attn weights
            # (matches HF, where such layers lack `crossattention`).
            self.cross_attn = MultiHeadAttention(hidden, num_heads, kv_hidden=vision_hidden)
            self.cross_attn_norm = nn.LayerNorm(hidden, epsilon=eps)
        self.mlp = QFormerMLP(hidden, intermediate)
        self.mlp_norm = nn.LayerNorm(hidden, epsilon=eps)

    def read_image(self, q: paddle.Tensor, image_features, query_positions=None) -> paddle.Tensor:
        """Cross-attention sublayer; query positions (if any) shape what each query reads, not its residual."""
        reader = q if query_positions is None else q + query_positions
        return self.cross_attn_norm(q + self.cross_attn(reader, image_features))  # [B, Q, D]

    def forward(self, x: paddle.Tensor, image_features: paddle.Tensor | None,
                attn_mask: paddle.Tensor | None = None, query_positions=None) -> paddle.Tensor:
        # Post-norm (residual, then LayerNorm) as in BERT, not pre-norm.
        x = self.attn_norm(x + self.attn(x, attn_mask=attn_mask))  # [B, Q, D]
        if self.has_cross_attention:
            x = self.read_image(x, image_features, query_positions)
        return self.mlp_norm(x + self.mlp(x))  # [B, Q, D]

    def forward_joint(self, queries: paddle.Tensor | None, text: paddle.Tensor, image_features,
                      attn_mask: paddle.Tensor, text_ffn: "TextFeedForward", query_positions=None):
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
                q = self.read_image(q, image_features, query_positions)
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
                 layer_norm_eps: float = 1e-12, image_position_embedding: str = "none",
                 query_position_embedding: str = "none"):
        super().__init__()
        if cross_attention_every < 1:
            raise ValueError("cross_attention_every must be >= 1")
        for name, value in (("image_position_embedding", image_position_embedding),
                            ("query_position_embedding", query_position_embedding)):
            if value not in ("none", "sincos_2d"):
                raise ValueError(f"{name} must be none or sincos_2d, got {value!r}")
        self.num_queries = num_queries
        self.image_position_embedding = image_position_embedding
        # Queries laid on a sqrt(Q) x sqrt(Q) grid: query i reads the image with the position of
        # grid cell i added, so it can prefer the patches there (Qwen-VL's resampler does this).
        self.query_positions = None
        if query_position_embedding == "sincos_2d":
            grid = math.isqrt(num_queries)
            if grid * grid != num_queries:
                raise ValueError(f"query_position_embedding sincos_2d lays the queries on a square grid: "
                                 f"num_queries must be a square, got {num_queries}")
            self.query_positions = sincos_2d_table(num_queries, hidden_size)  # [Q, D]
        self.query_tokens = self.create_parameter(
            shape=[1, num_queries, hidden_size],
            default_initializer=nn.initializer.Normal(mean=0.0, std=0.02),
        )
        # BLIP-2 runs the queries through the embeddings LayerNorm before layer 0.
        self.query_norm = nn.LayerNorm(hidden_size, epsilon=layer_norm_eps)
        self.layers = nn.LayerList([
            QFormerLayer(hidden_size, vision_hidden, num_heads, intermediate_size,
                         has_cross_attention=(i % cross_attention_every == 0), eps=layer_norm_eps)
            for i in range(num_layers)
        ])
        self.proj = nn.Linear(hidden_size, output_hidden)

    @property
    def num_output_tokens(self) -> int:
        return self.num_queries

    def with_positions(self, image_features: paddle.Tensor) -> paddle.Tensor:
        """The image features as the cross-attention reads them: [B, P, D], positions added if set."""
        if self.image_position_embedding == "none" or image_features is None:  # None: a text-only pass
            return image_features
        table = sincos_2d_table(image_features.shape[1], image_features.shape[2])
        return image_features + paddle.to_tensor(table, dtype=image_features.dtype).unsqueeze(0)

    def _query_positions(self, dtype):
        if self.query_positions is None:
            return None
        return paddle.to_tensor(self.query_positions, dtype=dtype).unsqueeze(0)  # [1, Q, D]

    def query_states(self, image_features: paddle.Tensor) -> paddle.Tensor:
        """The Q-Former's output before the projection (HF's qformer last_hidden_state): [B, Q, D]."""
        b = image_features.shape[0]
        image_features = self.with_positions(image_features)
        # Same learned queries for every image; expand keeps them shared so
        # gradients from all batch rows accumulate into one parameter.
        x = self.query_tokens.expand([b, -1, -1])  # [B, Q, D]
        x = self.query_norm(x)
        positions = self._query_positions(x.dtype)
        for layer in self.layers:
            x = layer(x, image_features, query_positions=positions)  # [B, Q, D]
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
        image_features = self.with_positions(image_features)
        positions = self._query_positions(text_embeds.dtype)
        if with_queries:
            queries = self.query_norm(self.query_tokens.expand([text_embeds.shape[0], -1, -1]))
        t = text_embeds
        for layer, ffn in zip(self.layers, text_branch.layers):
            queries, t = layer.forward_joint(queries, t, image_features, attn_mask, ffn, positions)
        return queries, t
