"""The Triton kernels in Triton's CPU interpreter (TRITON_INTERPRET=1), through the public functional API and
modules with backend="triton": forward, backward and gradcheck against the reference, fp64/fp32/fp16, both
layouts, ReLU and both PReLU slope modes, awkward channel counts and 1x1 spatial size. Tiny shapes: every
program instance costs milliseconds here."""
import os

import pytest
import torch

import fusedrect
from conftest import (ACTIVATIONS, LAYOUTS, check_frozen_backward_of_non_finite_input,
                      check_statistics_beyond_range, check_no_gradient_for_the_output, fused_call,
                      fused_forward_backward, fused_module, make_input, make_params, torch_modules)
from fusedrect import reference
from fusedrect.ops import _backend, sync_bn

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (see tests/test_triton_interpreter.py)"

SHAPES = [(3, 1, 4, 4), (2, 3, 5, 5), (2, 33, 3, 3), (5, 3, 1, 1), (6, 33), (2, 3, 7), (2, 3, 2, 2, 3)]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2}


def forward_backward(x, params, grad, training, backend):
    running = (None, None)
    if not training:
        mean, invstd = reference.batch_stats(x.detach().double() * 0.5 + 0.25, 1e-5)
        running = (mean.to(x.dtype), (invstd.pow(-2) - 1e-5).to(x.dtype))
    return fused_forward_backward(x, params, grad, training, backend, running)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(shape, layout, activation, dtype, training):
    x = make_input(shape, layout, dtype, scale=2.0, shift=1.0)
    params = [p.to(dtype) if p is not None else None for p in make_params(shape[1], activation)]
    grad = torch.randn(shape, dtype=torch.float64).to(dtype)
    ours = forward_backward(x, params, grad, training, "triton")
    expected = forward_backward(x.double(), [p.double() if p is not None else None for p in params],
                                grad.double(), training, "reference")
    assert ours[0].stride() == x.stride()
    for got, want in zip(ours, expected):
        tol = TOLERANCE[dtype] * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_sums_of_many_partials_keep_fp32_accuracy(layout):
    """Hundreds of per-program partials per channel (channels-last 8x4x56x56: 784): their merges keep the
    statistics and the parameter gradients as accurate as one fp32 pass (they are merged in fp64). Merged in
    fp32, the mean lost enough that a GPU's recomputed activations near 0 took the other branch (dx off by
    0.79 at 32x64x56x56 on an H200)."""
    from fusedrect.kernels import bn_act as kernels

    x = make_input((8, 4, 56, 56), layout, torch.float32, scale=0.5, shift=4.0)
    mean, invstd = kernels.batch_stats(x, 1e-5)
    want_mean, want_invstd = reference.batch_stats(x.double(), 1e-5)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(invstd.double(), want_invstd, rtol=2e-6, atol=0)
    grad = make_input(x.shape, layout, torch.float32, shift=1.0)
    weight, bias, slope = (p.float() for p in make_params(4, "prelu"))
    sums = kernels.bn_act_bwd_reduce(grad, x, mean, invstd, weight, bias, slope)
    want = reference.bn_act_bwd_reduce(grad.double(), x.double(), mean.double(), invstd.double(), weight.double(),
                                       bias.double(), slope.double())
    for got, expected in zip(sums, want):  # sum dz, sum dz * xhat, the slope's gradient
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(3, 2, 2, 2), (4, 3), (2, 3, 1, 1)], ids=str)
def test_triton_gradcheck(shape, layout, activation, training):
    x = make_input(shape, layout, torch.float64, scale=2.0).requires_grad_()
    params = [p.requires_grad_() if p is not None else None for p in make_params(shape[1], activation)]
    running_mean = torch.randn(shape[1], dtype=torch.float64)
    running_var = torch.rand(shape[1], dtype=torch.float64) + 0.5

    def fn(x, weight, bias, *slope):
        stats = (None, None) if training else (running_mean, running_var)
        return fused_call(x, *stats, weight, bias, slope[0] if slope else None, training, "triton")

    assert torch.autograd.gradcheck(fn, (x, *[p for p in params if p is not None]), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_triton_module_steps_match_pytorch(activation):
    bn, act = torch_modules(3, 4, activation)
    reference_model = torch.nn.Sequential(bn, act)
    fused = fused_module(3, activation, backend="triton")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (fused, reference_model)]
    for step in range(2):
        x = make_input((4, 3, 3, 3), "channels_last" if step else "nchw", shift=float(step))
        outputs = []
        for model, optimizer in zip((fused, reference_model), optimizers):
            y = model(x)
            y.square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            outputs.append(y)
        torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused.running_var, bn.running_var)


def test_environment_selects_triton(monkeypatch):
    monkeypatch.setenv("FUSEDRECT_BACKEND", "triton")
    calls = []
    from fusedrect.kernels import bn_act as kernels

    original = kernels.bn_act_fwd_train
    monkeypatch.setattr(kernels, "bn_act_fwd_train", lambda *a: calls.append(1) or original(*a))
    fusedrect.FusedBNReLU(3)(torch.randn(4, 3, 2, 2))
    assert calls == [1]


@pytest.mark.skipif(_backend.cuda_module() is None, reason="the C++ router is the CUDA part's")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpp_router_hands_triton_calls_to_the_python_router(monkeypatch, layout):
    """FUSEDRECT_BACKEND=triton: the ops' CUDA kernels (csrc/cuda/router.cpp) run the Triton launchers through
    the Python router, here on CPU tensors in the interpreter."""
    monkeypatch.setenv("FUSEDRECT_BACKEND", "triton")
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    x = make_input((4, 3, 3, 3), layout, torch.float64, scale=2.0, shift=0.5)
    grad = torch.randn_like(x)
    weight, bias, slope = make_params(3, "prelu")
    y, mean, invstd = torch.ops.fusedrect.bn_act_fwd_train.default.redispatch(cuda, x, weight, bias, slope, 1e-5)
    expected_y, expected_mean, expected_invstd = reference.bn_act_train(x, weight, bias, slope, 1e-5)
    torch.testing.assert_close((y, mean, invstd), (expected_y, expected_mean, expected_invstd))
    grads = torch.ops.fusedrect.bn_act_bwd.default.redispatch(cuda, grad, x, mean, invstd, weight, bias, slope, True)
    torch.testing.assert_close(grads, torch.ops.fusedrect.bn_act_bwd(grad, x, mean, invstd, weight, bias, slope, True))


def test_triton_is_deterministic():
    x = make_input((4, 5, 6, 6), "channels_last", scale=3.0)
    params = [p.float() for p in make_params(5, "prelu")]
    grad = torch.randn(4, 5, 6, 6)
    first = forward_backward(x, params, grad, True, "triton")
    second = forward_backward(x, params, grad, True, "triton")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_memory_efficient_backward(layout):
    x = make_input((3, 4, 3, 3), layout, torch.float64, scale=2.0).requires_grad_()
    weight, bias, slope = (p.requires_grad_() for p in make_params(4, "prelu"))
    slope.data += 0.05

    def fn(x, weight, bias, slope, memory_efficient=True):
        return fusedrect.bn_prelu(x, None, None, weight, bias, slope, training=True, backend="triton",
                                  memory_efficient=memory_efficient)

    assert torch.autograd.gradcheck(fn, (x, weight, bias, slope), eps=1e-6, atol=1e-5)
    grads = [torch.autograd.grad(fn(x, weight, bias, slope, m).square().sum(), (x, weight, bias, slope))
             for m in (True, False)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("activation", ["relu", "prelu"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (2, 33, 3, 3), (6, 33)], ids=str)
def test_sync_bn_halves_match_reference(shape, layout, activation):
    """The launchers of bn_stats, bn_act_bwd_reduce and bn_act_bwd_elemt against the reference, fp32."""
    from fusedrect.kernels import bn_act as kernels

    x = make_input(shape, layout, scale=2.0, shift=1.0)
    mean, invstd = (t.float() for t in reference.batch_stats(x.double() * 0.8 + 0.1, 1e-5))
    args = [torch.randn_like(x), x, mean, invstd, *(p.float() if p is not None else None
                                                   for p in make_params(shape[1], activation))]
    double = [t.double() if t is not None else None for t in args]
    count = 2 * x.numel() // shape[1]
    sums = kernels.bn_act_bwd_reduce(*args)
    dx = kernels.bn_act_bwd_elemt(*args, *sums[:2], count)
    expected = [*reference.bn_stats(x.double()), *reference.bn_act_bwd_reduce(*double),
                reference.bn_act_bwd_elemt(*double, *(s.double() for s in sums[:2]), count)]
    assert dx.stride() == x.stride()
    for got, want in zip([*kernels.bn_stats(x), *sums, dx], expected):
        tol = TOLERANCE[torch.float32] * max(1.0, want.abs().max().item()) if want.numel() else 0.0
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=TOLERANCE[torch.float32])


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_frozen_backward_of_non_finite_input(layout, activation):
    from fusedrect.kernels import bn_act as kernels

    check_frozen_backward_of_non_finite_input(kernels, layout, activation)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 3, 3, 3), (4, 4, 5, 5), (5, 2), (64, 4, 3, 3), (5, 2, 32, 32), (160, 2)],
                         ids=str)
def test_triton_statistics_beyond_range(shape, layout, monkeypatch):
    from fusedrect.kernels import bn_act as kernels

    # Few programs: several loop steps each at these small shapes, the last program's last step empty in some.
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 6)
    check_statistics_beyond_range(kernels, layout, shape)


@pytest.mark.parametrize("activation", ["relu", "prelu"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_synchronized_one_rank(one_rank_group, layout, activation):
    """SyncBN's autograd on the Triton launchers (one rank): forward and gradients as the reference BN, fp64."""
    x = make_input((3, 4, 3, 3), layout, torch.float64, scale=2.0)
    params = make_params(4, activation)
    grad = torch.randn(x.shape, dtype=torch.float64)
    results = []
    for run in (lambda *a: sync_bn.sync_bn_act_train(*a, 1e-5, one_rank_group, 1, "triton")[0],
                lambda *a: reference.bn_act_train(*a, 1e-5)[0]):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, *params)]
        y = run(*leaves)
        y.backward(grad)
        results.append([y, *(t.grad for t in leaves if t is not None)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("module", ["prelu", "memory_efficient", "preact"])
def test_triton_backward_without_a_gradient_for_the_output(module):
    check_no_gradient_for_the_output({
        "prelu": lambda: fusedrect.FusedBNPReLU(3, backend="triton"),
        "memory_efficient": lambda: fusedrect.FusedBNPReLU(3, memory_efficient=True, backend="triton"),
        "preact": lambda: fusedrect.FusedPreActConv2d(3, 4, 3, padding=1, backend="triton")}[module]())
