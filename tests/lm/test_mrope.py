"""The M-RoPE decoder (lm/mrope.py, PaddleFormers' Qwen2_5_VLTextModel with a head)."""
import numpy as np
import paddle
import pytest

from paddle_mm.config import LMConfig
from paddle_mm.lm.adapter import build_language_model, run_language_model

HIDDEN, VOCAB = 32, 64


def _config(family, **kw):
    return LMConfig(family=family, vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_layers=2,
                    num_heads=2, num_kv_heads=1, tie_word_embeddings=True, **kw)


def _pair():
    """An M-RoPE LM and PaddleFormers' Qwen2 with the same weights (their names are the same)."""
    paddle.seed(0)
    mrope = build_language_model(_config("qwen2_vl", mrope_section=[2, 3, 3]))
    qwen2 = build_language_model(_config("qwen2"))
    qwen2.set_state_dict(mrope.state_dict())
    mrope.eval(), qwen2.eval()
    return mrope, qwen2


def _embeds(length, seed=1):
    return paddle.to_tensor(np.random.default_rng(seed).standard_normal((1, length, HIDDEN)).astype("float32"))


def test_text_positions_in_all_three_rows_give_qwen2():
    """Text has the same position in every row; then M-RoPE is the plain rotary of Qwen2."""
    mrope, qwen2 = _pair()
    x = _embeds(9)
    pos = paddle.arange(9, dtype="int64").reshape([1, 1, -1]).expand([3, 1, -1])
    with paddle.no_grad():
        a, _ = run_language_model(mrope, x, position_ids=pos)
        b, _ = run_language_model(qwen2, x)
    assert float((a - b).abs().max()) <= 1e-5


def test_rows_that_differ_change_the_logits_and_the_cache_follows_them():
    mrope, _ = _pair()
    x = _embeds(8)
    text = paddle.arange(8, dtype="int64").reshape([1, 1, -1]).expand([3, 1, -1])
    grid = paddle.to_tensor([[[0, 1, 2, 2, 2, 2, 5, 6]], [[0, 1, 2, 2, 3, 3, 5, 6]], [[0, 1, 2, 3, 2, 3, 5, 6]]])
    with paddle.no_grad():
        full, _ = run_language_model(mrope, x, position_ids=grid)
        plain, _ = run_language_model(mrope, x, position_ids=text)
        assert float((full[:, 3:] - plain[:, 3:]).abs().max()) > 1e-3
        # the same positions, 5 at once then one at a time through the cache
        mask = paddle.ones([1, 5], dtype="int64")
        first, cache = run_language_model(mrope, x[:, :5], mask, use_cache=True, position_ids=grid[:, :, :5])
        steps = [first[:, -1]]
        for k in range(5, 8):
            mask = paddle.ones([1, k + 1], dtype="int64")
            out, cache = run_language_model(mrope, x[:, k:k + 1], mask, cache, use_cache=True,
                                            position_ids=grid[:, :, k:k + 1])
            steps.append(out[:, -1])
    cached = paddle.stack(steps, axis=1)
    assert float((cached - full[:, 4:]).abs().max()) <= 1e-5


def test_qwen3_vl_text_model_decodes_through_the_cache_as_at_once():
    """Qwen3-VL's decoder (interleaved rows), with DeepStack features added at two positions."""
    paddle.seed(0)
    lm = build_language_model(_config("qwen3_vl", mrope_section=[2, 3, 3]))
    lm.eval()
    x = _embeds(6)
    pos = paddle.to_tensor([[[0, 1, 1, 1, 3, 4]], [[0, 1, 1, 2, 3, 4]], [[0, 1, 2, 1, 3, 4]]])
    mask = paddle.to_tensor([[False, True, True, True, False, False]])
    deep = {"visual_pos_masks": mask, "deepstack_visual_embeds": [paddle.ones([3, HIDDEN])]}
    with paddle.no_grad():
        full, _ = run_language_model(lm, x, position_ids=pos, **deep)
        plain, _ = run_language_model(lm, x, position_ids=pos)
        assert float((full - plain)[:, 1:].abs().max()) > 1e-3  # the features reach the states
        first, cache = run_language_model(lm, x[:, :5], paddle.ones([1, 5], dtype="int64"), use_cache=True,
                                          position_ids=pos[:, :, :5],
                                          **{**deep, "visual_pos_masks": mask[:, :5]})
        last, _ = run_language_model(lm, x[:, 5:], paddle.ones([1, 6], dtype="int64"), cache, use_cache=True,
                                     position_ids=pos[:, :, 5:])
    assert float((last[:, -1] - full[:, -1]).abs().max()) <= 1e-5


def test_a_section_that_does_not_cover_the_head_is_refused():
    with pytest.raises(ValueError, match="mrope_section"):
        build_language_model(_config("qwen2_vl", mrope_section=[2, 2, 2]))
