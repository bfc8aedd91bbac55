import numpy as np
import paddle
import pytest

from paddle_mm.projectors.qformer import MultiHeadAttention, QFormerProjector, sincos_2d_table

VISION_HIDDEN, OUTPUT_HIDDEN, HIDDEN, HEADS, LAYERS, QUERIES = 24, 40, 32, 2, 4, 6


def make_model(seed: int = 0, image_position_embedding: str = "none", query_position_embedding: str = "none",
               num_queries: int = QUERIES) -> QFormerProjector:
    paddle.seed(seed)
    model = QFormerProjector(VISION_HIDDEN, OUTPUT_HIDDEN, num_queries=num_queries, hidden_size=HIDDEN,
                             num_layers=LAYERS, num_heads=HEADS, intermediate_size=64,
                             cross_attention_every=2, image_position_embedding=image_position_embedding,
                             query_position_embedding=query_position_embedding)
    model.eval()
    return model


def image_features(b: int = 2, p: int = 9, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, p, VISION_HIDDEN)).astype("float32")


def test_output_shape_and_num_tokens():
    model = make_model()
    out = model(paddle.to_tensor(image_features(2, 9)))
    assert out.shape == [2, QUERIES, OUTPUT_HIDDEN]
    assert model.num_output_tokens == QUERIES
    assert model.query_tokens.shape == [1, QUERIES, HIDDEN]


def test_cross_attention_only_on_even_layers():
    sd = make_model().state_dict()
    layers_with_cross = sorted({int(k.split(".")[1]) for k in sd if ".cross_attn" in k})
    assert layers_with_cross == [0, 2]
    for i in (0, 2):
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert f"layers.{i}.cross_attn.{name}.weight" in sd
            assert f"layers.{i}.cross_attn.{name}.bias" in sd
        assert f"layers.{i}.cross_attn_norm.weight" in sd
        # Paddle Linear weight is [in, out]: k/v read straight from vision_hidden.
        assert sd[f"layers.{i}.cross_attn.k_proj.weight"].shape == [VISION_HIDDEN, HIDDEN]
        assert sd[f"layers.{i}.cross_attn.v_proj.weight"].shape == [VISION_HIDDEN, HIDDEN]
        assert sd[f"layers.{i}.cross_attn.q_proj.weight"].shape == [HIDDEN, HIDDEN]
    for i in range(LAYERS):
        for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj",
                     "attn_norm", "mlp.fc1", "mlp.fc2", "mlp_norm"):
            assert f"layers.{i}.{name}.weight" in sd
    assert "query_tokens" in sd and "query_norm.weight" in sd and "proj.weight" in sd
    assert sd["proj.weight"].shape == [HIDDEN, OUTPUT_HIDDEN]


def test_output_depends_on_image_and_rows_are_independent():
    model = make_model()
    x = image_features(2, 9)
    base = model(paddle.to_tensor(x)).numpy()
    x2 = x.copy()
    x2[1] += np.random.default_rng(5).standard_normal(x2[1].shape).astype("float32")
    pert = model(paddle.to_tensor(x2)).numpy()
    np.testing.assert_allclose(pert[0], base[0], rtol=0, atol=1e-6)
    assert np.abs(pert[1] - base[1]).max() > 1e-3
    # Row 0 run alone gives the same result as inside the batch.
    alone = model(paddle.to_tensor(x[:1])).numpy()
    np.testing.assert_allclose(alone[0], base[0], rtol=1e-5, atol=1e-5)


def test_invariant_to_patch_permutation():
    model = make_model()
    x = image_features(2, 9)
    perm = np.random.default_rng(3).permutation(9)
    out = model(paddle.to_tensor(x)).numpy()
    out_perm = model(paddle.to_tensor(x[:, perm])).numpy()
    np.testing.assert_allclose(out_perm, out, rtol=1e-5, atol=1e-5)


def test_sincos_positions_make_the_output_depend_on_patch_order():
    # The same patches in another order are another image once positions are added; the
    # parameters are the same as without them (nothing new to load from a BLIP-2 checkpoint).
    model = make_model(image_position_embedding="sincos_2d")
    assert model.state_dict().keys() == make_model().state_dict().keys()
    x = image_features(2, 9)
    perm = np.random.default_rng(3).permutation(9)
    out = model(paddle.to_tensor(x)).numpy()
    assert np.abs(model(paddle.to_tensor(x[:, perm])).numpy() - out).max() > 1e-3
    # With identical patch contents, only the positions can tell the queries anything.
    same = np.repeat(x[:, :1], 9, axis=1)
    assert np.abs(model(paddle.to_tensor(same)).numpy() - make_model()(paddle.to_tensor(same)).numpy()).max() > 1e-3


def test_query_positions_let_identical_queries_read_differently():
    # All queries equal: without positions every query computes the same thing; on a grid of
    # their own they read the image differently. No parameters are added either way.
    plain = make_model(num_queries=9)
    placed = make_model(num_queries=9, query_position_embedding="sincos_2d")
    assert placed.state_dict().keys() == plain.state_dict().keys()
    same = paddle.ones([1, 9, HIDDEN]) * 0.3
    for model in (plain, placed):
        model.query_tokens.set_value(same)
    x = paddle.to_tensor(image_features(2, 9))
    out_plain, out_placed = plain(x).numpy(), placed(x).numpy()
    np.testing.assert_allclose(out_plain, np.repeat(out_plain[:, :1], 9, axis=1), atol=1e-5)
    assert np.abs(out_placed - out_placed[:, :1]).max() > 1e-3
    with pytest.raises(ValueError, match="num_queries must be a square"):
        make_model(num_queries=6, query_position_embedding="sincos_2d")


def test_sincos_table_encodes_row_and_column():
    table = sincos_2d_table(9, 8)  # 3x3 grid, row-major; channels 0-3 row, 4-7 column
    rows, cols = np.divmod(np.arange(9), 3)
    for a in range(9):
        for b in range(9):
            assert np.array_equal(table[a, :4], table[b, :4]) == (rows[a] == rows[b])
            assert np.array_equal(table[a, 4:], table[b, 4:]) == (cols[a] == cols[b])
    # Position 0 is sin(0)=0 then cos(0)=1 in both halves; row 1, frequency 1: sin(1), cos(1).
    np.testing.assert_allclose(table[0], [0, 0, 1, 1, 0, 0, 1, 1])
    np.testing.assert_allclose(table[3, [0, 2]], [np.sin(1.0), np.cos(1.0)], rtol=1e-6)
    with_cls = sincos_2d_table(10, 8)
    np.testing.assert_array_equal(with_cls[0], np.zeros(8))
    np.testing.assert_array_equal(with_cls[1:], table)


@pytest.mark.parametrize("tokens, dim, message", [(8, 8, "square patch grid"), (9, 6, "divisible by 4")])
def test_sincos_table_refuses_what_it_cannot_place(tokens, dim, message):
    with pytest.raises(ValueError, match=message):
        sincos_2d_table(tokens, dim)


def test_gradients_reach_every_parameter():
    model = make_model()
    model.train()
    model(paddle.to_tensor(image_features(2, 9))).sum().backward()
    params = dict(model.named_parameters())
    assert "query_tokens" in params
    for name, p in params.items():
        assert p.grad is not None, name
        assert np.isfinite(p.grad.numpy()).all(), name
    assert np.abs(model.query_tokens.grad.numpy()).max() > 0


def np_attention(x, kv, attn: MultiHeadAttention):
    """Reference: plain softmax(QK^T / sqrt(Dh)) V with per-head split."""
    w = {n: getattr(attn, n).weight.numpy().astype("float64") for n in ("q_proj", "k_proj", "v_proj", "out_proj")}
    bias = {n: getattr(attn, n).bias.numpy().astype("float64") for n in w}
    h, dh = attn.num_heads, attn.head_dim

    def heads(t):  # [B, L, D] -> [B, H, L, Dh]
        return t.reshape(t.shape[0], t.shape[1], h, dh).transpose(0, 2, 1, 3)

    q = heads(x @ w["q_proj"] + bias["q_proj"])
    k = heads(kv @ w["k_proj"] + bias["k_proj"])
    v = heads(kv @ w["v_proj"] + bias["v_proj"])
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = (s @ v).transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], h * dh)
    return o @ w["out_proj"] + bias["out_proj"]


@pytest.mark.parametrize("kv_hidden", [None, 12])
def test_attention_matches_numpy_reference(kv_hidden):
    paddle.seed(7)
    attn = MultiHeadAttention(16, 4, kv_hidden=kv_hidden)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 5, 16)).astype("float32")
    kv = rng.standard_normal((2, 7, kv_hidden or 16)).astype("float32")
    got = attn(paddle.to_tensor(x), paddle.to_tensor(kv)).numpy()
    ref = np_attention(x.astype("float64"), kv.astype("float64"), attn)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    if kv_hidden is None:  # self-attention path: kv defaults to x
        got_self = attn(paddle.to_tensor(x)).numpy()
        ref_self = np_attention(x.astype("float64"), x.astype("float64"), attn)
        np.testing.assert_allclose(got_self, ref_self, rtol=1e-5, atol=1e-5)


def test_matches_blip2_qformer_of_transformers():
    """Fed the reference ViT features, the Q-Former alone reproduces transformers' BLIP-2 Q-Former."""
    import os

    from paddle_mm.checkpoint import load_tensors
    from paddle_mm.weights.blip2 import HF_QFORMER
    from paddle_mm.weights.hf import read_tensors
    from paddle_mm.weights.mapping import load_mapped

    fixture = os.path.join(os.path.dirname(__file__), "..", "fixtures", "reference", "blip2")
    ref = load_tensors(os.path.join(fixture, "reference.safetensors"))
    model = QFormerProjector(32, 32, num_queries=4, hidden_size=32, num_layers=2, num_heads=4,
                             intermediate_size=64, cross_attention_every=2)
    model.eval()
    tensors = {k: v for k, v in read_tensors(os.path.join(fixture, "hf")).items()
               if k.startswith(("qformer.", "query_tokens", "language_projection."))}
    load_mapped(model, tensors, HF_QFORMER, "blip2 fixture")
    with paddle.no_grad():
        queries = model.query_states(paddle.to_tensor(ref["vision_features"]))
        projected = model.proj(queries)
    assert np.abs(queries.numpy() - ref["qformer_output"]).max() <= 1e-4
    assert np.abs(projected.numpy() - ref["projected"]).max() <= 1e-4
