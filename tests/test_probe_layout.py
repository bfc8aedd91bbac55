"""tools/probe_layout.py: the per-cell linear probe behind the Q-Former layout figures."""
import importlib.util
import os

import numpy as np
from tiny import REPO

spec = importlib.util.spec_from_file_location("probe_layout", os.path.join(REPO, "tools", "probe_layout.py"))
probe_layout = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe_layout)


def scenes(n, rng):
    """Random label grids [n, 9]: about a third of the cells hold one of the 15 objects."""
    return np.where(rng.random((n, 9)) < 0.33, rng.integers(1, 16, (n, 9)), 0)


def test_cell_labels_follow_row_major_cells_and_the_demo_vocabulary():
    scene = {"objects": [{"colour": "red", "shape": "circle", "row": 0, "col": 0},
                         {"colour": "purple", "shape": "triangle", "row": 2, "col": 1}]}
    # red is colour 0, circle shape 0; purple colour 4, triangle shape 2: 1 + 4 * 3 + 2 = 15
    np.testing.assert_array_equal(probe_layout.cell_labels(scene), [1, 0, 0, 0, 0, 0, 0, 15, 0])


def test_probe_reads_cells_the_tokens_hold_and_not_those_they_lost():
    rng = np.random.default_rng(0)
    y_train, y_test = scenes(800, rng), scenes(300, rng)

    def tokens(y, keep_layout):  # [N, 9 * 16]: each cell's one-hot in its own token, plus noise
        onehot = np.eye(16)[y]
        if not keep_layout:  # what a projector that pools every cell into every token leaves
            onehot = np.repeat(onehot.mean(1, keepdims=True), 9, axis=1)
        return (onehot + 0.1 * rng.standard_normal(onehot.shape)).reshape(len(y), -1)

    every, objects = probe_layout.probe_accuracy(tokens(y_train, True), y_train, tokens(y_test, True), y_test)
    assert every > 0.99 and objects > 0.99
    every, objects = probe_layout.probe_accuracy(tokens(y_train, False), y_train, tokens(y_test, False), y_test)
    assert objects < 0.2, objects  # which cell holds which object is gone (chance 1/15)
