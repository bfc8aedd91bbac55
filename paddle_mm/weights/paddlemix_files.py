"""A PaddleMIX folder's tensors: its safetensors, or its model_state.pdparams (a pickle) only on request.

Below both PaddleMIX readers (paddlemix.py's LLaVA, blip2.py's BLIP-2), which share it.
"""
from __future__ import annotations

import os

import numpy as np

from paddle_mm.errors import CheckpointError
from paddle_mm.weights.hf import read_tensors

PDPARAMS = "model_state.pdparams"


def read_paddlemix_tensors(folder: str, allow_pickle: bool = False, ask: str = "--pdparams") -> dict[str, np.ndarray]:
    """The folder's safetensors, or with allow_pickle its model_state.pdparams, floating point as fp32.

    `ask` is how the caller's user asks for the pickle, named in the error when only it is there.
    """
    pdparams = os.path.join(folder, PDPARAMS)
    if allow_pickle:
        if not os.path.isfile(pdparams):
            raise CheckpointError(f"{folder}: no {PDPARAMS}")
        import paddle

        try:
            state = paddle.load(pdparams, return_numpy=True)
        except Exception as e:  # a corrupt pickle raises anything
            raise CheckpointError(f"{pdparams}: cannot read ({type(e).__name__}: {e})") from e
        return {k: _float32(np.asarray(v), k, pdparams) for k, v in state.items()}
    try:
        return read_tensors(folder)
    except CheckpointError as e:
        if os.path.isfile(pdparams):
            raise CheckpointError(f"{e}; to read {PDPARAMS} (a pickle: only from a source you trust) "
                                  f"ask for it by name ({ask})") from None
        raise


def _float32(a: np.ndarray, name: str, path: str) -> np.ndarray:
    if a.dtype == np.uint16:  # Paddle hands bf16 to numpy as its raw 16 bits
        return (a.astype(np.uint32) << 16).view(np.float32)
    if a.dtype.kind != "f":
        raise CheckpointError(f"{path}: tensor {name} has dtype {a.dtype}, not floating point")
    return a.astype(np.float32)
