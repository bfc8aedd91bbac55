"""The preallocated-KV decode step gives the backbone's own cached logits and tokens."""
import numpy as np
import paddle
import pytest

from paddle_mm.lm import kv_decode
from paddle_mm.lm.adapter import run_language_model
from paddle_mm.lm.decoding import decode

from .test_adapter import embeds, make_lm

STEPS = 12


def backbone_steps(lm, x, mask, tokens):
    """The backbone's cached step logits for fed tokens (teacher forcing), [steps, B, V]."""
    out = []
    with paddle.no_grad():
        logits, cache = run_language_model(lm, x, mask, None, use_cache=True, last_only=True)
        for t in tokens:
            mask = paddle.concat([mask, paddle.ones([mask.shape[0], 1], dtype=mask.dtype)], axis=1)
            logits, cache = run_language_model(lm, lm.get_input_embeddings()(t), mask, cache, use_cache=True,
                                               last_only=True)
            out.append(logits[:, -1].numpy())
    return np.stack(out), cache


@pytest.mark.parametrize("family, overrides", [
    ("qwen2", {}), ("llama", {}), ("qwen3", {}),
    ("qwen2", {"num_kv_heads": 4}),  # no grouping
    ("llama", {"num_kv_heads": 1}),  # one key/value head for all queries
])
def test_preallocated_steps_give_the_backbone_logits(family, overrides):
    lm = make_lm(family, **overrides)
    assert kv_decode.supports(lm)
    x = embeds(3, 7)
    mask = paddle.to_tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7, [0, 0, 0, 0, 0, 1, 1]], dtype="int64")  # left padding
    rng = np.random.default_rng(4)
    tokens = [paddle.to_tensor(rng.integers(0, 64, (3, 1))) for _ in range(STEPS)]
    expected, _ = backbone_steps(lm, x, mask, tokens)
    with paddle.no_grad():
        prompt, _ = run_language_model(lm, x, mask, None, use_cache=True, last_only=True)
        fast, first = kv_decode.PreallocatedDecoder.prefill(lm, x, mask, STEPS)
        got = np.stack([fast.step(lm.get_input_embeddings()(t))[:, -1].numpy() for t in tokens])
    assert np.abs(first.numpy() - prompt.numpy()).max() < 1e-5  # the prompt pass
    assert np.abs(got - expected).max() < 1e-5


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_greedy_tokens_are_those_of_the_backbone_step(family):
    lm = make_lm(family, seed=2)
    x = embeds(2, 9, seed=5)
    mask = paddle.to_tensor([[0, 0, 0] + [1] * 6, [1] * 9], dtype="int64")
    with paddle.no_grad():
        fast = decode(lm, x, mask, 20, None)
        plain = decode(lm, x, mask, 20, None, fast_steps=False)
    assert fast == plain and all(len(row) == 20 for row in fast)


def test_the_buffers_refuse_a_step_past_their_size():
    lm = make_lm()
    x, mask = embeds(1, 4), paddle.ones([1, 4], dtype="int64")
    with paddle.no_grad():
        fast, _ = kv_decode.PreallocatedDecoder.prefill(lm, x, mask, 1)
        fast.step(embeds(1, 1))
        with pytest.raises(ValueError, match="KV buffers hold 5 positions"):
            fast.step(embeds(1, 1))


def test_lora_and_opt_keep_the_backbone_step():
    from paddle_mm.config import LoraConfig
    from paddle_mm.lm.lora import add_lora

    lm = make_lm()
    add_lora(lm, LoraConfig(enabled=True, r=2, alpha=4))
    assert not kv_decode.supports(lm)
    assert not kv_decode.supports(make_lm("opt"))


def _left_padded(prompts):
    """[n, L, D] embeddings and their [n, L] mask for prompts of their own lengths, left-padded."""
    length = max(p.shape[1] for p in prompts)
    x = paddle.concat([paddle.concat([paddle.zeros([1, length - p.shape[1], p.shape[2]]), p], axis=1)
                       for p in prompts])
    mask = paddle.to_tensor([[0] * (length - p.shape[1]) + [1] * p.shape[1] for p in prompts], dtype="int64")
    return x, mask


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_rows_that_join_and_leave_a_running_batch_get_their_own_tokens(family):
    """Continuous batching: a row joining a running batch after some steps, a row leaving at eos,
    at its stop callback or its budget, each gives the greedy tokens it gets decoded alone."""
    from paddle_mm.lm.decoding import Row, RunningBatch

    lm = make_lm(family, seed=3)
    prompts = [embeds(1, n, seed=10 + n) for n in (9, 4, 6, 3)]
    budgets = [6, 10, 14, 9]  # the first row leaves before the later ones
    with paddle.no_grad():
        alone = [decode(lm, p, paddle.ones([1, p.shape[1]], dtype="int64"), n, None)[0]
                 for p, n in zip(prompts, budgets)]
    eos = alone[1][4]  # rows end where this token first comes
    expected = [row[:row.index(eos)] if eos in row else row for row in alone]
    expected[3] = expected[3][:3]  # row 3's callback ends it at its third token
    rows = [Row(n) for n in budgets[:3]] + [Row(budgets[3], on_token=lambda t, seen=[]: seen.append(t) or len(seen) == 3)]
    batch = RunningBatch(lm, eos)
    ended, widths = [], []
    with paddle.no_grad():
        ended += batch.add(prompts[0], paddle.ones([1, 9], dtype="int64"), rows[:1])
        for _ in range(3):
            ended += batch.step()
        ended += batch.add(*_left_padded(prompts[1:3]), rows[1:3])  # two rows join the one running
        ended += batch.step()
        ended += batch.add(*_left_padded(prompts[3:]), rows[3:])
        while batch.rows:
            widths.append(batch._decoder.bias.shape[-1])  # noqa: SLF001
            ended += batch.step()
    assert [r.tokens for r in rows] == expected
    assert sorted(map(id, ended)) == sorted(map(id, rows)) and batch._decoder is None  # noqa: SLF001
    assert min(widths) < max(widths)  # columns no row attends any more were dropped


def test_a_dynamic_rope_keeps_the_backbone_step():
    """Dynamic NTK scaling changes the frequencies with the longest position asked for, so the
    fixed rotary tables of the preallocated steps would not be the backbone's."""
    lm = make_lm()
    assert kv_decode.supports(lm)
    lm.model.rotary_emb.rope_type = "dynamic"
    assert not kv_decode.supports(lm)
