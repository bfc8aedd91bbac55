"""runtime's CPU paths change no result beyond float rounding: copying_views restores the stride
setting and gives a training step's loss and gradients; cpu_linears gives nn.Linear's."""
import numpy as np
import paddle
import pytest
from test_model import ids_tensor, image_span, make_model, model_loss, pixels

from paddle_mm.runtime import copying_views

FLAG = "FLAGS_use_stride_kernel"


def stride_flag() -> bool:
    return paddle.get_flags([FLAG])[FLAG]


def test_the_setting_before_is_restored_even_after_an_error():
    before = stride_flag()
    with copying_views():
        assert stride_flag() is False
        with copying_views():  # nested: the inner exit keeps the outer setting
            pass
        assert stride_flag() is False
    assert stride_flag() == before
    with pytest.raises(RuntimeError), copying_views():
        raise RuntimeError("boom")
    assert stride_flag() == before


def test_overlapping_uses_on_two_threads_restore_the_setting_once_both_leave():
    import threading

    before = stride_flag()
    inside, leave = threading.Event(), threading.Event()

    def other():
        with copying_views():
            inside.set()
            leave.wait(30)

    thread = threading.Thread(target=other)
    with copying_views():  # entered first, left first
        thread.start()
        assert inside.wait(30)
    assert stride_flag() is False  # the other thread is still inside
    leave.set()
    thread.join(30)
    assert stride_flag() == before


def test_a_transpose_inside_is_a_copy_with_the_same_values():
    x = paddle.arange(24, dtype="float32").reshape([2, 3, 4])
    with copying_views():
        y = x.transpose([0, 2, 1])
        assert y.is_contiguous()
        np.testing.assert_array_equal(y.numpy(), x.numpy().transpose(0, 2, 1))
    assert not x.transpose([0, 2, 1]).is_contiguous()  # a strided view again outside


def _step(model, inside: bool):
    ids = ids_tensor([[1] + image_span() + [7, 8, 9, 10], [1] + image_span() + [11, 12, 13, 2]])
    labels = ids_tensor([[-100] * 17 + [7, 8, 9, 10], [-100] * 17 + [11, 12, 13, -100]])
    mask = paddle.ones_like(ids)
    model.clear_gradients()
    if inside:
        with copying_views():
            loss = model_loss(model, ids, mask, pixels(2), labels)
            loss.backward()
    else:
        loss = model_loss(model, ids, mask, pixels(2), labels)
        loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


def test_a_training_step_inside_gives_the_same_loss_and_gradients():
    model = make_model()
    model.train()
    loss_out, grads_out = _step(model, inside=False)
    loss_in, grads_in = _step(model, inside=True)
    assert abs(loss_in - loss_out) < 1e-6
    assert grads_in.keys() == grads_out.keys() and len(grads_in) > 10
    for name in grads_out:
        np.testing.assert_allclose(grads_in[name], grads_out[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_cpu_linears_give_nn_linear_results_and_gradients(monkeypatch):
    import paddle_mm.runtime as runtime
    from paddle_mm.runtime import _CpuLinear

    monkeypatch.setattr(runtime, "ADDMM_ROWS", 1)  # the tiny model's inputs take the addmm path too

    swapped, plain = make_model(seed=3), make_model(seed=3)
    swapped.train()
    plain.train()
    linears = [layer for layer in swapped.sublayers() if type(layer) is _CpuLinear]  # by the constructor
    assert len(linears) > 10 and not [layer for layer in swapped.sublayers() if type(layer) is paddle.nn.Linear]
    for layer in plain.sublayers():
        if type(layer) is _CpuLinear:
            layer.__class__ = paddle.nn.Linear  # Paddle's own matmul + broadcast add
    assert swapped.state_dict().keys() == plain.state_dict().keys()
    loss_swapped, grads_swapped = _step(swapped, inside=True)
    loss_plain, grads_plain = _step(plain, inside=True)
    assert abs(loss_swapped - loss_plain) < 1e-6
    assert grads_swapped.keys() == grads_plain.keys()
    for name in grads_plain:
        np.testing.assert_allclose(grads_swapped[name], grads_plain[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_cpu_linear_with_a_frozen_input_weight_or_bias(monkeypatch):
    import paddle_mm.runtime as runtime
    from paddle_mm.runtime import ADDMM_ROWS, cpu_linears

    calls = []
    apply = runtime._LinearWithBias.apply
    monkeypatch.setattr(runtime._LinearWithBias, "apply", lambda *a: calls.append(1) or apply(*a))

    layer = paddle.nn.Linear(4, 3)
    assert cpu_linears(layer) == 1
    rows = ADDMM_ROWS  # the addmm path (fewer rows take F.linear)
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((2, rows // 2, 4)).astype("float32"))
    out = layer(x)
    np.testing.assert_allclose(out.numpy(), x.numpy() @ layer.weight.numpy() + layer.bias.numpy(), rtol=1e-5, atol=1e-6)
    out.sum().backward()  # x needs no gradient
    np.testing.assert_allclose(layer.bias.grad.numpy(), np.full(3, float(rows)), rtol=1e-6)
    np.testing.assert_allclose(layer.weight.grad.numpy(), np.tile(x.numpy().reshape(-1, 4).sum(0)[:, None], (1, 3)),
                               rtol=1e-5)
    layer.clear_gradients(set_to_zero=False)
    layer.bias.stop_gradient = layer.weight.stop_gradient = True
    x.stop_gradient = False
    layer(x).sum().backward()
    assert layer.bias.grad is None and layer.weight.grad is None
    np.testing.assert_allclose(x.grad.numpy(), np.broadcast_to(layer.weight.numpy().sum(1), (2, rows // 2, 4)), rtol=1e-5)
    assert len(calls) == 2  # both calls above went through the PyLayer
    layer(x[:, :1]).sum().backward()  # a few rows: F.linear
    assert len(calls) == 2


def test_configure_cpu_keeps_large_freed_blocks_for_the_next_tensor():
    """Once configured, a new 31 MiB tensor reuses a freed block: no page fault per 4 KiB written
    (without it glibc maps each such block fresh and every page faults: 39685 over the five)."""
    import platform
    import resource

    from paddle_mm.runtime import configure_cpu, keep_freed_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        assert keep_freed_memory() is False
        return
    configure_cpu()  # every core, as the CLI sets them
    rows = 31 * 1024  # [rows, 256] float32: 31 MiB
    paddle.zeros([rows, 256])  # the first one may fault
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        paddle.zeros([rows, 256])
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # Fewer than one tensor's pages over five tensors (the heap may shift a little between them).
    assert faults < rows * 256 * 4 // 4096, faults


def test_scale_columns_gives_the_broadcast_multiply_and_its_gradients():
    from paddle_mm.runtime import scale_columns

    rng = np.random.default_rng(0)
    x_np, w_np, g_np = rng.standard_normal((3, 70, 16)), rng.standard_normal(16), rng.standard_normal((3, 70, 16))
    results = []
    for fn in (lambda x, w: x * w, scale_columns):
        x = paddle.to_tensor(x_np, dtype="float32", stop_gradient=False)
        w = paddle.create_parameter([16], "float32", default_initializer=paddle.nn.initializer.Assign(w_np))
        out = fn(x, w)
        out.backward(paddle.to_tensor(g_np, dtype="float32"))
        results.append((out.numpy(), x.grad.numpy(), w.grad.numpy()))
    (out, dx, dw), (out2, dx2, dw2) = results
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(dx2, dx)
    np.testing.assert_allclose(dw2, dw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, (g_np * x_np).sum(axis=(0, 1)), rtol=1e-4, atol=1e-4)
    frozen = paddle.ones([16])  # stop_gradient: the plain multiply, nothing to sum
    np.testing.assert_array_equal(scale_columns(paddle.to_tensor(x_np, dtype="float32"), frozen).numpy(),
                                  x_np.astype("float32"))
