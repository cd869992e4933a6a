"""The compiled ops against the float64 reference: forward, eval forward and backward, on awkward shapes
(C = 1, 3, 33, 1000, 1100; 1x1 spatial; several tiles per channel), both layouts, fp32 and fp64, and low precision
judged by err(ours) <= 2 * err(PyTorch's own low-precision result) + atol."""
import pytest
import torch
import torch.nn.functional as F

from conftest import ACTIVATIONS, LAYOUTS, make_input, make_params
from fusedrect import reference

AWKWARD_SHAPES = [
    (4, 1, 5, 5),
    (3, 3, 7, 7),
    (2, 33, 9, 9),
    (2, 1000, 2, 2),
    (17, 33, 1, 1),
    (64, 3),
    (2, 3, 96, 96),  # several NCHW tiles per channel
    (8, 400, 7, 7),  # NCHW tiles of several samples and part of the channels, partial at both ends
    (8, 5, 40, 40),  # several channels-last row tiles
    (1, 300, 8, 8),  # channels-last: 64 rows in two tiles of 32 (at most 54), wide rows ending in a partial vector
    (3, 1100, 5, 3),  # several channels-last channel blocks, 45 rows
    (9, 5, 1, 3),  # NCHW runs shorter than a vector: each sample's channels one segment, over spread parameters
    (9, 5, 2, 3),  # the same in fp32 (fp64 on AVX2: runs of a vector and a partial one)
    (4, 115, 5, 3),  # channels-last rows of whole vectors and a partial one, the whole vectors left after the
                     # blocks walked as one block: AVX-512 fp32 7 (reductions: 3 left, statistics: 7), AVX-512 fp64
                     # 14 (2 and 6), AVX2 fp32 14 (2 and 2), AVX2 fp64 28 (none left)
]
TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}


def run_fused(x, weight, bias, slope, grad_out, training):
    """Forward and backward through the compiled ops: (y, dx, dweight, dbias, dslope)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, slope)]
    xg, wg, bg, sg = leaves
    if training:
        y, _, _ = torch.ops.fusedrect.bn_act_fwd_train(xg, wg, bg, sg, 1e-5)
    else:
        mean, invstd = reference.batch_stats(x.detach().double() * 0.5 + 0.3, 1e-5)
        y = torch.ops.fusedrect.bn_act_fwd_eval(xg, mean.to(reference.stats_dtype(x)),
                                                invstd.to(reference.stats_dtype(x)), wg, bg, sg)
    y.backward(grad_out)
    return (y, *(t.grad for t in leaves))


def run_reference(x, weight, bias, slope, grad_out, training):
    """The same in float64 through the reference."""
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias, slope)]
    xg, wg, bg, sg = leaves
    if training:
        y, _, _ = reference.bn_act_train(xg, wg, bg, sg, 1e-5)
    else:
        mean, invstd = reference.batch_stats(x.detach().double() * 0.5 + 0.3, 1e-5)
        y = reference.bn_act_eval(xg, mean, invstd, wg, bg, sg)
    y.backward(grad_out.double())
    return (y, *(t.grad for t in leaves))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", AWKWARD_SHAPES, ids=str)
def test_prelu_matches_reference(shape, layout, dtype, training):
    x = make_input(shape, layout, dtype, scale=3.0, shift=2.0)
    weight, bias, slope = (t.to(dtype) for t in make_params(shape[1], "prelu"))
    grad_out = torch.randn_like(x)
    ours = run_fused(x, weight, bias, slope, grad_out, training)
    expected = run_reference(x, weight, bias, slope, grad_out, training)
    assert ours[0].stride() == x.stride(), "the output keeps the input's memory layout"
    atol, rtol = TOLERANCE[dtype]
    for name, got, want in zip(("y", "dx", "dweight", "dbias", "dslope"), ours, expected):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, atol=atol * scale, rtol=rtol, msg=name)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_activations_match_reference(activation, layout):
    x = make_input((4, 6, 5, 5), layout, torch.float32)
    weight, bias, slope = (t.float() if t is not None else None for t in make_params(6, activation))
    y, mean, invstd = torch.ops.fusedrect.bn_act_fwd_train(x, weight, bias, slope, 1e-5)
    y_ref, mean_ref, invstd_ref = reference.bn_act_train(x.double(), weight.double(), bias.double(),
                                                         slope.double() if slope is not None else None)
    assert mean.dtype == invstd.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean.double(), mean_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(invstd.double(), invstd_ref, atol=1e-6, rtol=1e-5)
    grads = torch.ops.fusedrect.bn_act_bwd(torch.ones_like(x), x, mean, invstd, weight, bias, slope, True)
    assert grads[3].shape == ((0,) if slope is None else (6,))


def low_precision_error(got, want):
    return (got.double() - want).abs().max().item()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(4, 3, 7, 7), (2, 33, 9, 9), (8, 5, 40, 40)], ids=str)
def test_low_precision_error_bound(shape, layout, dtype, training):
    """Ours in bf16/fp16 against PyTorch's own batch_norm + prelu in the same dtype (fp32 parameters)."""
    x = make_input(shape, layout, dtype, scale=2.0, shift=1.0)
    weight, bias, slope = (t.float() for t in make_params(shape[1], "prelu"))
    grad_out = torch.randn_like(x)
    ours = run_fused(x, weight, bias, slope, grad_out, training)
    expected = run_reference(x, weight, bias, slope, grad_out, training)

    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, slope)]
    if training:
        z = F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True, 0.1, 1e-5)
    else:
        mean, invstd = reference.batch_stats(x.detach().double() * 0.5 + 0.3, 1e-5)
        var = invstd.pow(-2) - 1e-5
        z = F.batch_norm(leaves[0], mean.float(), var.float(), leaves[1], leaves[2], False, 0.1, 1e-5)
    y_torch = F.prelu(z, leaves[3].to(dtype))
    y_torch.backward(grad_out)
    torch_results = (y_torch, *(t.grad for t in leaves))

    for name, got, want, theirs in zip(("y", "dx", "dweight", "dbias", "dslope"), ours, expected, torch_results):
        atol = 1e-3 * max(1.0, want.abs().max().item())
        assert low_precision_error(got, want) <= 2 * low_precision_error(theirs, want) + atol, name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "shape, chunks",
    # runs and wide channels-last rows that are not whole vectors (streamed and cached stores share lines, the runs'
    # last vectors overlap), short channels-last rows (60 channels) and NCHW runs shorter than a vector
    [((4, 105, 100, 103), 4), ((8, 60, 100, 200), 8), ((16384, 66, 2, 2), 16)],
    ids=str,
)
def test_outputs_written_past_the_caches(shape, chunks, layout, dtype):
    """An elementwise pass of more than 32 MiB in all (kStreamingBytes; fp32's eval at 4x105x100x103: 34.6 MB)
    writes its output's aligned whole vectors past the caches, where the capability can: the eval forward and the
    backward's elementwise half give, chunk of samples by chunk, bit for bit what they give on that chunk alone
    (passes of at most 29 MB: cached stores), and the eval forward the reference's values."""
    x = make_input(shape, layout, dtype, scale=3.0, shift=2.0)
    grad_out = make_input(shape, layout, dtype)
    weight, bias, slope = (t.to(dtype) for t in make_params(shape[1], "prelu"))
    stats = reference.stats_dtype(x)
    mean, invstd = (t.to(stats) for t in reference.batch_stats(x.double() * 0.5 + 0.3, 1e-5))
    sum_dz, sum_dz_xhat = torch.randn(2, shape[1], dtype=stats)
    count = x.numel() // shape[1]
    ops = torch.ops.fusedrect
    y = ops.bn_act_fwd_eval(x, mean, invstd, weight, bias, slope)
    dx = ops.bn_act_bwd_elemt(grad_out, x, mean, invstd, weight, bias, slope, sum_dz, sum_dz_xhat, count)
    for xs, gs, ys, dxs in zip(*(t.chunk(chunks) for t in (x, grad_out, y, dx))):
        assert torch.equal(ops.bn_act_fwd_eval(xs, mean, invstd, weight, bias, slope), ys)
        assert torch.equal(ops.bn_act_bwd_elemt(gs, xs, mean, invstd, weight, bias, slope, sum_dz, sum_dz_xhat, count),
                           dxs)
    expected = reference.bn_act_eval(x.double(), mean.double(), invstd.double(), weight.double(), bias.double(),
                                     slope.double())
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(y.double(), expected, atol=atol * expected.abs().max().item(), rtol=rtol)
