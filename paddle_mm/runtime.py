"""Process-wide settings: CPU threads and random seeds, and the CPU paths that change no figure but
their float rounding (strided views off, bias gradients by a matrix product)."""
from __future__ import annotations

import contextlib
import functools
import os
import random

import numpy as np
import paddle
from paddle.autograd import PyLayer

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


class _BiasAdd(PyLayer):
    """x + bias [D], whose bias gradient is ones [1, N] @ grad [N, D] instead of Paddle's reduction."""

    @staticmethod
    def forward(ctx, x, bias):
        ctx.bias_shape, ctx.grads = bias.shape, (not x.stop_gradient, not bias.stop_gradient)
        return x + bias

    @staticmethod
    def backward(ctx, grad):
        rows = grad.reshape([-1, grad.shape[-1]])
        bias_grad = paddle.matmul(paddle.ones([1, rows.shape[0]], grad.dtype), rows).reshape(ctx.bias_shape)
        return grad if ctx.grads[0] else None, bias_grad if ctx.grads[1] else None


class _MatmulBiasGradLinear(paddle.nn.Linear):
    """nn.Linear with the bias added by _BiasAdd: the same forward, the bias gradient by a matmul."""

    def forward(self, x):
        y = paddle.matmul(x, self.weight)
        return y if self.bias is None else _BiasAdd.apply(y, self.bias)


def matmul_bias_gradients(model) -> int:
    """On CPU, make every plain nn.Linear of model (not LoRA's or other subclasses) take its bias
    gradient as a matrix product with ones; returns how many. The same sums in another order.

    Why: Paddle 3.3's CPU gradient of a broadcast bias add reduces over the rows in a loop: 0.35 ms
    for [642, 256], where ones @ grad takes 0.012 ms; a training step of the bench has about forty
    bias adds (the ViT's, the projector's, Qwen2's q/k/v). Called by the training loop after the
    model is built and LoRA added.
    """
    if paddle.device.get_device() != "cpu":
        return 0
    layers = [layer for layer in model.sublayers(include_self=True) if type(layer) is paddle.nn.Linear]
    for layer in layers:
        layer.__class__ = _MatmulBiasGradLinear
    return len(layers)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)
