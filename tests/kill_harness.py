"""Kill a training subprocess (SIGKILL) at chosen or random moments, resume it, compare.

Used by tests/training/test_checkpoints.py (a few kill points) and tools/kill_resume.py (many, by hand).
Two ways to kill, both a real SIGKILL of the `paddle-mm train` process:
- at a named point inside a checkpoint save (PADDLE_MM_CRASH_AT, see paddle_mm/training/checkpoints.py);
- from outside, once the run has logged a randomly chosen step, after a random delay of up
  to 1.5 steps' length (as measured while it runs), so the kill lands anywhere in the following
  step or save.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from tiny import REPO, recipe_path, tiny_overrides

# Every source of randomness on: LoRA dropout, several epochs, gradient accumulation, a cosine
# schedule; saves every 4 steps, keeping 2.
RESUME_RECIPE = [
    "train.max_steps=40", "train.save_every=4", "train.keep_checkpoints=2", "train.grad_accum=2",
    "train.lr=1e-3", "train.schedule=cosine", "train.num_threads=1", "train.seed=5",
    "train.lora.enabled=true", "train.lora.r=2", "train.lora.alpha=4", "train.lora.dropout=0.3",
]


def train_command(demo_data, run_dir) -> list[str]:
    overrides = tiny_overrides(demo_data, run_dir, *RESUME_RECIPE)
    return [sys.executable, "-m", "paddle_mm.cli", "train", recipe_path(), *overrides]


def _env(crash_at: str = "") -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    env.pop("PADDLE_MM_CRASH_AT", None)
    if crash_at:
        env["PADDLE_MM_CRASH_AT"] = crash_at
    return env


def _last_step(metrics: str) -> int:
    try:
        with open(metrics, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return -1
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
    return -1


def run(command: list[str], crash_at: str = "", kill_at_step: int = 0, delay_steps: float = 0.0,
        timeout_s: float = 120) -> int:
    """Run training once; returns its exit code (-9 when killed). See run_with_stderr."""
    return run_with_stderr(command, crash_at, kill_at_step, delay_steps, timeout_s)[0]


def run_with_stderr(command: list[str], crash_at: str = "", kill_at_step: int = 0, delay_steps: float = 0.0,
                    timeout_s: float = 120) -> tuple[int, str]:
    """Run training once; returns its exit code (-9 when killed) and what it wrote to stderr.

    kill_at_step: SIGKILL it `delay_steps` steps' time after the log shows that step, counted only
    once the log has been seen below it (the log of an earlier, killed attempt may run past it
    until the resumed run trims it). A step's time is the shortest interval seen between two
    logged steps, so the kill lands as far into the run whatever the machine's speed (a fixed delay
    outlasted the last steps once they got faster, and the kill met a finished run).
    """
    proc = subprocess.Popen(command, env=_env(crash_at), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if kill_at_step:
        metrics = os.path.join(_output_dir(command), "metrics.jsonl")
        seen_below = False
        deadline = time.time() + timeout_s
        last, changed, step_s = -1, time.time(), None
        while proc.poll() is None and time.time() < deadline:
            step = _last_step(metrics)
            if step != last:
                if last >= 0 and step == last + 1:  # the shortest interval: one without a save in it
                    step_s = min(step_s or 1e9, time.time() - changed)
                last, changed = step, time.time()
            seen_below = seen_below or 0 <= step < kill_at_step or step == -1
            if seen_below and step >= kill_at_step:
                time.sleep(delay_steps * (step_s or 0.03))
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    _, err = proc.communicate(timeout=timeout_s)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"training exited with {proc.returncode}:\n{err[-3000:]}")
    return proc.returncode, err


def _output_dir(command: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in command if a.startswith("train.output_dir="))


def log_lines(run_dir: str) -> list[str]:
    """The raw lines of the run's metrics.jsonl: each holds its step's measured throughput, so a
    step trained again (not resumed) writes a different line."""
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def logged(run_dir: str) -> list[tuple]:
    """(step, loss, lr) of every line of the run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, f)]


def check_checkpoints_complete(run_dir: str) -> int:
    """Every checkpoint folder present loads in full; returns the newest step (0 if none)."""
    from paddle_mm.run_folder import MODEL_FILE, OPTIMIZER_FILE, PROJECTOR_FILE
    from paddle_mm.training.checkpoints import checkpoints, read_state
    from paddle_mm.weights.tensor_files import load_tensors

    newest = 0
    for ckpt in checkpoints(run_dir):
        for name in (MODEL_FILE, PROJECTOR_FILE, OPTIMIZER_FILE):
            load_tensors(os.path.join(ckpt, name))
        newest = read_state(ckpt)["step"]
    return newest


def random_kill(rng: random.Random, max_steps: int, start: int) -> tuple[int, float]:
    """A step to wait for and a delay of up to 1.5 steps (in steps): the kill lands before the last
    step ends, so the run is never found finished."""
    return rng.randint(min(start + 1, max_steps - 2), max_steps - 2), rng.uniform(0.0, 1.5)
