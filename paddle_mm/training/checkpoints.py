"""Crash-safe training checkpoints and exact resume.

Layout inside a run folder:

    checkpoint/step-00000040/   model.safetensors, projector.safetensors,
                                optimizer.safetensors, state.json
    checkpoint/step-00000050/   the newest: the one a rerun continues from
    checkpoint/best/            train.keep_best: the weights of the lowest held-out loss

A checkpoint folder is built under a temporary name (`checkpoint/.tmp-...`) and renamed into
place when every file in it is complete; the rename is the commit. So every `step-*` folder
is complete, the newest one is simply the highest step, and no pointer file can lag behind
it. Older folders beyond `train.keep_checkpoints` are first renamed to `.trash-...` (atomic)
and only then deleted, so a kill while deleting never leaves a half-deleted `step-*`.

state.json holds the step, the position in the data order (epoch, cursor) and the random
states of Python, NumPy and Paddle, so a resumed run takes exactly the steps an
uninterrupted one would.

Test seam: with PADDLE_MM_CRASH_AT="<point>:<n>" set, the process kills itself (SIGKILL,
not an exception) the n-th time (1-based) it reaches <point>, one of CRASH_POINTS. Tests use
it to kill a run at a chosen moment inside a save; unset, it costs one dict lookup.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys

import numpy as np

from paddle_mm.errors import CheckpointError
from paddle_mm.fileio import write_json_atomic, write_text_atomic
from paddle_mm.run_folder import (
    BEST_DIR,
    CHECKPOINT_DIR,
    MODEL_FILE,
    OPTIMIZER_FILE,
    PROJECTOR_FILE,
    STATE_FILE,
    WEIGHT_FILES,
    step_folder,
)
from paddle_mm.weights.tensor_files import load_into, load_tensors, save_tensors

_STEP_DIR = re.compile(r"^step-(\d+)$")

CRASH_POINTS = (
    "save-started",  # temporary folder made, nothing in it yet
    "save-model-written",  # model.safetensors written, the optimizer not yet
    "save-files-written",  # every file written, folder not yet renamed into place
    "save-renamed",  # new checkpoint in place, older ones not yet pruned
    "save-pruning",  # an old checkpoint renamed to .trash, not yet deleted
    "export-started",  # final checkpoint written, weights not yet linked into the run folder
)
_crash_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    """SIGKILL this process here if PADDLE_MM_CRASH_AT names this point (see module docstring)."""
    spec = os.environ.get("PADDLE_MM_CRASH_AT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == int(nth or 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- random states
def snapshot_rng() -> tuple:
    """Python, NumPy and Paddle random states as they are now (cheap: a few microseconds)."""
    import paddle

    return random.getstate(), np.random.get_state(), paddle.get_rng_state()


def rng_to_json(snapshot: tuple) -> dict:
    py_state, np_state, paddle_state = snapshot
    version, internal, gauss = py_state
    paddle_states = []
    for gen in paddle_state:
        device, seed, offset, mt = gen.__getstate__()
        paddle_states.append([device, seed, offset, bytes(mt).decode("ascii")])
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "paddle": paddle_states,
    }


def restore_snapshot(snapshot: tuple) -> None:
    """Put back the random states a snapshot_rng() took (e.g. around validation, which must not
    move training's streams)."""
    restore_rng(rng_to_json(snapshot))


def restore_rng(saved: dict) -> None:
    import paddle

    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = saved["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    template = paddle.get_rng_state()
    if len(template) != len(saved["paddle"]):
        raise CheckpointError(f"the checkpoint holds {len(saved['paddle'])} Paddle random states, "
                              f"this device has {len(template)}")
    states = []
    for gen, (device, seed, offset, mt) in zip(template, saved["paddle"]):
        state = type(gen).__new__(type(gen))
        state.__setstate__((device, seed, offset, list(mt.encode("ascii"))))
        states.append(state)
    paddle.set_rng_state(states)


# ----------------------------------------------------------------------------- optimizer slots
# Paddle names optimizer slots after a parameter's generated name ("linear_3.w_0_moment1_0"),
# which differs between processes; on disk they are named after the parameter's path instead.
_SLOT = re.compile(r"^(.*)_(moment1|moment2|beta1_pow_acc|beta2_pow_acc)_(\d+)$")


def optimizer_tensors(optimizer, model) -> dict:
    path_of = {p.name: n for n, p in model.named_parameters()}
    out = {}
    for key, value in optimizer.state_dict().items():
        match = _SLOT.match(key) if hasattr(value, "numpy") else None
        if match and match.group(1) in path_of:
            out[f"{path_of[match.group(1)]}:{match.group(2)}_{match.group(3)}"] = value
    return out


def load_optimizer_tensors(optimizer, model, tensors: dict, source: str) -> None:
    import paddle

    generated = {n: p.name for n, p in model.named_parameters()}
    state = {}
    for key, value in tensors.items():
        path, _, slot = key.partition(":")
        if path not in generated:
            raise CheckpointError(f"{source}: optimizer state for {path!r}, which the model does not have")
        state[f"{generated[path]}_{slot}"] = paddle.to_tensor(value)
    optimizer.set_state_dict(state)


# ----------------------------------------------------------------------------- writing
def step_dir(run_dir: str, step: int) -> str:
    return step_folder(os.path.join(run_dir, CHECKPOINT_DIR), step)


def write_checkpoint(dest: str, model, optimizer, state: dict, rng: tuple | None = None,
                     extra_json: dict | None = None) -> None:
    """Write a complete checkpoint folder at `dest`, atomically (a temporary folder, then a rename).

    `state` must be JSON-able; the random states (`rng`, a snapshot_rng(); default: now) are
    added to it. `extra_json` maps more file names to objects written beside state.json.
    optimizer None writes no optimizer file (checkpoint/best/: weights to keep, not to resume).
    """
    parent, name = os.path.split(dest)
    tmp = os.path.join(parent, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    crash_point("save-started")
    save_tensors(model.state_dict(), os.path.join(tmp, MODEL_FILE))
    crash_point("save-model-written")
    if getattr(model, "multi_modal_projector", None) is not None:  # a clip-stage model has none
        save_tensors(model.multi_modal_projector.state_dict(), os.path.join(tmp, PROJECTOR_FILE))
    if optimizer is not None:
        save_tensors(optimizer_tensors(optimizer, model), os.path.join(tmp, OPTIMIZER_FILE))
    for file, obj in (extra_json or {}).items():
        write_json_atomic(os.path.join(tmp, file), obj)
    write_json_atomic(os.path.join(tmp, STATE_FILE), {**state, "rng": rng_to_json(rng or snapshot_rng())})
    _fsync_dir(tmp)
    crash_point("save-files-written")
    if os.path.isdir(dest):  # a rerun from an older checkpoint reaches this step again
        _discard(dest)
    os.replace(tmp, dest)
    _fsync_dir(parent)
    crash_point("save-renamed")


def save_checkpoint(run_dir: str, model, optimizer, state: dict, keep: int) -> str:
    """Write checkpoint/step-N for state["step"] and keep only the newest `keep`; returns its path."""
    dest = step_dir(run_dir, state["step"])
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    write_checkpoint(dest, model, optimizer, state)
    for old in checkpoints(run_dir)[:-keep]:
        _discard(old)
    return dest


def save_best(run_dir: str, model, step: int, eval_loss: float) -> str:
    """Write checkpoint/best/ (weights and a state.json with the step and its held-out loss),
    replacing the one before; nothing resumes from it, so it holds no optimizer state."""
    dest = os.path.join(run_dir, CHECKPOINT_DIR, BEST_DIR)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    write_checkpoint(dest, model, None, {"step": step, "eval_loss": eval_loss})
    return dest


def _discard(path: str) -> None:
    """Delete a checkpoint folder; renamed away first so a kill never leaves it half-deleted."""
    parent, name = os.path.split(path)
    trash = os.path.join(parent, f".trash-{name}-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    crash_point("save-pruning")
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    """Make a rename durable across a power cut (a killed process needs no fsync; a host does)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows, where a folder cannot be opened; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_leftovers(run_dir: str) -> None:
    """Remove temporary and trash folders a killed run left behind."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# ----------------------------------------------------------------------------- reading
def checkpoints(run_dir: str) -> list[str]:
    """The run's checkpoint folders, oldest first (by step)."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(root) if (m := _STEP_DIR.match(name))]
    return [os.path.join(root, name) for _, name in sorted(found)]


def read_state(ckpt: str) -> dict:
    path = os.path.join(ckpt, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint state ({e})") from e
    if not isinstance(state, dict) or not {"step", "epoch", "cursor"} <= set(state):
        raise CheckpointError(f"{path}: not a checkpoint state (needs step, epoch, cursor)")
    return state


def load_checkpoint(ckpt: str, model, optimizer) -> dict:
    """Restore weights, optimizer slots and random states from one folder; returns its state."""
    state = read_state(ckpt)
    load_into(model, load_tensors(os.path.join(ckpt, MODEL_FILE)), ckpt)
    optimizer_file = os.path.join(ckpt, OPTIMIZER_FILE)
    load_optimizer_tensors(optimizer, model, load_tensors(optimizer_file), optimizer_file)
    if "rng" in state:
        restore_rng(state.pop("rng"))
    return state


def load_latest(run_dir: str, model, optimizer) -> tuple[dict, str] | tuple[None, None]:
    """(state, folder) of the newest checkpoint that loads, or (None, None) when there is none.

    A newer folder that fails to load (only possible after a host crash cut files the rename
    had already published) is reported and the next older one is tried.
    """
    for ckpt in reversed(checkpoints(run_dir)):
        try:
            return load_checkpoint(ckpt, model, optimizer), ckpt
        except CheckpointError as e:
            print(f"warning: skipping unreadable checkpoint {ckpt}: {e}", file=sys.stderr)
    return None, None


# ----------------------------------------------------------------------------- run folder
def export_weights(run_dir: str, ckpt: str) -> None:
    """Make the run folder's model/projector files the checkpoint's, without writing them twice.

    A hard link shares the bytes (later pruning of the checkpoint leaves the link intact);
    where links are not possible the file is copied. Either way it appears atomically.
    """
    crash_point("export-started")
    for name in _weight_files(ckpt):
        src, dst = os.path.join(ckpt, name), os.path.join(run_dir, name)
        tmp = f"{dst}.tmp-{os.getpid()}"
        if os.path.exists(tmp):
            os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _weight_files(ckpt: str) -> list[str]:
    return [n for n in WEIGHT_FILES if os.path.isfile(os.path.join(ckpt, n))]


def is_exported(run_dir: str, ckpt: str) -> bool:
    try:
        return all(os.path.samefile(os.path.join(ckpt, n), os.path.join(run_dir, n))
                   for n in _weight_files(ckpt))
    except OSError:
        return False


def trim_log(path: str, step: int) -> None:
    """Drop the log lines of steps after `step` (taken again after a resume) and any cut line.

    After this the log of a resumed run reads like the log of an uninterrupted one. Lines
    without a "step" are kept.
    """
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    kept = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line a kill cut short
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            continue
        kept.append(line + "\n")
    if "".join(kept) != text:
        write_text_atomic(path, "".join(kept))
