"""The cheaper uncached forward gives the backbone's own hidden states and gradients."""
import numpy as np
import paddle
import pytest

from paddle_mm.config import LoraConfig
from paddle_mm.lm import full_forward
from paddle_mm.lm.adapter import dense_mask_from_row_indices, enable_recompute, position_ids_from_mask, run_backbone
from paddle_mm.lm.lora import add_lora

from .test_adapter import embeds, make_lm

MASK = [[0, 0, 1, 1, 1, 1, 1], [1] * 7, [1, 1, 1, 1, 0, 0, 0]]  # left padding, none, right padding


def backbone(lm, x, mask, positions):
    return lm.model(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=False,
                    return_dict=True).last_hidden_state


def outputs_and_grads(fn, lm, x, upstream):
    """fn(x)'s value, and the gradients of <fn(x), upstream> for x and every trainable parameter
    (by backward(), which recompute's gradients also reach)."""
    x = x.detach()
    x.stop_gradient = False
    params = [p for p in lm.model.layers.parameters() + lm.model.norm.parameters() if not p.stop_gradient]
    for p in params:
        p.clear_gradient(set_to_zero=False)
    out = fn(x)
    (out * upstream).sum().backward()
    return out.numpy(), [x.grad.numpy()] + [p.grad.numpy() for p in params]


def assert_same(lm, fn_a, fn_b, x, tol=1e-5):
    upstream = paddle.to_tensor(np.random.default_rng(3).standard_normal(x.shape).astype("float32"))
    a, grads_a = outputs_and_grads(fn_a, lm, x, upstream)
    b, grads_b = outputs_and_grads(fn_b, lm, x, upstream)
    assert np.abs(a - b).max() < tol
    assert len(grads_a) == len(grads_b) > 1
    for ga, gb in zip(grads_a, grads_b):
        assert np.abs(ga - gb).max() <= tol * max(1.0, np.abs(gb).max())


@pytest.mark.parametrize("family, overrides", [
    ("qwen2", {}), ("llama", {}), ("qwen3", {}),
    ("qwen2", {"num_kv_heads": 4}),  # no grouping
    ("llama", {"num_kv_heads": 1}),
])
def test_hidden_states_and_gradients_are_the_backbone_s(family, overrides):
    lm = make_lm(family, **overrides)
    lm.train()
    assert full_forward.supports(lm)
    mask = paddle.to_tensor(MASK, dtype="int64")
    positions = position_ids_from_mask(mask)
    assert_same(lm, lambda x: full_forward.forward(lm, x, mask, positions),
                lambda x: backbone(lm, x, mask, positions), embeds(3, 7))


def test_run_backbone_takes_it_for_packed_rows():
    lm = make_lm("qwen2")
    lm.train()
    # Two rows: samples of 3 and 4 tokens, then one of 7; each column's first row that may not see it.
    rows = paddle.to_tensor([[3, 3, 3, 7, 7, 7, 7], [7] * 7], dtype="int32").reshape([2, 1, 7, 1])
    positions = paddle.to_tensor([[0, 1, 2, 0, 1, 2, 3], list(range(7))], dtype="int64")
    dense = dense_mask_from_row_indices(rows)
    assert_same(lm, lambda x: run_backbone(lm, x, position_ids=positions, attn_mask_startend_row_indices=rows)[0],
                lambda x: backbone(lm, x, dense, positions), embeds(2, 7))


def row_ends(rows: list[list[int]]) -> paddle.Tensor:
    """[B, 1, L, 1] sample ends (data/packing.py's form) for rows of the given sample lengths."""
    ends = []
    for lengths in rows:
        ends.append([start + n for start, n in zip(np.cumsum([0] + lengths[:-1]), lengths) for _ in range(n)])
    return paddle.to_tensor(ends, dtype="int32").reshape([len(rows), 1, -1, 1])


@pytest.mark.parametrize("family, overrides", [("qwen2", {}), ("qwen3", {}), ("llama", {"num_kv_heads": 1})])
def test_packed_rows_attend_sample_by_sample_as_the_dense_mask_does(family, overrides):
    lm = make_lm(family, **overrides)
    lm.train()
    # 9, 6 and 5 share a group (each more than half its longest), then 4 and 3, 2 alone, the 1s.
    rows = row_ends([[9, 3, 2, 1, 1], [6, 5, 4, 1]])
    segments = full_forward.Segments(rows, lm.config.num_attention_heads, "float32")
    assert [(count, width) for *_, count, width in segments.groups] == [(3, 9), (2, 4), (1, 2), (3, 1)]
    positions = paddle.to_tensor([[*range(9), *range(3), 0, 1, 0, 0], [*range(6), *range(5), *range(4), 0]],
                                 dtype="int64")
    assert full_forward.attends_by_segments(lm, embeds(2, 16))
    assert_same(lm, lambda x: run_backbone(lm, x, position_ids=positions, attn_mask_startend_row_indices=rows)[0],
                lambda x: backbone(lm, x, dense_mask_from_row_indices(rows), positions), embeds(2, 16))
    enable_recompute(lm)
    assert_same(lm, lambda x: run_backbone(lm, x, position_ids=positions, attn_mask_startend_row_indices=rows)[0],
                lambda x: backbone(lm, x, dense_mask_from_row_indices(rows), positions), embeds(2, 16))


def test_row_ends_that_do_not_form_samples_are_an_error():
    bad = paddle.to_tensor([[3, 3, 4, 4]], dtype="int32").reshape([1, 1, 4, 1])  # column 2's sample would be [2, 4)
    with pytest.raises(ValueError, match="packed row 0: column 0's sample ends at 3"):
        full_forward.Segments(bad, 2, "float32")


def test_lora_layers_and_recompute():
    lm = make_lm("qwen3")
    add_lora(lm, LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in lm.named_parameters():
        if name.endswith("lora_B"):
            p.set_value(paddle.randn(p.shape) * 0.1)  # B starts at zero: make the LoRA path count
    lm.train()
    assert full_forward.supports(lm)
    mask = paddle.to_tensor(MASK, dtype="int64")
    positions = position_ids_from_mask(mask)
    x = embeds(3, 7)
    reference = lambda x: backbone(lm, x, mask, positions)  # noqa: E731
    assert_same(lm, lambda x: full_forward.forward(lm, x, mask, positions), reference, x)
    enable_recompute(lm)
    assert_same(lm, lambda x: full_forward.forward(lm, x, mask, positions), reference, x)


def test_backbones_it_does_not_read_keep_their_forward():
    lm = make_lm("qwen2")
    lm.config.fuse_attention_qkv = True
    assert not full_forward.supports(lm)
    lm = make_lm("qwen2")
    lm.config.layer_types = ["sliding_attention"] * 2
    assert not full_forward.supports(lm)
    assert not full_forward.supports(make_lm("opt"))


def test_a_mask_past_the_spread_limit_is_added_by_broadcast(monkeypatch):
    lm = make_lm("qwen2")
    lm.train()
    mask = paddle.to_tensor(MASK, dtype="int64")
    positions = position_ids_from_mask(mask)
    bias = paddle.zeros([1, 1, 7, 7])
    assert full_forward.spread_bias(bias, 3, 4).shape == [3, 4, 7, 7]
    monkeypatch.setattr(full_forward, "SPREAD_LIMIT", 0)
    assert full_forward.spread_bias(bias, 3, 4).shape == [1, 1, 7, 7]
    assert_same(lm, lambda x: full_forward.forward(lm, x, mask, positions),
                lambda x: backbone(lm, x, mask, positions), embeds(3, 7))
