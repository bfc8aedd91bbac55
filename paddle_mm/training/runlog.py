"""What a training run records about itself: metrics.jsonl, and VisualDL scalars when visualdl imports.

One JSON line per log step:
    {"step", "loss", "step_loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "label_tokens_per_s"}
loss is the mean over the steps since the last log line, weighted as each step's loss is
(next-token stages: by the labelled tokens of each global batch, so it is the loss over every
token of the interval; align / clip: each step weighs the same); step_loss is the last step's.
A step that evaluates (training/validation.py) is always a log step and its line adds the
validation figures (eval_loss, eval_samples, eval_s; eval_accuracy, eval_answers). An objective
with figures of its own adds their interval means (dpo: reward_margin, reward_accuracy,
chosen_logp, rejected_logp, chosen_reward, rejected_reward; training/preference.py).
tokens_per_s counts every token of the samples stepped over (text and image positions, no
padding); label_tokens_per_s only those the loss is taken on (assistant / caption tokens).
Both count the whole global batch, so they do not change with the number of processes.
grad_norm is the global L2 norm of the trainable gradients before clipping, the value
train.max_grad_norm is compared with.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from paddle_mm.errors import CheckpointError
from paddle_mm.run_folder import METRICS_FILE, VISUALDL_DIR


def visualdl_writer(run_dir: str):
    """A VisualDL LogWriter under run_dir/visualdl, or None when visualdl is not installed."""
    try:
        from visualdl import LogWriter
    except ImportError:
        return None
    return LogWriter(logdir=os.path.join(run_dir, VISUALDL_DIR))


def global_grad_norm(params) -> float:
    """L2 norm over the gradients of `params` (those without a gradient count as zero)."""
    import paddle

    squares = [paddle.sum(paddle.square(p.grad.astype("float32"))) for p in params if p.grad is not None]
    return float(paddle.sqrt(paddle.add_n(squares))) if squares else 0.0


class RunLog:
    """Counts the samples and tokens each step consumes and writes one record per log step.

    Every process counts (cheap); only the one built with write=True opens files.
    """

    def __init__(self, run_dir: str, tokens: np.ndarray, labelled: np.ndarray, write: bool = True):
        """tokens / labelled: per dataset item, its token count and the tokens the loss is taken on."""
        self._tokens = np.asarray(tokens, dtype=np.int64)
        self._labelled = np.asarray(labelled, dtype=np.int64)
        self._file = open(os.path.join(run_dir, METRICS_FILE), "a", encoding="utf-8") if write else None
        self._vdl = visualdl_writer(run_dir) if write else None
        self._start_window()

    def _start_window(self) -> None:
        self._t0 = time.time()
        self._samples = self._tokens_seen = self._labelled_seen = 0

    def add_batch(self, idx) -> None:
        """Count the dataset indices of one global (micro-)batch."""
        idx = np.asarray(idx, dtype=np.int64)
        self._samples += len(idx)
        self._tokens_seen += int(self._tokens[idx].sum())
        self._labelled_seen += int(self._labelled[idx].sum())

    def write(self, step: int, loss: float, step_loss: float, lr: float, grad_norm: float,
              evaluation: dict | None = None) -> dict:
        """Record the window since the last write (and the step's validation figures); returns the record.

        The rates count training time only: the evaluation's eval_s is taken out of the window.
        """
        elapsed = max(time.time() - self._t0 - (evaluation or {}).get("eval_s", 0.0), 1e-9)
        record = {"step": step, "loss": loss, "step_loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                  "samples_per_s": self._samples / elapsed, "tokens_per_s": self._tokens_seen / elapsed,
                  "label_tokens_per_s": self._labelled_seen / elapsed, **(evaluation or {})}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._vdl is not None:
            for key, value in record.items():
                if key != "step":  # eval_loss -> eval/loss, beside train/loss
                    tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                    self._vdl.add_scalar(tag=tag, step=step, value=value)
        self._start_window()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._vdl is not None:
            self._vdl.close()


# The interval since the last log line lives in the loop's state (and so in every checkpoint):
# a run resumed mid-interval logs the mean an uninterrupted one does.


def add_to_interval(state: dict, loss: float, weight: float, figures: dict | None = None) -> None:
    """Count one step's loss (the whole global batch's) with its weight into the interval, and this
    process's sums of the objective's figures (its figure_sums, e.g. DPO's reward margin)."""
    state["interval_loss"] = state.get("interval_loss", 0.0) + loss * weight
    state["interval_weight"] = state.get("interval_weight", 0.0) + weight
    sums = state.setdefault("interval_figures", {})
    for key, value in (figures or {}).items():
        sums[key] = sums.get(key, 0.0) + value


def take_interval_sums(state: dict, names: tuple[str, ...], world: int) -> dict:
    """The interval's figure sums over every process (every rank calls this on a log step: it
    all-reduces when names is not empty); starts the next interval."""
    from paddle_mm.training.distributed import global_sum

    mine = state.pop("interval_figures", {})
    state["interval_figures"] = {}
    if not names:
        return {}
    return dict(zip(names, global_sum([mine.get(k, 0.0) for k in names], world)))


def take_interval_mean(state: dict) -> float:
    """The weighted mean loss of the interval; starts the next one."""
    mean = state.get("interval_loss", 0.0) / max(state.get("interval_weight", 0.0), 1e-12)
    state["interval_loss"] = state["interval_weight"] = 0.0
    return mean


def read_metrics(run_dir: str) -> list[dict]:
    """The records of run_dir/metrics.jsonl (a line cut short by a crash is left out, with a note)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{run_dir}: no {METRICS_FILE} (not a training run folder?)")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"{path}: line {line_no} is not JSON (cut short?); left out", file=sys.stderr)
    return records


class Progress:
    """One status line per log step on stderr: step, loss, learning rate, throughput, time left,
    and the held-out figures on a step that evaluated."""

    def __init__(self, total: int, start: int):
        self.total, self.start, self.t0 = total, start, time.time()

    def update(self, record: dict) -> None:
        step = record["step"]
        done = step - self.start
        eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
        width = 24
        filled = int(width * step / self.total)
        bar = "#" * filled + "." * (width - filled)
        line = (f"[{bar}] {step}/{self.total} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                f"{record['samples_per_s']:.1f} samples/s eta {eta:.0f}s")
        if "eval_loss" in record:
            line += f" | held-out loss {record['eval_loss']:.4f}"
        if "eval_accuracy" in record:
            line += f", exact match {record['eval_accuracy']:.3f} of {record['eval_answers']}"
        print(line, file=sys.stderr, flush=True)
