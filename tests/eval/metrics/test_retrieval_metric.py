import numpy as np
import pytest

from paddle_mm.eval.metrics.retrieval import retrieval_report


def test_recall_by_hand():
    sim = np.array([[0.9, 0.1, 0.5],    # image 0: its text 0 ranked first
                    [0.8, 0.2, 0.7],    # image 1: its text 1 ranked third
                    [0.1, 0.3, 0.2]])   # image 2: its text 2 ranked second
    r = retrieval_report(sim, np.eye(3, dtype=bool), ks=(1, 2, 3))
    assert r["i2t"] == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "R@3": 1.0}
    # text 0: image 0 first; text 1: image 2 (0.3) > image 1 (0.2) > ...: rank 2; text 2: images 1, 0, 2: rank 3
    assert r["t2i"] == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "R@3": 1.0}
    assert r["chance"]["i2t"] == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "R@3": 1.0}


def test_several_relevant_texts_and_chance():
    # Image 0 has two correct texts of four; image 1 one.
    rel = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=bool)
    sim = np.array([[0.1, 0.9, 0.5, 0.2], [0.9, 0.1, 0.5, 0.2], [0.0, 0.0, 0.0, 1.0]])
    r = retrieval_report(sim, rel, ks=(1, 2))
    assert r["i2t"]["R@1"] == pytest.approx(2 / 3)  # image 1 ranks text 0 first: a miss
    assert r["i2t"]["R@2"] == pytest.approx(1.0)
    # chance@1: (2/4 + 1/4 + 1/4) / 3; chance@2 for m=2 of 4: 1 - C(2,2)/C(4,2) = 5/6, m=1: 1/2
    assert r["chance"]["i2t"]["R@1"] == pytest.approx((0.5 + 0.25 + 0.25) / 3)
    assert r["chance"]["i2t"]["R@2"] == pytest.approx((5 / 6 + 0.5 + 0.5) / 3)


def test_rejects_a_query_with_nothing_relevant():
    with pytest.raises(ValueError, match="at least one"):
        retrieval_report(np.zeros((2, 2)), np.array([[1, 0], [1, 0]], dtype=bool))
