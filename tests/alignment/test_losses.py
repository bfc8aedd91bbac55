import math

import numpy as np
import paddle
import pytest

from paddle_mm.alignment.losses import attention_mask, contrastive_loss, hard_negatives, same_text

# Two queries, three text slots; the second caption has one padding slot.
VALID = np.array([[1, 1, 1], [1, 1, 0]], dtype=bool)


def test_itc_mask_keeps_queries_and_text_apart():
    m = attention_mask("itc", 2, VALID)[:, 0]
    assert m.shape == (2, 5, 5)
    assert m[:, :2, :2].all()  # queries read queries
    assert not m[:, :2, 2:].any() and not m[:, 2:, :2].any()  # and never the text, nor text them
    assert m[0, 2:, 2:].all()  # bidirectional text
    np.testing.assert_array_equal(m[1, 2:, 2:], [[1, 1, 0]] * 3)  # padding is never read


def test_itm_mask_is_bidirectional_over_valid_tokens():
    m = attention_mask("itm", 2, VALID)[:, 0]
    assert m[0].all()
    np.testing.assert_array_equal(m[1], [[1, 1, 1, 1, 0]] * 5)


def test_itg_mask_queries_blind_to_text_and_text_causal():
    m = attention_mask("itg", 2, VALID)[:, 0]
    expected = np.array([
        [1, 1, 0, 0, 0],  # query 0
        [1, 1, 0, 0, 0],  # query 1: no query reads the text
        [1, 1, 1, 0, 0],  # text 0 reads every query and itself
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ], dtype=bool)
    np.testing.assert_array_equal(m[0], expected)
    expected[:, 4] = False  # row 1's last slot is padding
    np.testing.assert_array_equal(m[1], expected)


def test_mask_without_queries_and_bad_kind():
    assert attention_mask("itc", 0, VALID).shape == (2, 1, 3, 3)
    with pytest.raises(ValueError, match="itx"):
        attention_mask("itx", 2, VALID)


def test_same_text_ignores_padding_content():
    ids = np.array([[2, 7, 3, 0], [2, 7, 3, 9], [2, 8, 3, 0]])
    valid = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]], dtype=bool)
    np.testing.assert_array_equal(same_text(ids, valid), [[1, 1, 0], [1, 1, 0], [0, 0, 1]])


def test_contrastive_loss_by_hand():
    sim = paddle.to_tensor([[2.0, 0.0], [0.0, 2.0]])
    # Each row and column: -log(e^2 / (e^2 + e^0)) = log(1 + e^-2).
    assert float(contrastive_loss(sim, np.eye(2, dtype=bool))) == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    # Rows 0 and 1 share a caption: targets split 1/2-1/2.
    sim = paddle.to_tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = float(contrastive_loss(sim, np.ones((2, 2), dtype=bool)))
    assert loss == pytest.approx(math.log(1 + math.e) - 0.5, rel=1e-6)
    # Asymmetric: image->text and text->image differ and are averaged.
    sim = paddle.to_tensor([[1.0, 2.0], [0.0, 0.0]])
    i2t = (math.log(math.e + math.e**2) - 1 + math.log(2)) / 2
    t2i = (math.log(math.e + 1) - 1 + math.log(math.e**2 + 1) - 0) / 2
    assert float(contrastive_loss(sim, np.eye(2, dtype=bool))) == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_hard_negatives_never_positive_and_follow_the_similarities():
    rng = np.random.default_rng(0)
    sim = np.array([[5.0, 4.0, 0.0], [1.0, 5.0, 1.0], [0.0, 3.0, 5.0]])
    pos = np.eye(3, dtype=bool)
    pos[0, 2] = pos[2, 0] = True  # images 0 and 2 share a caption
    counts = np.zeros((3, 3))
    for _ in range(2000):
        neg_img, neg_txt = hard_negatives(sim, pos, rng)
        for i, t in enumerate(neg_txt):
            counts[i, t] += 1
            assert not pos[i, t]
        for t, i in enumerate(neg_img):
            assert not pos[i, t]
    # Image 0's only negative text is 1; image 1 draws 0 or 2 evenly (equal similarity 1.0).
    assert counts[0, 1] == 2000
    assert counts[1, 0] / 2000 == pytest.approx(0.5, abs=0.05)
    # Peaked similarities: the hardest negative (highest similarity) dominates as softmax says.
    sim = np.array([[0.0, 9.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    draws = [hard_negatives(sim, np.eye(3, dtype=bool), rng)[1][0] for _ in range(200)]
    assert np.mean(np.array(draws) == 1) > 0.99


def test_hard_negatives_none_when_every_caption_is_the_same():
    neg_img, neg_txt = hard_negatives(np.zeros((2, 2)), np.ones((2, 2), dtype=bool), np.random.default_rng(0))
    assert list(neg_img) == [-1, -1] and list(neg_txt) == [-1, -1]
