import numpy as np
import paddle
import pytest

from paddle_mm.projectors.qformer import MultiHeadAttention, QFormerProjector, query_patch_distances

VISION_HIDDEN, OUTPUT_HIDDEN, HIDDEN, HEADS, LAYERS, QUERIES = 24, 40, 32, 2, 4, 6


def make_model(seed: int = 0, num_queries: int = QUERIES, locality: float = 0.0) -> QFormerProjector:
    paddle.seed(seed)
    model = QFormerProjector(VISION_HIDDEN, OUTPUT_HIDDEN, num_queries=num_queries, hidden_size=HIDDEN,
                             num_layers=LAYERS, num_heads=HEADS, intermediate_size=64,
                             cross_attention_every=2, cross_attention_locality=locality)
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


def test_query_patch_distances_on_the_grids():
    d = query_patch_distances(9, 9)  # 3x3 queries over 3x3 patches: one cell each
    assert d.shape == (9, 9)
    np.testing.assert_array_equal(np.diag(d), np.zeros(9))
    assert d[0, 1] == d[0, 3] == 1 and d[0, 4] == 2 and d[0, 8] == 8 and d[4, 0] == 2
    np.testing.assert_array_equal(d, d.T)
    # With [CLS] first its column is 0 for every query; the patch columns are unchanged.
    with_cls = query_patch_distances(9, 10)
    np.testing.assert_array_equal(with_cls[:, 0], np.zeros(9))
    np.testing.assert_array_equal(with_cls[:, 1:], d)
    # 2x2 queries over 4x4 patches: query 0's cell holds patches 0, 1, 4, 5, each a quarter
    # cell from its centre on both axes (2 * 0.25**2 = 0.125).
    coarse = query_patch_distances(4, 16)
    np.testing.assert_allclose(coarse[0, [0, 1, 4, 5]], 0.125)
    assert set(np.argsort(coarse[3])[:4]) == {10, 11, 14, 15}


@pytest.mark.parametrize("queries, tokens, message", [(6, 9, "num_queries must be a square"),
                                                      (9, 8, "square patch grid")])
def test_query_patch_distances_refuse_what_has_no_grid(queries, tokens, message):
    with pytest.raises(ValueError, match=message):
        query_patch_distances(queries, tokens)


def test_locality_adds_one_strength_per_head_on_cross_attention_layers_only():
    plain, local = make_model(num_queries=9).state_dict(), make_model(num_queries=9, locality=2.0).state_dict()
    extra = sorted(set(local) - set(plain))
    assert extra == ["layers.0.cross_attn_locality", "layers.2.cross_attn_locality"]
    np.testing.assert_array_equal(local["layers.0.cross_attn_locality"].numpy(), [2.0] * HEADS)
    with pytest.raises(ValueError, match="num_queries must be a square"):
        make_model(num_queries=6, locality=1.0)


def test_strong_locality_makes_each_query_read_its_own_patch():
    # With a huge strength the penalty leaves each query only the patch of its own cell: the
    # cross-attention sublayer then equals attention over that one patch.
    model = make_model(num_queries=9, locality=1e4)
    layer = model.layers[0]
    rng = np.random.default_rng(5)
    q = paddle.to_tensor(rng.standard_normal((2, 9, HIDDEN)).astype("float32"))
    feats = paddle.to_tensor(image_features(2, 9))
    got = layer.read_image(q, feats).numpy()
    for i in range(9):
        own = layer.cross_attn_norm(q[:, i:i + 1] + layer.cross_attn(q[:, i:i + 1], feats[:, i:i + 1])).numpy()
        np.testing.assert_allclose(got[:, i:i + 1], own, rtol=1e-5, atol=1e-5)
    # At strength 0 the same layer reads by content alone, as BLIP-2's does.
    layer.cross_attn_locality.set_value(paddle.zeros([HEADS]))
    plain = layer.cross_attn_norm(q + layer.cross_attn(q, feats)).numpy()
    np.testing.assert_allclose(layer.read_image(q, feats).numpy(), plain, rtol=1e-6, atol=1e-6)


def test_locality_makes_the_output_depend_on_patch_order():
    # BLIP-2's Q-Former is blind to patch order (test above); on a grid, moving a patch moves it
    # to another query.
    model = make_model(num_queries=9, locality=2.0)
    x = image_features(2, 9)
    perm = np.random.default_rng(3).permutation(9)
    out = model(paddle.to_tensor(x)).numpy()
    assert np.abs(model(paddle.to_tensor(x[:, perm])).numpy() - out).max() > 1e-3


@pytest.mark.parametrize("locality", [0.0, 2.0])
def test_gradients_reach_every_parameter(locality):
    model = make_model(num_queries=9, locality=locality)
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

    from paddle_mm.weights.blip2 import HF_QFORMER
    from paddle_mm.weights.hf import read_tensors
    from paddle_mm.weights.mapping import load_mapped
    from paddle_mm.weights.tensor_files import load_tensors

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
