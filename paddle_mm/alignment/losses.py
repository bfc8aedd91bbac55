"""The alignment losses and the Q-Former's attention masks (BLIP-2 stage 1, CLIP).

Masks are boolean [B, 1, Q+T, Q+T] over the queries followed by the text tokens; True means
the row position may read the column position. Padded text columns are never readable.

    itc  unimodal: queries read queries, text reads text; neither sees the other, so each
         side's output is its own (queries = the projector's output, text = a BERT pass)
    itm  bidirectional: every position reads every query and every text token
    itg  multimodal causal: queries read queries only (query-to-text masked), text reads
         every query and the text tokens up to and including itself
"""
from __future__ import annotations

import numpy as np

MASK_KINDS = ("itc", "itm", "itg")


def attention_mask(kind: str, num_queries: int, text_valid: np.ndarray) -> np.ndarray:
    """Boolean mask [B, 1, Q+T, Q+T] for `kind`; text_valid [B, T] marks non-padding tokens."""
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind {kind!r} is not one of {MASK_KINDS}")
    valid = np.asarray(text_valid).astype(bool)
    b, t = valid.shape
    q = num_queries
    m = np.zeros((b, q + t, q + t), dtype=bool)
    m[:, :q, :q] = True  # queries always read each other
    text_cols = np.broadcast_to(valid[:, None, :], (b, q + t, t))
    if kind == "itc":
        m[:, q:, q:] = text_cols[:, q:]
    elif kind == "itm":
        m[:, :, :q] = True
        m[:, :, q:] = text_cols
    else:
        m[:, q:, :q] = True
        causal = np.tril(np.ones((t, t), dtype=bool))
        m[:, q:, q:] = text_cols[:, q:] & causal
    return m[:, None]


def same_text(input_ids: np.ndarray, text_valid: np.ndarray) -> np.ndarray:
    """[B, B] bool: rows i, j hold the same caption (identical tokens): both are positives.

    Synthetic and real caption sets repeat captions ("a red circle in the center"); treating
    a duplicate as a negative would push apart two correct pairs.
    """
    ids = np.where(np.asarray(text_valid).astype(bool), input_ids, -1)
    return (ids[:, None, :] == ids[None, :, :]).all(-1)


def contrastive_loss(sim, positives):
    """Symmetric InfoNCE over a [B, B] similarity matrix (already divided by the temperature).

    Image i's target distribution spreads evenly over its positive texts (positives [B, B]
    bool, the diagonal always set); texts likewise over images. Returns the mean of the
    image-to-text and text-to-image cross-entropies.
    """
    import paddle
    import paddle.nn.functional as F

    pos = paddle.to_tensor(np.asarray(positives, dtype="float32"))
    targets = pos / pos.sum(axis=1, keepdim=True)
    i2t = -(F.log_softmax(sim, axis=1) * targets).sum(axis=1).mean()
    targets_t = pos.T / pos.T.sum(axis=1, keepdim=True)
    t2i = -(F.log_softmax(sim.T, axis=1) * targets_t).sum(axis=1).mean()
    return (i2t + t2i) / 2


def hard_negatives(sim: np.ndarray, positives: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mine one negative per row and per column from contrastive similarities (BLIP-2's ITM).

    sim [B, B] (image i, text j) divided by the temperature. For text j a negative image is
    drawn with probability softmax over images of sim[:, j], positives excluded; image i's
    negative text likewise from sim[i, :]. Returns (negative image per text [B], negative
    text per image [B]). A row whose every candidate is a positive (a batch of one caption)
    has no negative: -1.
    """
    pos = np.asarray(positives, dtype=bool)

    def draw(scores: np.ndarray, excluded: np.ndarray) -> np.ndarray:
        out = np.full(scores.shape[0], -1, dtype="int64")
        for r in range(scores.shape[0]):
            allowed = ~excluded[r]
            if not allowed.any():
                continue
            s = np.where(allowed, scores[r] - scores[r][allowed].max(), -np.inf)
            p = np.exp(s)
            out[r] = int(rng.choice(len(p), p=p / p.sum()))
        return out

    sim = np.asarray(sim, dtype="float64")
    neg_image_for_text = draw(sim.T, pos.T)
    neg_text_for_image = draw(sim, pos)
    return neg_image_for_text, neg_text_for_image
