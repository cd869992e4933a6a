"""Numerical robustness and reproducibility: variance with a large mean, NaN/Inf propagation as PyTorch,
bitwise identical results run to run and across thread counts."""
import pytest
import torch
import torch.nn.functional as F

import fusedrect
from conftest import ACTIVATIONS, LAYOUTS, fused_call, make_input, make_params


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(8, 4, 32, 32), (4096, 3), (2, 2, 200, 200)], ids=str)
def test_variance_with_large_mean(shape, layout):
    """x = 1000 + randn in fp32: a naive sum(x^2) - sum(x)^2 loses every digit; we keep 1e-4."""
    x = make_input(shape, layout, torch.float32, shift=1000.0)
    running_var = torch.zeros(shape[1])
    fusedrect.bn_relu(x, None, running_var, training=True, momentum=1.0, backend="cpp")
    dims = [0, *range(2, x.dim())]
    expected = x.double().var(dims, unbiased=True)
    torch.testing.assert_close(running_var.double(), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_and_inf_propagate_as_pytorch(layout, activation):
    x = make_input((3, 4, 5, 5), layout)
    x[0, 1, 2, 2] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    x[2, 3, 4, 4] = float("-inf")
    weight, bias, slope = (t.float() if t is not None else None for t in make_params(4, activation))
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    for training in (True, False):
        ours = fused_call(x, running_mean.clone(), running_var.clone(), weight, bias, slope, training, "cpp")
        z = F.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias, training)
        theirs = F.relu(z) if slope is None else F.prelu(z, slope)
        torch.testing.assert_close(ours, theirs, equal_nan=True)


def run_training_step(x, params, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
    y = fusedrect.bn_prelu(leaves[0], None, None, *leaves[1:], training=True, backend="cpp")
    y.backward(grad_out)
    return [y.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic(layout, dtype):
    shape = (16, 24, 30, 30)
    x = make_input(shape, layout, dtype, scale=3.0, shift=1.0)
    params = [t.float() for t in make_params(24, "prelu")]
    grad_out = torch.randn(shape).to(dtype)
    first = run_training_step(x, params, grad_out)
    threads = torch.get_num_threads()
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            for a, b in zip(first, run_training_step(x, params, grad_out)):
                assert torch.equal(a, b), f"differs with {n} threads"
    finally:
        torch.set_num_threads(threads)
