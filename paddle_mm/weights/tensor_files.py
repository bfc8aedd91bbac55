"""Weights on disk: safetensors only, written atomically, loaded with a full name and shape check."""
from __future__ import annotations

import os

import numpy as np

from paddle_mm.errors import CheckpointError


def atomic_path(path: str) -> str:
    """A temporary name beside `path`; the caller os.replace()s it into place when complete."""
    return f"{path}.tmp-{os.getpid()}"


def save_tensors(tensors: dict, path: str) -> None:
    """Save {name: paddle.Tensor | np.ndarray} as safetensors; never leaves a half-written file."""
    from safetensors.numpy import save_file

    arrays = {k: (v if isinstance(v, np.ndarray) else v.numpy()) for k, v in tensors.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = atomic_path(path)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp)
    with open(tmp, "rb") as f:  # on disk before the rename publishes it, as fileio's writes are
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_tensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80" or head == b"PK":  # a pickle stream, or torch's zip of pickles
            raise CheckpointError(f"{path}: is a pickle-based file; paddle_mm reads safetensors only "
                                  "and never unpickles weights (convert it first, if you trust it)") from e
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e


def state_dict_of(layer, prefix: str = "") -> dict:
    """Named parameters (and buffers) of a layer, with an optional name prefix."""
    return {prefix + k: v for k, v in layer.state_dict().items()}


def load_into(layer, tensors: dict[str, np.ndarray], source: str, prefix: str = "", strict: bool = True) -> list[str]:
    """Copy tensors whose names start with `prefix` into `layer`; returns the names left unset.

    With strict, a missing, unexpected or wrongly shaped tensor is a CheckpointError listing them.
    """
    own = layer.state_dict()
    given = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    # A parameter shared with a given one (an LM head tied to the embedding) is loaded with it:
    # a converted checkpoint holds it once, as the Hugging Face file did.
    loaded = {own[k].name for k in given if k in own}
    missing = sorted(k for k in set(own) - set(given) if own[k].name not in loaded)
    unexpected = sorted(set(given) - set(own))
    wrong = [f"{k}: file {list(given[k].shape)} vs model {list(own[k].shape)}"
             for k in sorted(set(own) & set(given)) if list(given[k].shape) != list(own[k].shape)]
    problems = []
    if missing and strict:
        problems.append(f"missing {len(missing)}: {', '.join(prefix + m for m in missing[:10])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(prefix + u for u in unexpected[:10])}")
    if wrong:
        problems.append(f"wrong shape: {'; '.join(wrong[:10])}")
    if problems:
        raise CheckpointError(f"{source}: does not fit the model ({' | '.join(problems)})")
    for k, v in given.items():
        own[k].set_value(v.astype(str(own[k].dtype).replace("paddle.", "")) if v.dtype != np.float32 else v)
    return missing
