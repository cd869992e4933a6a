"""memory_efficient=True: the output alone is saved for backward, the input recovered from it; gradients equal
the default mode's, gradcheck passes, preconditions are checked with errors naming the channel."""
import pytest
import torch

import fusedrect
from conftest import LAYOUTS, make_input


def run(x, weight, bias, slope, memory_efficient, grad):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias, slope)]
    y = fusedrect.bn_prelu(leaves[0], None, None, *leaves[1:], training=True, memory_efficient=memory_efficient)
    y.backward(grad)
    return [y, *(t.grad for t in leaves if t is not None)]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_channel", "shared"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_equal_the_default_mode_and_gradcheck(layout, shared, affine):
    x = make_input((4, 5, 3, 3), layout, torch.float64, scale=2.0, shift=1.0)
    weight = torch.rand(5, dtype=torch.float64) + 0.5 if affine else None
    bias = torch.randn(5, dtype=torch.float64) if affine else None
    slope = torch.rand(1 if shared else 5, dtype=torch.float64) + 0.05
    grad = torch.randn(x.shape, dtype=torch.float64)
    for got, want in zip(run(x, weight, bias, slope, True, grad), run(x, weight, bias, slope, False, grad)):
        torch.testing.assert_close(got, want)
    params = [t.requires_grad_() for t in (x.clone(), weight, bias, slope) if t is not None]

    def fn(x, *rest):
        w, b, a = (rest[0], rest[1], rest[2]) if affine else (None, None, rest[0])
        return fusedrect.bn_prelu(x, None, None, w, b, a, training=True, memory_efficient=True)

    assert torch.autograd.gradcheck(fn, tuple(params), eps=1e-6, atol=1e-5)


def saved_storages(layer, x):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    return y, storages


def test_only_the_output_is_saved():
    x = torch.randn(8, 16, 10, 10, requires_grad=True)
    y, efficient = saved_storages(fusedrect.FusedBNPReLU(16, memory_efficient=True), x)
    big = {ptr for ptr, nbytes in efficient.items() if nbytes >= x.numel() * 4}
    assert big == {y.untyped_storage().data_ptr()}
    assert sum(efficient.values()) - x.numel() * 4 <= 4 * 16 * 4  # plus O(C): invstd, weight, bias, slope
    _, default = saved_storages(fusedrect.FusedBNPReLU(16), x)
    assert {ptr for ptr, nbytes in default.items() if nbytes >= x.numel() * 4} == {x.untyped_storage().data_ptr()}


def test_module_trains_like_the_default_mode():
    torch.manual_seed(0)
    layers = [fusedrect.FusedBNPReLU(6, memory_efficient=m) for m in (True, False)]
    assert "memory_efficient=True" in repr(layers[0])
    x = torch.randn(4, 6, 5, 5)
    outputs = [layer(x).square().sum() for layer in layers]
    for out in outputs:
        out.backward()
    torch.testing.assert_close(layers[0].slope.grad, layers[1].slope.grad)
    torch.testing.assert_close(layers[0].running_var, layers[1].running_var)


def test_preconditions_name_the_offending_channel():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="slope: memory_efficient needs every slope > 0 .* channel 1's slope is -0.1"):
        fusedrect.bn_prelu(x, None, None, None, None, torch.tensor([0.2, -0.1, 0.3]), True, memory_efficient=True)
    with pytest.raises(ValueError, match="channel 0's slope is nan"):
        fusedrect.bn_prelu(x, None, None, None, None, torch.tensor([float("nan"), 0.2, 0.3]), True,
                           memory_efficient=True)
    with pytest.raises(ValueError, match=r"weight: memory_efficient needs every \|weight\| > eps .* channel 1"):
        fusedrect.bn_prelu(x, None, None, torch.tensor([1.0, float("nan"), 1.0]), None, torch.tensor([0.25]), True,
                           memory_efficient=True)
    with pytest.raises(ValueError, match="the shared slope is 0"):
        fusedrect.bn_prelu(x, None, None, None, None, torch.tensor([0.0]), True, memory_efficient=True)
    with pytest.raises(ValueError, match=r"weight: memory_efficient needs every \|weight\| > eps .* channel 2"):
        fusedrect.bn_prelu(x, None, None, torch.tensor([1.0, 1.0, 0.0]), None, torch.tensor([0.25]), True,
                           memory_efficient=True)
    with pytest.raises(ValueError, match="memory_efficient: ReLU maps every negative input to 0"):
        fusedrect.FusedBNReLU(3, memory_efficient=True)


def test_opcheck_backward_from_output():
    x = torch.randn(3, 4, 5, 5)
    slope = torch.rand(4) + 0.1
    y, _, invstd = torch.ops.fusedrect.bn_act_fwd_train(x, None, None, slope, 1e-5)
    torch.library.opcheck(torch.ops.fusedrect.bn_act_bwd_from_output.default,
                          (torch.randn_like(y), y, invstd, None, None, slope))
