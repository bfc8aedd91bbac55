"""Process-wide settings: CPU threads and random seeds."""
from __future__ import annotations

import contextlib
import functools
import os
import random

import numpy as np
import paddle

_STRIDE_FLAG = "FLAGS_use_stride_kernel"


def configure_cpu(num_threads: int = 0) -> int:
    """Use all cores (or num_threads) for Paddle's CPU kernels.

    Importing paddle pins OpenMP to one thread unless OMP_NUM_THREADS was set; on 2 cores this
    alone was measured to make a training step about 1.5-3x slower (docs/ARCHITECTURE.md, "the machine").
    """
    n = num_threads or os.cpu_count() or 1
    if paddle.device.get_device() == "cpu":
        paddle.base.core.set_num_threads(n)
    return n


@contextlib.contextmanager
def copying_views():
    """Within it, on CPU, transposes, slices and reshapes make contiguous copies through their own
    kernels instead of strided views (Paddle's FLAGS_use_stride_kernel off); the setting before is
    restored after.

    Why: on CPU, Paddle 3.3 makes a strided view contiguous (before a matmul, a reshape or an
    elementwise op, and in every transpose's gradient) with a generic element-by-element copy,
    40x the transpose kernel's time ([4, 257, 4, 64] to heads first: 2.7 against 0.06 ms). With
    the views off, the bench's training step took 303 against 462 ms and its batch-4 generation
    236 against 359 ms (docs/ARCHITECTURE.md, "the machine").

    Only around computation (forward, backward, decoding), never around saving or loading:
    PaddleFormers' save_pretrained wrote uninitialised memory for the transposed weights with the
    views off, and code that writes through a view (x[0][1] = v meant to change x) sees a copy.
    """
    if paddle.device.get_device() != "cpu":
        yield
        return
    before = paddle.get_flags([_STRIDE_FLAG])[_STRIDE_FLAG]
    paddle.set_flags({_STRIDE_FLAG: False})
    try:
        yield
    finally:
        paddle.set_flags({_STRIDE_FLAG: before})


def with_copying_views(fn):
    """fn run inside copying_views, its tensor arguments made contiguous first: a strided view made
    outside (a caller's ids[:, 1:]) stops Paddle with 'Not contiguous Tensor found' inside."""
    def contiguous(x):
        return x.contiguous() if isinstance(x, paddle.Tensor) and not x.is_contiguous() else x

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = [contiguous(a) for a in args]
        kwargs = {k: contiguous(v) for k, v in kwargs.items()}
        with copying_views():
            return fn(*args, **kwargs)

    return wrapper


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)
