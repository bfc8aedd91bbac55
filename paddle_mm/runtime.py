"""Process-wide settings: CPU threads and random seeds, and the CPU paths that change no figure but
their float rounding (strided views off, linears as addmm, bias and gain gradients by a matrix product)."""
from __future__ import annotations

import contextlib
import functools
import os
import random
import threading

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer

_STRIDE_FLAG = "FLAGS_use_stride_kernel"
_views = {"depth": 0, "before": True, "lock": threading.Lock()}  # copying_views in use, on any thread
# From this many rows a biased linear runs as addmm (below, its extra ops and the PyLayer's Python call
# cost more than the broadcast add saves: a decode step of the demo's model).
ADDMM_ROWS = 64


def on_cpu(x) -> bool:
    """Whether tensor x lives on the CPU (where the CPU paths here apply)."""
    return "cpu" in str(x.place).lower()


def configure_cpu(num_threads: int = 0) -> int:
    """Use all cores (or num_threads) for Paddle's CPU kernels.

    Importing paddle pins OpenMP to one thread unless OMP_NUM_THREADS was set; on 2 cores this
    alone was measured to make a training step about 1.5-3x slower (docs/ARCHITECTURE.md, "the machine").
    """
    n = num_threads or os.cpu_count() or 1
    if paddle.device.get_device() == "cpu":
        paddle.base.core.set_num_threads(n)
        keep_freed_memory()
    return n


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit (half its heap size)
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of returning them to
    the system; True where it took (Linux with glibc).

    Why: Paddle's CPU tensors come from malloc, and glibc maps a large block fresh from the system
    each time and unmaps it on free, so every element of a new large tensor costs a page fault
    when first written. paddle.zeros([32000, 256]) (the bench's embedding gradient, every step)
    took 11.0 ms that way and 1.3 ms with the block kept (the fill alone: 1.2 ms); a softmax over
    [130, 32000] 13.5 against 8.5 ms. Up to TRIM_THRESHOLD of freed memory stays with the process.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False


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
    The flag is process-wide, so uses on several threads are counted: the first to enter turns the
    views off and the last to leave restores them (each restoring its own "before" could leave them
    off for good when two threads interleave).
    """
    if paddle.device.get_device() != "cpu":
        yield
        return
    with _views["lock"]:
        if _views["depth"] == 0:
            _views["before"] = paddle.get_flags([_STRIDE_FLAG])[_STRIDE_FLAG]
            paddle.set_flags({_STRIDE_FLAG: False})
        _views["depth"] += 1
    try:
        yield
    finally:
        with _views["lock"]:
            _views["depth"] -= 1
            if _views["depth"] == 0:
                paddle.set_flags({_STRIDE_FLAG: _views["before"]})


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


def _addmm_linear(x, weight, bias):
    """x [..., K] W [K, N] + bias [N] as one addmm over the rows of x."""
    rows = paddle.addmm(bias.unsqueeze(0), x.reshape([-1, x.shape[-1]]), weight)
    return rows.reshape(x.shape[:-1] + [weight.shape[-1]])


def _column_sums(rows):
    """rows [N, D] summed over N, as ones [1, N] @ rows: Paddle 3.3's CPU reduction of a broadcast
    op's gradient loops over the rows (0.35 ms for [642, 256], the matmul 0.012)."""
    return paddle.matmul(paddle.ones([1, rows.shape[0]], rows.dtype), rows).reshape([-1])


class _ScaleColumns(PyLayer):
    """x [..., D] * w [D], with w's gradient summed over the rows by _column_sums."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        ctx.need_x = not x.stop_gradient
        return x * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensor()
        return (grad * weight if ctx.need_x else None,
                _column_sums((grad * x).reshape([-1, x.shape[-1]])))


def scale_columns(x, weight):
    """x [..., D] * weight [D] (a norm's gain). On CPU, with weight trained, its gradient is summed
    over the rows by a matmul: Paddle 3.3's broadcast multiply and its gradient took 18.1 ms on
    [3, 1013, 256] (a packed batch's norm) against 2.8 that way, 1.46 against 0.67 on [2, 321, 256].
    The same products; the sum in another order."""
    if weight.stop_gradient or not paddle.is_grad_enabled() or not on_cpu(x):
        return x * weight
    return _ScaleColumns.apply(x, weight)


class _LinearWithBias(PyLayer):
    """x W + b as one addmm (the bias fills the output before the products are added in), and in
    backward the bias gradient as ones @ grad: the same sums as Paddle's matmul + add, in another order."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.grads = (not x.stop_gradient, not weight.stop_gradient, not bias.stop_gradient)
        return _addmm_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensor()
        rows, grad_rows = x.reshape([-1, x.shape[-1]]), grad.reshape([-1, grad.shape[-1]])
        need_x, need_w, need_b = ctx.grads
        return (paddle.matmul(grad, weight, transpose_y=True) if need_x else None,
                paddle.matmul(rows, grad_rows, transpose_x=True) if need_w else None,
                _column_sums(grad_rows) if need_b else None)


class _CpuLinear(paddle.nn.Linear):
    """nn.Linear through _LinearWithBias: its parameters, names and results, other float rounding."""

    def forward(self, x):
        if self.bias is None or x.size < ADDMM_ROWS * x.shape[-1]:  # a few rows: the add is small, the call is not
            return F.linear(x, self.weight, self.bias)
        if not paddle.is_grad_enabled():
            return _addmm_linear(x, self.weight, self.bias)
        return _LinearWithBias.apply(x, self.weight, self.bias)


def cpu_linears(model) -> int:
    """On CPU, route every plain nn.Linear of model (not LoRA's or other subclasses) through
    _LinearWithBias; returns how many. Called by the models' constructors.

    Why: Paddle 3.3's CPU linear is a matmul and then a broadcast add of the bias, whose kernel took
    1.3 ms over [1028, 768] where addmm's whole product took 2.0 (the matmul alone 2.3); and the
    add's gradient reduces over the rows in a loop, 0.35 ms for [642, 256] against 0.012 ms as
    ones @ grad. The bench's model has about forty biased linears (the ViT's, the projector's,
    Qwen2's q/k/v): its training step took 279 against 309 ms with the bias gradient alone.
    """
    if paddle.device.get_device() != "cpu":
        return 0
    layers = [layer for layer in model.sublayers(include_self=True) if type(layer) is paddle.nn.Linear]
    for layer in layers:
        layer.__class__ = _CpuLinear
    return len(layers)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)
