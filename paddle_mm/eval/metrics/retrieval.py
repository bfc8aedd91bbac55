"""Image-text retrieval recall@k both ways, with the chance level of the same candidate sets.

Relevance is a boolean matrix [images, texts], so an image may have several correct texts
(COCO's five captions) and a text several correct images (the same caption written for two
scenes). A query scores a hit at k when any relevant candidate is among its k best. Chance is
the expected recall of a random ranking: 1 - C(N - m, k) / C(N, k) for m relevant of N
candidates, averaged over the queries; it is 1/N at k=1 when each query has one match.
"""
from __future__ import annotations

from math import comb

import numpy as np

KS = (1, 5, 10)


def _recall(sim: np.ndarray, relevant: np.ndarray, ks) -> dict[str, float]:
    order = np.argsort(-sim, axis=1, kind="stable")  # best first; ties keep candidate order
    hits = np.take_along_axis(relevant, order, axis=1)
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), sim.shape[1])  # rank of the first hit
    return {f"R@{k}": float(np.mean(first < k)) for k in ks}


def _chance(relevant: np.ndarray, ks) -> dict[str, float]:
    n = relevant.shape[1]
    m = relevant.sum(axis=1)
    return {f"R@{k}": float(np.mean([1 - comb(n - int(r), min(k, n)) / comb(n, min(k, n)) for r in m])) for k in ks}


def retrieval_report(sim: np.ndarray, relevant: np.ndarray, ks=KS) -> dict:
    """{"i2t": {"R@1": ...}, "t2i": {...}, "chance": {"i2t": ..., "t2i": ...}, sizes} for sim [images, texts]."""
    sim = np.asarray(sim, dtype="float64")
    relevant = np.asarray(relevant, dtype=bool)
    if sim.shape != relevant.shape:
        raise ValueError(f"similarities {sim.shape} and relevance {relevant.shape} differ in shape")
    if not relevant.any(axis=1).all() or not relevant.any(axis=0).all():
        raise ValueError("every image and every text needs at least one relevant match")
    return {
        "i2t": _recall(sim, relevant, ks),
        "t2i": _recall(sim.T, relevant.T, ks),
        "chance": {"i2t": _chance(relevant, ks), "t2i": _chance(relevant.T, ks)},
        "num_images": int(sim.shape[0]),
        "num_texts": int(sim.shape[1]),
    }
