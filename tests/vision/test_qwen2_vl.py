"""Qwen2-VL's and Qwen2.5-VL's vision encoders (with the patch merger) against transformers' features."""
import numpy as np
import paddle
import pytest
from reference_fixtures import QWEN2_VL_FOLDERS, max_diff, qwen2_vl_cases, qwen2_vl_folder, reference

from paddle_mm.data.qwen2_vl import Qwen2VLProcessor, settings_from_folder
from paddle_mm.vision.qwen2_vl import frame_segments, interpolated_positions, patch_positions, window_order


def _model(model, tag):
    from paddle_mm.model import Qwen2VLModel
    from paddle_mm.weights.qwen2_vl import load_qwen2_vl, qwen2_vl_model_config

    m = Qwen2VLModel(qwen2_vl_model_config(qwen2_vl_folder(model, tag)))
    assert load_qwen2_vl(m, qwen2_vl_folder(model, tag)) == []
    m.eval()
    return m


@pytest.mark.parametrize("model,tag", QWEN2_VL_FOLDERS)
def test_vision_features_match_transformers(model, tag):
    """Images of two sizes in one call (attention kept to each), and a clip of two temporal patches."""
    m, ref = _model(model, tag), reference(f"qwen2_vl/{model}/{tag}")
    proc = Qwen2VLProcessor(settings_from_folder(qwen2_vl_folder(model, tag)))
    for case, c in qwen2_vl_cases(model, tag).items():
        with paddle.no_grad():
            if c["images"]:
                pixels, grid = proc.images(c["images"])
                got, deepstack = m._vision(paddle.to_tensor(pixels), grid)
                assert max_diff(got.numpy(), ref[f"{case}.image_features"]) <= 1e-4, case
                if model == "qwen3_vl":  # the DeepStack mergers' features too, one set per DeepStack block
                    assert max_diff(np.stack([d.numpy() for d in deepstack]), ref[f"{case}.image_deepstack"]) <= 1e-4
            if c["frames"]:
                pixels, grid = proc.video(c["frames"])
                got = m.vision_features(paddle.to_tensor(pixels), grid).numpy()
                assert max_diff(got, ref[f"{case}.video_features"]) <= 1e-4, case


def test_windows_cut_each_frame_from_the_top_left():
    """A frame of 3 x 5 merge units in windows of 2 x 2: 6 windows, the last row and column narrower."""
    order, sizes = window_order(np.array([[1, 6, 10]]), merge=2, window_merged=2)
    assert sizes == [16, 16, 8, 8, 8, 4]  # rows (4 per merge unit) of each window
    np.testing.assert_array_equal(order[:4], [0, 1, 5, 6])
    assert sorted(order.tolist()) == list(range(15))
    # two frames: each its own windows, the second's units after the first's
    order, sizes = window_order(np.array([[2, 2, 2]]), merge=2, window_merged=2)
    assert order.tolist() == [0, 1] and sizes == [4, 4]


def test_rotary_positions_follow_the_merge_groups():
    pos = patch_positions(np.array([[1, 2, 4]]), merge=2)
    assert pos.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert frame_segments(np.array([[2, 2, 4], [1, 4, 2]])) == [8, 8, 8]


def test_learned_positions_interpolate_the_table_corner_to_corner():
    """A 2 x 2 table onto a grid of 2 x 4 patches: rows take the table's rows, columns mix its two
    columns by 0, 1/3, 2/3, 1; the rows come in the merge order of the patches."""
    idx, weights = interpolated_positions(np.array([[1, 2, 4]]), side=2, merge=2)
    assert idx.shape == weights.shape == (4, 8)
    np.testing.assert_allclose(weights.sum(0), 1.0, rtol=1e-6)
    # the first merge group: patches (0, 0), (0, 1), (1, 0), (1, 1); patch (0, 1) is 1/3 of the way to column 1
    np.testing.assert_allclose(weights[:, 1], [2 / 3, 1 / 3, 0, 0], rtol=1e-6)
    assert idx[:, 1].tolist() == [0, 1, 2, 3]
    # patch (1, 0) sits on the table's entry (1, 0): all its weight on the first corner, index 1 * 2 + 0
    np.testing.assert_allclose(weights[:, 2], [1, 0, 0, 0], atol=1e-7)
    assert idx[0, 2] == 2
