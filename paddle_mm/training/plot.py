"""Loss and learning-rate curves of one or more runs (their metrics.jsonl) in one PNG.

The training loss is the logged interval mean (training/runlog.py); a run that validated
(data.eval) has its held-out loss drawn beside it, dashed with markers, in the run's colour.
"""
from __future__ import annotations

import os

from paddle_mm.fileio import write_bytes_atomic
from paddle_mm.training.runlog import read_metrics


def _new_figure(**kw):
    """A figure drawn by the Agg (file) renderer, with no pyplot: the process's own backend (a
    notebook's inline one, say) is left as it was."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None
    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def run_label(run_dir: str) -> str:
    """A short name for a run in a legend: its folder name, with the parent when that helps."""
    path = os.path.normpath(os.path.abspath(run_dir))
    parent, name = os.path.split(path)
    return f"{os.path.basename(parent)}/{name}" if parent not in ("", os.sep) else name


def plot_runs(run_dirs: list[str], out_png: str, title: str = "") -> str:
    """Write out_png with loss (top) and learning rate (bottom) against step; returns its path.

    Runs are overlaid, each in its own colour, the held-out loss dashed beside the training
    loss; the loss axis turns logarithmic when the curves span more than two decades, as the
    first steps of a run from scratch do.
    """
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run folder")
    fig = _new_figure(figsize=(7, 5.5))
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    lowest, highest = float("inf"), 0.0
    for run_dir in run_dirs:
        records = read_metrics(run_dir)
        steps = [r["step"] for r in records]
        losses = [r["loss"] for r in records]
        label = run_label(run_dir)
        (line,) = ax_loss.plot(steps, losses, label=f"{label} (training)", linewidth=1.2)
        ax_lr.plot(steps, [r["lr"] for r in records], label=label, linewidth=1.2)
        held_out = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        if held_out:
            ax_loss.plot(*zip(*held_out), label=f"{label} (held-out)", color=line.get_color(),
                         linestyle="--", marker="o", markersize=3, linewidth=1.2)
            losses = losses + [v for _, v in held_out]
        positive = [v for v in losses if v > 0]
        if positive:
            lowest, highest = min(lowest, min(positive)), max(highest, max(positive))
    if highest > 0 and highest / lowest > 100:
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if title:
        ax_loss.set_title(title)
    fig.tight_layout()
    save_figure(fig, out_png)
    return out_png


def save_figure(fig, out_png: str) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes_atomic(out_png, buf.getvalue())
