"""What a run records: step metrics in metrics.jsonl, VisualDL scalars, and the curves PNG."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import numpy as np
import paddle
import pytest

from paddle_mm.cli import main
from paddle_mm.training.loop import train
from paddle_mm.training.plot import plot_runs
from paddle_mm.training.runlog import global_grad_norm, visualdl_writer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, demo_data):
    from tiny import make_tiny_recipe

    out = str(tmp_path_factory.mktemp("runlog") / "run")
    return train(make_tiny_recipe(demo_data, out, "train.max_steps=4", "train.log_every=2",
                                  "train.max_grad_norm=0.5"), quiet=True)


def test_metrics_record_tokens_and_gradient_norm_per_log_step(run_dir):
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert set(r) == {"step", "loss", "step_loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s",
                          "label_tokens_per_s"}
        assert math.isfinite(r["loss"]) and r["lr"] > 0
        # A model from scratch has large gradients: the norm is the one before clipping, above 0.5.
        assert r["grad_norm"] > 0.5
        assert 0 < r["label_tokens_per_s"] < r["tokens_per_s"]
        # Every sample holds an image (at least tokens_per_image positions) and some text.
        assert r["tokens_per_s"] > 9 * r["samples_per_s"] > 0


def test_visualdl_scalars_are_written_when_visualdl_is_installed(run_dir):
    vdl = os.path.join(run_dir, "visualdl")
    if importlib.util.find_spec("visualdl") is None:
        assert not os.path.exists(vdl)
    else:
        logs = os.listdir(vdl)
        assert len(logs) == 1 and logs[0].startswith("vdlrecords") and os.path.getsize(os.path.join(vdl, logs[0])) > 0


def test_without_visualdl_the_writer_is_simply_absent(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "visualdl", None)  # makes `import visualdl` raise ImportError
    assert visualdl_writer(str(tmp_path)) is None


def test_global_grad_norm_matches_numpy():
    layer = paddle.nn.Linear(3, 2)
    x = paddle.to_tensor(np.arange(6, dtype="float32").reshape(2, 3))
    (layer(x) ** 2).sum().backward()
    grads = [p.grad.numpy() for p in layer.parameters()]
    expected = math.sqrt(sum(float((g.astype("float64") ** 2).sum()) for g in grads))
    assert global_grad_norm(layer.parameters()) == pytest.approx(expected, rel=1e-5)
    frozen = paddle.nn.Linear(2, 2)
    assert global_grad_norm(frozen.parameters()) == 0.0


def _fake_run(folder, losses, lrs, held_out=()):
    os.makedirs(folder)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for i, (loss, lr) in enumerate(zip(losses, lrs), 1):
            evaluation = {"eval_loss": held_out[i - 1]} if i <= len(held_out) and held_out[i - 1] else {}
            f.write(json.dumps({"step": i * 10, "loss": loss, "lr": lr, **evaluation}) + "\n")
        f.write('{"step": 99, "lo')  # a line cut short by a crash is left out
    return str(folder)


def test_plot_overlays_runs_in_one_png(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", [5.0, 3.0, 1.0], [1e-3, 8e-4, 2e-4])
    b = _fake_run(tmp_path / "b", [900.0, 2.0, 0.5, 0.1], [1e-3, 1e-3, 1e-3, 1e-3])
    out = plot_runs([a, b], str(tmp_path / "curves.png"))
    data = open(out, "rb").read()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert "line 4 is not JSON" in capsys.readouterr().err


def test_plot_draws_the_held_out_loss_beside_the_training_loss(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from paddle_mm.training.plot import run_label

    lines = {}
    original = Axes.plot

    def plot(ax, *args, **kw):
        (line,) = original(ax, *args, **kw)
        lines[kw["label"]] = line
        return [line]

    monkeypatch.setattr(Axes, "plot", plot)
    run = _fake_run(tmp_path / "a", [5.0, 3.0, 1.0], [1e-3, 8e-4, 2e-4], held_out=(None, 4.0, 2.5))
    plot_runs([run], str(tmp_path / "curves.png"))
    training, held_out = lines[f"{run_label(run)} (training)"], lines[f"{run_label(run)} (held-out)"]
    assert (list(training.get_xdata()), list(training.get_ydata())) == ([10, 20, 30], [5.0, 3.0, 1.0])
    # Only the steps that evaluated, dashed, in the run's colour.
    assert (list(held_out.get_xdata()), list(held_out.get_ydata())) == ([20, 30], [4.0, 2.5])
    assert held_out.get_linestyle() == "--" and held_out.get_color() == training.get_color()


def test_plot_command_defaults_to_the_run_folder_and_names_a_missing_log(run_dir, tmp_path, capsys):
    assert main(["plot", run_dir]) == 0
    out = capsys.readouterr().out.strip()
    assert out == os.path.join(run_dir, "curves.png") and open(out, "rb").read(8) == PNG_SIGNATURE
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert main(["plot", str(empty)]) == 2
    assert f"{empty}: no metrics.jsonl" in capsys.readouterr().err
