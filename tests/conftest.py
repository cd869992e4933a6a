"""Shared test helpers: seeded RNG, inputs in each memory layout, the PyTorch modules we replace."""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fusedrect


# tests/interpret runs Triton's interpreter, which must be switched on before triton is imported: in its own
# process (test_triton_interpreter.py starts it), never collected into this one.
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interpret"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_rank_group():
    """A gloo process group of this process alone: SyncBN's synchronized path, collectives over one rank."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


# Input ranks and the batch-norm class that handles each in PyTorch.
SHAPES = {
    2: (6, 5),
    3: (3, 5, 7),
    4: (2, 5, 3, 4),
    5: (2, 5, 2, 3, 2),
}
BATCHNORM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
LAYOUTS = ("nchw", "channels_last")
ACTIVATIONS = ("relu", "prelu", "prelu_shared")


def make_input(shape, layout="nchw", dtype=torch.float32, scale=1.0, shift=0.0):
    """Random input of `shape` whose memory is either (N, C, S) contiguous or a (N*S, C) matrix."""
    if layout == "nchw":
        x = torch.randn(shape, dtype=torch.float64)
    else:
        x = torch.randn((shape[0], *shape[2:], shape[1]), dtype=torch.float64).movedim(-1, 1)
    return (x * scale + shift).to(dtype)


def make_params(channels, activation, dtype=torch.float64, affine=True):
    """(weight, bias, slope) away from the defaults so every term of the math is exercised."""
    weight = torch.rand(channels, dtype=dtype) + 0.5 if affine else None
    bias = torch.randn(channels, dtype=dtype) if affine else None
    slope = {"relu": None, "prelu": torch.rand(channels, dtype=dtype), "prelu_shared": torch.rand(1, dtype=dtype)}
    return weight, bias, slope[activation]


def fused_call(x, running_mean, running_var, weight, bias, slope, training, backend, momentum=0.1, eps=1e-5):
    if slope is None:
        return fusedrect.bn_relu(x, running_mean, running_var, weight, bias, training, momentum, eps, backend=backend)
    return fusedrect.bn_prelu(
        x, running_mean, running_var, weight, bias, slope, training, momentum, eps, backend=backend
    )


def fused_forward_backward(x, params, grad, training, backend, running=(None, None)):
    """fused_call on fresh leaves of x and params (weight, bias, slope; None where absent) with the running
    statistics ``running``, then backward of ``grad``: [y, the gradient of every leaf]."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, *params)]
    y = fused_call(leaves[0], *running, *leaves[1:], training, backend)
    y.backward(grad)
    return [y, *(t.grad for t in leaves if t is not None)]


def torch_modules(channels, rank, activation, **bn_kwargs):
    """The unfused PyTorch pair that the fused modules replace."""
    bn = BATCHNORM[rank](channels, **bn_kwargs)
    factory = {k: v for k, v in bn_kwargs.items() if k in ("device", "dtype")}
    act = {
        "relu": lambda: nn.ReLU(),
        "prelu": lambda: nn.PReLU(channels, **factory),
        "prelu_shared": lambda: nn.PReLU(1, **factory),
    }[activation]()
    return bn, act


def fused_module(channels, activation, **kwargs):
    if activation == "relu":
        return fusedrect.FusedBNReLU(channels, **kwargs)
    return fusedrect.FusedBNPReLU(channels, num_parameters=1 if activation == "prelu_shared" else None, **kwargs)


class _NoGradient(torch.autograd.Function):
    """Passes its input on and gives it no gradient (None) in backward."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


def check_no_gradient_for_the_output(layer):
    """A training layer whose output gets no gradient gives none to its input or parameters (and runs no kernel
    on zeros; the mean and invstd its node also returns get none materialized either)."""
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    (_NoGradient.apply(layer(x)).sum() + x.sum()).backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert all(p.grad is None for p in layer.parameters())


def check_statistics_beyond_range(ops, layout, shape, dtype=torch.float32):
    """``ops.bn_stats`` and ``ops.bn_act_fwd_train`` as PyTorch's where the dtype runs out: |x| ~ 1e25 in fp32
    (1e200 in fp64), whose squares overflow, gives an infinite variance (invstd 0, the output the bias through
    the ReLU), not NaN; a +inf in channel 0 and a -inf in channel 1, in the last sample (partials before theirs
    merged first), give means of +inf and -inf, the other channels' staying finite. ``ops``:
    torch.ops.fusedrect, or a backend's launchers."""
    channels = shape[1]
    x = make_input(shape, layout, dtype, scale=1e25 if dtype == torch.float32 else 1e200)
    mean, var = ops.bn_stats(x)
    assert torch.isfinite(mean).all() and torch.isinf(var).all()
    bias = torch.linspace(-1, 1, channels, dtype=dtype)
    y, _, invstd = ops.bn_act_fwd_train(x, None, bias, None, 1e-5)
    assert torch.equal(invstd, torch.zeros(channels, dtype=dtype))
    torch.testing.assert_close(y, bias.relu().view(1, channels, *[1] * (x.dim() - 2)).expand_as(y))
    x = make_input(shape, layout, dtype)
    last = (-1,) * (x.dim() - 2)
    x[(-1, 0, *last)] = float("inf")
    x[(-1, 1, *last)] = float("-inf")
    mean, _ = ops.bn_stats(x)
    assert mean[0] == float("inf") and mean[1] == float("-inf") and torch.isfinite(mean[2:]).all()


# Shapes for check_statistics_beyond_range: one tile or block, several (merged after the infinite one), empty
# lanes or iterations in the GPU kernels' merges (few elements per channel, or a long batch of 2 channels).
RANGE_SHAPES = [(2, 3, 3, 3), (4, 4, 5, 5), (5, 2), (64, 4, 3, 3), (4, 4, 64, 64), (32800, 2)]


def check_frozen_backward_of_non_finite_input(ops, layout, activation):
    """``ops.bn_act_bwd_elemt`` with zero sums (the frozen backward) against ``ops.bn_act_bwd`` with given
    statistics, on an input holding NaN and +-inf: equal, and finite, as PyTorch's eval backward (the x - mean
    term vanishes where its coefficient does). ``ops``: torch.ops.fusedrect, or a backend's launchers."""
    x = make_input((2, 3, 5, 5), layout)
    x[0, 1, 2, 2] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    x[0, 0, 4, 4] = float("-inf")
    args = [make_input((2, 3, 5, 5), layout), x, torch.randn(3), torch.rand(3) + 0.5,
            *(t.float() if t is not None else None for t in make_params(3, activation))]
    zeros = torch.zeros(3)
    frozen = ops.bn_act_bwd_elemt(*args, zeros, zeros, x.numel() // 3)
    torch.testing.assert_close(frozen, ops.bn_act_bwd(*args, False)[0], equal_nan=True)
    assert torch.isfinite(frozen).all()
