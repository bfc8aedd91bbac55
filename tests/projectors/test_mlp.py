import math

import numpy as np
import paddle
import pytest

from paddle_mm.config import ProjectorConfig, QFormerConfig
from paddle_mm.errors import RecipeError
from paddle_mm.projectors import build_projector
from paddle_mm.projectors.mlp import MLPProjector
from paddle_mm.projectors.qformer import QFormerProjector

VISION_HIDDEN, OUTPUT_HIDDEN = 24, 32


def make_projector(depth: int = 2, pool: int = 1, seed: int = 0) -> MLPProjector:
    paddle.seed(seed)
    proj = MLPProjector(VISION_HIDDEN, OUTPUT_HIDDEN, depth=depth, pool=pool)
    proj.eval()
    return proj


def features(b: int = 2, p: int = 16, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, p, VISION_HIDDEN)).astype("float32")


def gelu_erf(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def linear(layer, x: np.ndarray) -> np.ndarray:
    return x @ layer.weight.numpy() + layer.bias.numpy()  # Paddle Linear weight is [in, out]


def test_linear_projector_shape_and_names():
    proj = make_projector(depth=1)
    out = proj(paddle.to_tensor(features()))
    assert out.shape == [2, 16, OUTPUT_HIDDEN]
    assert set(proj.state_dict()) == {"linear_1.weight", "linear_1.bias"}
    np.testing.assert_allclose(out.numpy(), linear(proj.linear_1, features()), atol=1e-5)


def test_mlp2x_gelu_shape_and_names():
    proj = make_projector(depth=2)
    assert proj(paddle.to_tensor(features())).shape == [2, 16, OUTPUT_HIDDEN]
    assert set(proj.state_dict()) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert proj.linear_1.weight.shape == [VISION_HIDDEN, OUTPUT_HIDDEN]
    assert proj.linear_2.weight.shape == [OUTPUT_HIDDEN, OUTPUT_HIDDEN]


def test_mlp2x_gelu_matches_numpy_reference():
    proj = make_projector(depth=2)
    x = features()
    out = proj(paddle.to_tensor(x)).numpy()
    expected = linear(proj.linear_2, gelu_erf(linear(proj.linear_1, x)))
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    # the exact (erf) GELU, not the tanh approximation: they differ by more than the tolerance here
    h = linear(proj.linear_1, x)
    tanh_gelu = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    assert not np.allclose(out, linear(proj.linear_2, tanh_gelu), atol=1e-7, rtol=0)


def test_pool_2_averages_each_2x2_block_in_reading_order():
    proj = make_projector(depth=2, pool=2)
    x = features(2, 16)
    out = proj(paddle.to_tensor(x)).numpy()
    assert out.shape == (2, 4, OUTPUT_HIDDEN)
    grid = x.reshape(2, 4, 4, VISION_HIDDEN)  # row-major 4x4 patch grid
    pooled = np.stack(
        [grid[:, r:r + 2, c:c + 2].mean(axis=(1, 2)) for r in (0, 2) for c in (0, 2)], axis=1
    )  # [B, 4, Dv]: top-left, top-right, bottom-left, bottom-right
    expected = linear(proj.linear_2, gelu_erf(linear(proj.linear_1, pooled)))
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_build_projector_linear():
    proj = build_projector(ProjectorConfig(type="linear"), VISION_HIDDEN, OUTPUT_HIDDEN)
    assert isinstance(proj, MLPProjector) and proj.depth == 1
    assert proj(paddle.to_tensor(features())).shape == [2, 16, OUTPUT_HIDDEN]


def test_build_projector_mlp3x_gelu_has_three_linears():
    proj = build_projector(ProjectorConfig(type="mlp3x_gelu"), VISION_HIDDEN, OUTPUT_HIDDEN)
    assert isinstance(proj, MLPProjector) and proj.depth == 3
    linears = sorted({k.split(".")[0] for k in proj.state_dict()})
    assert linears == ["linear_1", "linear_2", "linear_3"]
    assert proj(paddle.to_tensor(features())).shape == [2, 16, OUTPUT_HIDDEN]


def test_build_projector_passes_pool():
    proj = build_projector(ProjectorConfig(type="mlp2x_gelu", pool=2), VISION_HIDDEN, OUTPUT_HIDDEN)
    assert proj(paddle.to_tensor(features(1, 16))).shape == [1, 4, OUTPUT_HIDDEN]


def test_build_projector_qformer():
    q = QFormerConfig(num_queries=5, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    paddle.seed(0)
    proj = build_projector(ProjectorConfig(type="qformer", qformer=q), VISION_HIDDEN, OUTPUT_HIDDEN)
    assert isinstance(proj, QFormerProjector)
    proj.eval()
    assert proj(paddle.to_tensor(features(2, 9))).shape == [2, 5, OUTPUT_HIDDEN]


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu", "mlp3x_gelu", "qformer"])
def test_validate_accepts_known_types(kind):
    ProjectorConfig(type=kind).validate()


@pytest.mark.parametrize("kind", ["mlp_x", "mlpx_gelu", "mlp2x_relu", "MLP2x_gelu", ""])
def test_validate_rejects_unknown_type(kind):
    with pytest.raises(RecipeError, match="projector.type"):
        ProjectorConfig(type=kind).validate()


@pytest.mark.parametrize("pool", [0, -1])
def test_validate_rejects_pool_below_one(pool):
    with pytest.raises(RecipeError, match="pool"):
        ProjectorConfig(pool=pool).validate()
