"""How much of the demo scene's layout a trained run's image tokens still hold.

    python tools/probe_layout.py RUN_DIR DEMO_DATA_DIR

RUN_DIR is an align, pretrain or instruct run of the demo (MLP or Q-Former); DEMO_DATA_DIR is
the demo's data/ folder. For each of the 9 grid cells a ridge-regression linear probe, fitted on
the training scenes, reads the cell's content (empty, or one of 5 colours x 3 shapes) from all
image tokens at once, flattened in order; the table gives its accuracy on the test scenes, over
every cell and over the cells that hold an object (chance there: about 1/15). Run on the ViT's
features (the input of the projector) and on the projector's output tokens, it shows whether the
projector kept what the ViT had.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
CELLS, CLASSES = 9, 16


def cell_labels(scene: dict) -> np.ndarray:
    """[9] per-cell class: 0 empty, else 1 + colour * 3 + shape (demo vocabulary order)."""
    from paddle_mm.data.synthetic import COLOURS, SHAPES

    labels = np.zeros(CELLS, dtype=np.int64)
    for obj in scene["objects"]:
        labels[obj["row"] * 3 + obj["col"]] = 1 + list(COLOURS).index(obj["colour"]) * 3 + SHAPES.index(obj["shape"])
    return labels


def load_model(run_dir: str):
    """(recipe, vision_tower, projector) of an align run or of a pretrain/instruct run."""
    if os.path.isfile(os.path.join(run_dir, "vocab.txt")):  # align/clip runs keep their WordPiece vocab
        from paddle_mm.run_folder import load_align_run

        recipe, model = load_align_run(run_dir)
    else:
        from paddle_mm.run_folder import load_run

        recipe, _, _, model = load_run(run_dir)
    return recipe, model.vision_tower, model.multi_modal_projector


def tokens(model, data_dir: str, split: str, batch: int = 100):
    """ViT features and projector outputs, each [N, T, D] flattened to [N, T*D], and labels [N, 9].

    `model` is what load_model returns.
    """
    import paddle

    from paddle_mm.builder import image_processor_for

    recipe, vision, projector = model
    processor = image_processor_for(recipe)
    with open(os.path.join(data_dir, f"{split}_scenes.json"), encoding="utf-8") as f:
        scenes = json.load(f)
    feats, outs = [], []
    for i in range(0, len(scenes), batch):
        pixels = paddle.to_tensor(processor([os.path.join(data_dir, s["image"]) for s in scenes[i:i + batch]]))
        with paddle.no_grad():
            v = vision(pixels)
            feats.append(v.numpy().reshape(v.shape[0], -1))
            outs.append(projector(v).numpy().reshape(v.shape[0], -1))
    return np.concatenate(feats), np.concatenate(outs), np.stack([cell_labels(s) for s in scenes])


def probe_accuracy(x_train, y_train, x_test, y_test, ridge: float = 10.0) -> tuple[float, float]:
    """(accuracy over all cells, accuracy over cells with an object) of per-cell linear probes."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6

    def design(x):
        return np.hstack([(x - mean) / std, np.ones((len(x), 1))])

    a, b = design(x_train), design(x_test)
    gram = a.T @ a + ridge * np.eye(a.shape[1])
    # One solve for all cells: the targets are the 9 one-hot blocks side by side.
    weights = np.linalg.solve(gram, a.T @ np.eye(CLASSES)[y_train].reshape(len(a), -1))
    pred = (b @ weights).reshape(len(b), CELLS, CLASSES).argmax(-1)
    right = pred == y_test
    return float(right.mean()), float(right[y_test != 0].mean())


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    run_dir, data_dir = argv
    model = load_model(run_dir)
    vit_tr, proj_tr, y_tr = tokens(model, data_dir, "train")
    vit_te, proj_te, y_te = tokens(model, data_dir, "test")
    print(f"{run_dir}: {len(y_tr)} train / {len(y_te)} test scenes")
    print(f"{'tokens':<22}{'all cells':>10}{'object cells':>14}")
    for name, tr, te in (("ViT features", vit_tr, vit_te), ("projector outputs", proj_tr, proj_te)):
        every, objects = probe_accuracy(tr, y_tr, te, y_te)
        print(f"{name:<22}{every:>10.3f}{objects:>14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
