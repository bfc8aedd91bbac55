import numpy as np
import paddle
import pytest

from paddle_mm.config import VisionConfig
from paddle_mm.vision.vit import QuickGELU, VisionTransformer


def tiny_config(**overrides) -> VisionConfig:
    fields = dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    fields.update(overrides)
    return VisionConfig(**fields)


def make_vit(seed: int = 0, **overrides) -> VisionTransformer:
    paddle.seed(seed)
    model = VisionTransformer(tiny_config(**overrides))
    model.eval()
    return model


def pixels(b: int = 2, size: int = 16, seed: int = 1, width: int | None = None) -> paddle.Tensor:
    rng = np.random.default_rng(seed)
    return paddle.to_tensor(rng.standard_normal((b, 3, size, width or size)).astype("float32"))


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


# the worked numbers of docs/ARCHITECTURE.md ---------------------------------------------

def test_design_worked_numbers_224_patch_14():
    cfg = VisionConfig(image_size=224, patch_size=14, hidden_size=768, intermediate_size=64, num_layers=1, num_heads=12)
    assert cfg.num_patches == 256
    paddle.seed(0)
    model = VisionTransformer(cfg)
    model.eval()
    weight = model.patch_embedding.weight
    assert weight.shape == [768, 3, 14, 14]
    assert weight.reshape([768, -1]).shape == [768, 588]  # 14 * 14 * 3 values per flattened patch
    assert model.position_embedding.shape == [257, 768]
    x = pixels(1, 224)
    with paddle.no_grad():
        assert model.embed(x).shape == [1, 257, 768]
        assert model(x).shape == [1, 256, 768]  # class token dropped


# patch embedding --------------------------------------------------------------------------

def test_patch_embedding_is_linear_map_of_flattened_patches():
    model = make_vit()
    x = pixels(2, 16)
    with paddle.no_grad():
        out = model.patch_embedding(x).numpy()  # [B, D, 4, 4]
    w = model.patch_embedding.weight.numpy().reshape(32, -1)  # [D, C*p*p]
    xs = x.numpy()
    p = 4
    for b in range(2):
        for i in range(4):
            for j in range(4):
                patch = xs[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1)  # C, H, W order
                np.testing.assert_allclose(out[b, :, i, j], w @ patch, atol=1e-5, rtol=1e-5)


def test_embed_adds_class_token_and_positions_in_row_major_order():
    model = make_vit()
    x = pixels(2, 16)
    with paddle.no_grad():
        emb = model.embed(x).numpy()
        patches = model.patch_embedding(x).numpy()  # [B, D, 4, 4]
    pos = model.position_embedding.numpy()
    cls = model.class_embedding.numpy()
    np.testing.assert_allclose(emb[:, 0], np.broadcast_to(cls + pos[0], (2, 32)), atol=1e-6)
    # patch (row 1, col 2) is patch index 1 * 4 + 2 = 6, position row 7
    np.testing.assert_allclose(emb[:, 7], patches[:, :, 1, 2] + pos[7], atol=1e-5)


# position embedding interpolation ----------------------------------------------------------

def test_position_embedding_interpolates_for_larger_images():
    model = make_vit(image_size=32, patch_size=4)  # trained for an 8x8 grid
    with paddle.no_grad():
        assert model.embed(pixels(2, 48)).shape == [2, 145, 32]  # 12x12 grid + class token
        assert model(pixels(2, 48)).shape == [2, 144, 32]
        assert model.embed(pixels(1, 32, width=48)).shape == [1, 1 + 8 * 12, 32]  # non-square grid
        table = model.position_embeddings_for(12, 12).numpy()
    original = model.position_embedding.numpy()
    assert table.shape == (145, 32)
    np.testing.assert_array_equal(table[0], original[0])  # the class position is not interpolated
    assert not np.allclose(table[1:], np.resize(original[1:], (144, 32)))


def test_position_embedding_at_trained_size_is_the_table():
    model = make_vit(image_size=32, patch_size=4)
    with paddle.no_grad():
        table = model.position_embeddings_for(8, 8).numpy()
    np.testing.assert_array_equal(table, model.position_embedding.numpy())


def test_interpolated_constant_table_stays_constant():
    model = make_vit(image_size=32, patch_size=4)
    const = np.tile(np.arange(32, dtype="float32"), (65, 1))
    model.position_embedding.set_value(const)
    with paddle.no_grad():
        table = model.position_embeddings_for(12, 10).numpy()
    assert table.shape == (1 + 120, 32)
    np.testing.assert_allclose(table, np.tile(const[0], (121, 1)), atol=1e-4)


# feature selection -------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [-1, -2, 0, 1])
def test_feature_layer_selects_hidden_state(layer):
    model = make_vit(feature_layer=layer, drop_cls_token=False)
    with paddle.no_grad():
        features, hidden = model(pixels(), output_hidden_states=True)
    assert len(hidden) == 3  # embeddings + 2 blocks
    assert features.shape == [2, 17, 32]
    np.testing.assert_array_equal(features.numpy(), hidden[layer].numpy())


def test_feature_layers_differ():
    model = make_vit(drop_cls_token=False)
    with paddle.no_grad():
        _, hidden = model(pixels(), output_hidden_states=True)
    assert not np.allclose(hidden[-1].numpy(), hidden[-2].numpy())
    assert not np.allclose(hidden[0].numpy(), hidden[1].numpy())


def test_drop_cls_token_removes_first_position():
    x = pixels()
    with paddle.no_grad():
        kept = make_vit(drop_cls_token=False)(x).numpy()
        dropped = make_vit(drop_cls_token=True)(x).numpy()
    assert kept.shape == (2, 17, 32)
    assert dropped.shape == (2, 16, 32)
    np.testing.assert_array_equal(dropped, kept[:, 1:])


def test_post_norm_applied_only_when_set():
    x = pixels()
    plain = make_vit(post_norm=False, drop_cls_token=False)
    normed = make_vit(post_norm=True, drop_cls_token=False)
    ln = normed.post_norm
    ln.weight.set_value(np.linspace(0.5, 1.5, 32).astype("float32"))
    ln.bias.set_value(np.linspace(-0.1, 0.1, 32).astype("float32"))
    with paddle.no_grad():
        raw, hidden = plain(x, output_hidden_states=True)
        out = normed(x).numpy()
    np.testing.assert_array_equal(raw.numpy(), hidden[-2].numpy())
    expected = layer_norm(hidden[-2].numpy(), ln.weight.numpy(), ln.bias.numpy(), 1e-5)
    np.testing.assert_allclose(out, expected, atol=1e-4)
    assert not np.allclose(out, raw.numpy(), atol=1e-2)


def test_pre_norm_disabled_is_identity():
    model = make_vit(pre_norm=False, drop_cls_token=False, feature_layer=0)
    x = pixels()
    with paddle.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), model.embed(x).numpy())
    assert not any(n.startswith("pre_norm.") for n in model.state_dict())


# names and activation ----------------------------------------------------------------------

def test_clip_style_parameter_names():
    names = set(make_vit().state_dict())
    expected = {"class_embedding", "patch_embedding.weight", "position_embedding",
                "pre_norm.weight", "pre_norm.bias", "post_norm.weight", "post_norm.bias"}
    for i in range(2):
        expected |= {f"blocks.{i}.norm1.weight", f"blocks.{i}.norm1.bias",
                     f"blocks.{i}.norm2.weight", f"blocks.{i}.norm2.bias",
                     f"blocks.{i}.mlp.fc1.weight", f"blocks.{i}.mlp.fc1.bias",
                     f"blocks.{i}.mlp.fc2.weight", f"blocks.{i}.mlp.fc2.bias"}
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            expected |= {f"blocks.{i}.attn.{proj}.weight", f"blocks.{i}.attn.{proj}.bias"}
    assert names == expected
    assert "patch_embedding.bias" not in names  # no bias, as in CLIP


def test_patch_bias_is_added_to_every_patch_and_not_to_the_class_token():
    """BLIP-2's EVA ViT has a patch-embedding bias; the class token and positions do not get it."""
    plain = make_vit(seed=0)
    biased = make_vit(seed=0, patch_bias=True)
    assert set(biased.state_dict()) - set(plain.state_dict()) == {"patch_embedding.bias"}
    biased.set_state_dict({**plain.state_dict(), "patch_embedding.bias": paddle.full([32], 0.5)})
    x = pixels(2, 16)
    with paddle.no_grad():
        diff = (biased.embed(x) - plain.embed(x)).numpy()  # [B, 1 + P, D]
    np.testing.assert_allclose(diff[:, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(diff[:, 1:], 0.5, atol=1e-5)


def test_quick_gelu_matches_numpy():
    x = np.linspace(-6, 6, 101).astype("float32")
    out = QuickGELU()(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(out, x / (1 + np.exp(-1.702 * x)), atol=1e-6, rtol=1e-5)
    assert abs(float(out[50])) < 1e-7  # x = 0


# SigLIP's switches: no class token, a patch bias, the tanh gelu, no pre-norm ---------------

def siglip_vit(seed: int = 0, **overrides) -> VisionTransformer:
    return make_vit(seed, class_token=False, patch_bias=True, pre_norm=False, hidden_act="gelu_tanh", **overrides)


def test_without_class_token_there_is_one_position_per_patch():
    model = siglip_vit(drop_cls_token=False)
    names = set(model.state_dict())
    assert "class_embedding" not in names and "pre_norm.weight" not in names and "patch_embedding.bias" in names
    assert model.position_embedding.shape == [16, 32]  # a 4 x 4 grid, no class row
    x = pixels(2, 16)
    with paddle.no_grad():
        emb = model.embed(x).numpy()
        patches = model.patch_embedding(x).numpy()  # [B, D, 4, 4], bias included
        features = model(x).numpy()
    pos = model.position_embedding.numpy()
    assert emb.shape == (2, 16, 32) and features.shape == (2, 16, 32)
    # patch (row 1, col 2) is patch index 6 and position row 6: nothing comes before the patches
    np.testing.assert_allclose(emb[:, 6], patches[:, :, 1, 2] + pos[6], atol=1e-5)


def test_without_class_token_drop_cls_token_drops_the_first_patch():
    """transformers' LLaVA "default" strategy removes the first position whatever the tower is."""
    x = pixels()
    with paddle.no_grad():
        kept = siglip_vit(drop_cls_token=False)(x).numpy()
        dropped = siglip_vit(drop_cls_token=True)(x).numpy()
    assert dropped.shape == (2, 15, 32)
    np.testing.assert_array_equal(dropped, kept[:, 1:])


def test_without_class_token_the_whole_table_is_interpolated():
    model = siglip_vit(image_size=32, patch_size=4)  # trained for an 8x8 grid
    const = np.tile(np.arange(32, dtype="float32"), (64, 1))
    model.position_embedding.set_value(const)
    with paddle.no_grad():
        assert model.embed(pixels(1, 48)).shape == [1, 144, 32]
        table = model.position_embeddings_for(12, 10).numpy()
        np.testing.assert_array_equal(model.position_embeddings_for(8, 8).numpy(), const)
    assert table.shape == (120, 32)
    np.testing.assert_allclose(table, np.tile(const[0], (120, 1)), atol=1e-4)


def test_gelu_tanh_is_the_tanh_approximation():
    model = siglip_vit()
    x = np.linspace(-6, 6, 101).astype("float32")
    out = model.blocks[0].mlp.act(paddle.to_tensor(x)).numpy()
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(out, expected, atol=1e-6, rtol=1e-5)
    exact = make_vit(hidden_act="gelu").blocks[0].mlp.act(paddle.to_tensor(x)).numpy()
    assert 1e-4 < np.abs(out - exact).max() < 1e-2  # close to the exact gelu, not equal


def test_tokens_per_image_counts_the_first_patch_dropped():
    from paddle_mm.config import ModelConfig, ProjectorConfig
    from paddle_mm.errors import RecipeError

    siglip = dict(class_token=False, image_size=16, patch_size=4)
    assert ModelConfig(vision=VisionConfig(**siglip, drop_cls_token=False)).tokens_per_image == 16
    assert ModelConfig(vision=VisionConfig(**siglip, drop_cls_token=True)).tokens_per_image == 15
    assert ModelConfig(vision=VisionConfig(image_size=16, patch_size=4, drop_cls_token=False)).tokens_per_image == 17
    pooled = ModelConfig(vision=VisionConfig(**siglip, drop_cls_token=False), projector=ProjectorConfig(pool=2))
    pooled.validate()
    assert pooled.tokens_per_image == 4
    with pytest.raises(RecipeError, match="drop_cls_token false for a tower without a class token"):
        ModelConfig(vision=VisionConfig(**siglip, drop_cls_token=True), projector=ProjectorConfig(pool=2)).validate()
