"""torch.autograd.gradcheck in float64 of the fused ops through the functional API, for input, weight, bias
and slope: every input rank, both memory layouts, ReLU and both PReLU slope modes, affine on and off,
training (batch statistics) and eval (running statistics)."""
import pytest
import torch

from conftest import ACTIVATIONS, LAYOUTS, SHAPES, fused_call, make_input, make_params


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", sorted(SHAPES))
def test_gradcheck(rank, layout, activation, affine, training, backend):
    shape = SHAPES[rank]
    x = make_input(shape, layout, torch.float64, scale=2.0, shift=0.5).requires_grad_()
    params = [p.requires_grad_() if p is not None else None for p in make_params(shape[1], activation, affine=affine)]
    running_mean = torch.randn(shape[1], dtype=torch.float64)
    running_var = torch.rand(shape[1], dtype=torch.float64) + 0.5

    def fn(x, weight, bias, slope):
        stats = (None, None) if training else (running_mean, running_var)
        return fused_call(x, *stats, weight, bias, slope, training, backend)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)
