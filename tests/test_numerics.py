"""Numerical robustness and reproducibility: variance with a large mean, NaN/Inf propagation as PyTorch,
bitwise identical results run to run, across thread counts, and between the fused CPU ops and their SyncBN halves."""
import pytest
import torch
import torch.nn.functional as F

import fusedrect
from conftest import (ACTIVATIONS, LAYOUTS, RANGE_SHAPES, check_frozen_backward_of_non_finite_input,
                      check_statistics_beyond_range, fused_call, fused_forward_backward, make_input, make_params)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "shape",
    # NCHW tiles of long runs, of short runs over many samples (per-position sums combined per channel), and
    # (9, 64, 10, 16)'s two rows of the statistics' tiles, of 4 samples (walked run by run) and of 5 (by position)
    [(8, 4, 32, 32), (4096, 3), (2, 2, 200, 200), (9, 64, 10, 16), (7, 64, 7, 7), (64, 8, 3, 3)],
    ids=str,
)
def test_variance_with_large_mean(shape, layout):
    """x = 1000 + randn in fp32: a naive sum(x^2) - sum(x)^2 loses every digit; we keep 1e-4."""
    x = make_input(shape, layout, torch.float32, shift=1000.0)
    running_var = torch.zeros(shape[1])
    fusedrect.bn_relu(x, torch.zeros(shape[1]), running_var, training=True, momentum=1.0, backend="cpp")
    dims = [0, *range(2, x.dim())]
    expected = x.double().var(dims, unbiased=True)
    torch.testing.assert_close(running_var.double(), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("activation", ["relu", "prelu"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_follows_the_sign_of_the_output(layout, activation, training):
    """Backward recomputes z bit for bit as the forward computed it: where z is within a few ulps of 0, dx and
    dbeta follow the sign of y. Each channel holds 401 consecutive floats around a point at which its bias puts
    z = 0 (and random values); a mask differing from the forward's in one element would move its dx by
    (1 - a) * A and dbeta by 1 - a. 84 channels: channels-last rows of more than 64 channels walk their own path,
    and a row's last vector overlaps the one before it (84 is no multiple of the vector width)."""
    N, C, H, W = 4, 84, 16, 16
    M = N * H * W
    values = torch.randn(C, M, dtype=torch.float64).float()
    points = 0.5 + 0.1 * torch.arange(C, dtype=torch.float32)
    steps = torch.arange(-200, 201, dtype=torch.int32)
    values[:, : steps.numel()] = (points.view(torch.int32)[:, None] + steps).view(torch.float32)
    x = values.reshape(C, N, H, W).transpose(0, 1)
    x = x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    grad = torch.randn(C, M, dtype=torch.float64).float()
    grad[:, : steps.numel()] = 1.0
    grad = grad.reshape(C, N, H, W).transpose(0, 1).contiguous()
    if training:
        var, mean = torch.var_mean(values.double(), 1, unbiased=False)
        running = (None, None)
    else:
        mean, var = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
        running = (mean.float(), var.float())
    invstd = (var + 1e-5).rsqrt()
    weight = torch.rand(C, dtype=torch.float64) + 0.5
    bias = -(points.double() - mean) * weight * invstd
    slope = torch.rand(C, dtype=torch.float64) * 0.5 if activation == "prelu" else None
    params = [t.float() if t is not None else None for t in (weight, bias, slope)]
    y, dx, _, dbeta, *_ = fused_forward_backward(x, params, grad, training, "cpp", running)

    def channel_rows(t):  # (C, M), each channel's elements in the order of `values`
        return t.transpose(0, 1).reshape(C, M).double()

    positive = channel_rows(y) > 0
    assert positive[:, : steps.numel()].any(1).all() and (~positive[:, : steps.numel()]).any(1).all()
    a = slope.float().double()[:, None] if slope is not None else 0.0
    dz = channel_rows(grad) * torch.where(positive, 1.0, a)
    xhat = (values.double() - mean[:, None]) * invstd[:, None]
    expected_dx = dz
    if training:
        expected_dx = dz - dz.mean(1, keepdim=True) - xhat * (dz * xhat).mean(1, keepdim=True)
    expected_dx = expected_dx * (weight * invstd)[:, None]
    torch.testing.assert_close(channel_rows(dx), expected_dx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dbeta.double(), dz.sum(1), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_variance_with_outlier_samples(layout):
    """Every sixth sample 1000x the others, the first one too: NCHW 2x2 runs sum each position's 256 samples of a
    tile (channels-last: each channel's 1024 rows) shifted by one of them, in groups small enough that an outlier
    as the shift costs a few bits (2 ulps of the variance in NCHW, 4 in channels-last; in one group of 256, 115
    ulps)."""
    x = make_input((256, 16, 2, 2), layout)
    x[::6] *= 1000
    mean, var = torch.ops.fusedrect.bn_stats(x)
    var_ref, mean_ref = torch.var_mean(x.double(), [0, 2, 3], unbiased=False)
    torch.testing.assert_close(var.double(), var_ref, rtol=2e-6, atol=0)
    assert ((mean.double() - mean_ref).abs() / var_ref.sqrt()).max() < 1e-6


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_finite_shift_of_a_later_group(layout):
    """Running statistics as PyTorch's where the first value of a later group of samples is infinite (an infinite
    mean), another group holds a NaN, and the first value of all is -inf: NCHW 2x2 runs of 32 samples in groups
    [0, 16) and [16, 32), channels-last 128 rows in groups of 16: sample 16's first row is a group's first value in
    both layouts, sample 8 in another group."""
    x = make_input((32, 4, 2, 2), layout)
    x[16, 0, 0, 0] = float("inf")
    x[8, 1, 0, 0] = float("nan")
    x[0, 2, 0, 0] = float("-inf")
    ours, theirs = (torch.zeros(4), torch.ones(4)), (torch.zeros(4), torch.ones(4))
    fused_call(x, *ours, None, None, None, True, "cpp")
    F.batch_norm(x, *theirs, training=True)
    for got, expected in zip(ours, theirs):
        torch.testing.assert_close(got, expected, equal_nan=True)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
# NCHW statistics run by run, by position, and in tiles whose partials are merged after the infinite one's
@pytest.mark.parametrize("shape", [(3, 4, 5, 5), (8, 4, 5, 5), (4, 4, 64, 64)], ids=str)
def test_nan_and_inf_propagate_as_pytorch(shape, layout, activation):
    """Outputs and updated running statistics as PyTorch's: channel 0 has an infinity in the first sample (an
    infinite mean, as PyTorch's), channels 1-3 a NaN, an infinity and a negative infinity."""
    x = make_input(shape, layout)
    x[0, 0, 1, 1] = float("inf")
    x[0, 1, 2, 2] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    x[2, 3, 4, 4] = float("-inf")
    weight, bias, slope = (t.float() if t is not None else None for t in make_params(4, activation))
    for training in (True, False):
        stats = {who: (torch.zeros(4), torch.ones(4)) for who in ("ours", "theirs")}
        ours = fused_call(x, *stats["ours"], weight, bias, slope, training, "cpp")
        z = F.batch_norm(x, *stats["theirs"], weight, bias, training)
        theirs = F.relu(z) if slope is None else F.prelu(z, slope)
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        for got, expected in zip(stats["ours"], stats["theirs"]):
            torch.testing.assert_close(got, expected, equal_nan=True)


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_backward_with_nan_and_inf_as_pytorch(layout, activation, frozen):
    """With given statistics, dx = weight * invstd * dz: a non-finite x leaves its neighbours' gradients finite,
    and its own as PyTorch's (both the full backward and the frozen one, which skips the parameters' sums)."""
    x = make_input((3, 4, 5, 5), layout)
    x[0, 1, 2, 2] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    x[2, 3, 4, 4] = float("-inf")
    grad = make_input((3, 4, 5, 5), layout)
    running_mean, running_var = torch.randn(4), torch.rand(4) + 0.5
    values = make_params(4, activation)
    grads = []
    for ours in (True, False):
        params = [t.float().requires_grad_(not frozen) if t is not None else None for t in values]
        weight, bias, slope = params
        leaf = x.clone().requires_grad_()
        if ours:
            y = fused_call(leaf, running_mean, running_var, weight, bias, slope, False, "cpp")
        else:
            z = F.batch_norm(leaf, running_mean, running_var, weight, bias, False)
            y = F.relu(z) if slope is None else F.prelu(z, slope)
        inputs = [leaf] + [t for t in params if t is not None and t.requires_grad]
        grads.append(torch.autograd.grad(y, inputs, grad))
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, equal_nan=True)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_frozen_backward_of_non_finite_input(layout, activation):
    check_frozen_backward_of_non_finite_input(torch.ops.fusedrect, layout, activation)


def run_training_step(x, params, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
    y = fusedrect.bn_prelu(leaves[0], None, None, *leaves[1:], training=True, backend="cpp")
    y.backward(grad_out)
    return [y.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
# NCHW: long runs, short runs, and passes of more than 32 MiB, which run slab by slab with one or two threads and
# over the whole input with three (20 channel blocks, fewer than 8 a thread: two_pass_plan in tiling.h)
@pytest.mark.parametrize("shape", [(16, 24, 30, 30), (32, 40, 7, 7), (4, 20, 330, 330)], ids=str)
def test_bitwise_deterministic(shape, layout, dtype):
    x = make_input(shape, layout, dtype, scale=3.0, shift=1.0)
    params = [t.float() for t in make_params(shape[1], "prelu")]
    grad_out = torch.randn(shape).to(dtype)
    first = run_training_step(x, params, grad_out)
    threads = torch.get_num_threads()
    try:
        for n in (threads, 1, 3, threads):  # 3: another split of the tiles, even on a 2-core machine
            torch.set_num_threads(n)
            for a, b in zip(first, run_training_step(x, params, grad_out)):
                assert torch.equal(a, b), f"differs with {n} threads"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "shape",
    # NCHW tiles of part of a plane, of whole planes of several samples, of several samples' runs of part of the
    # channels, channels-last with a partial vector of channels, one row per sample (S = 1), a single sample, and
    # more than one tile row per channel in either layout, and NCHW passes of more than 32 MiB (the fused ops slab
    # by slab, their halves over the whole input)
    [(16, 24, 30, 30), (64, 8, 7, 7), (20, 400, 7, 7), (8, 40, 9, 11), (4096, 3), (4, 3, 300, 300),
     (1, 20, 256, 256), (4, 20, 330, 330)],
    ids=str,
)
def test_fused_ops_equal_their_separate_halves_bitwise(shape, dtype, activation, layout):
    """The training forward (statistics, then y) and backward (sums, then grad_input) each run as one op, and as
    the separate halves SyncBN calls between its all-reduces: the same input must give bit for bit the same
    statistics, output and gradients either way (as torch.equal compares them: where every channel's batch terms B
    and D are zero, the whole backward still adds them and the elementwise half alone does not, so a zero gradient
    may differ in its sign)."""
    x = make_input(shape, layout, dtype, scale=2.0, shift=0.5)
    grad_out = make_input(shape, layout, dtype)
    weight, bias, slope = (None if t is None else t.float() for t in make_params(shape[1], activation))
    ops = torch.ops.fusedrect
    y, mean, invstd = ops.bn_act_fwd_train(x, weight, bias, slope, 1e-5)
    stats_mean, stats_var = ops.bn_stats(x)
    assert torch.equal(mean, stats_mean)
    torch.testing.assert_close(invstd, (stats_var.double() + 1e-5).rsqrt().float(), rtol=1e-6, atol=0)
    assert torch.equal(y, ops.bn_act_fwd_eval(x, mean, invstd, weight, bias, slope))

    grad_input, grad_weight, grad_bias, grad_slope = ops.bn_act_bwd(
        grad_out, x, mean, invstd, weight, bias, slope, True)
    sum_dz, sum_dz_xhat, slope_sum = ops.bn_act_bwd_reduce(grad_out, x, mean, invstd, weight, bias, slope)
    assert torch.equal(grad_bias, sum_dz) and torch.equal(grad_weight, sum_dz_xhat)
    assert torch.equal(grad_slope, slope_sum)
    count = x.numel() // x.shape[1]
    elemt = ops.bn_act_bwd_elemt(grad_out, x, mean, invstd, weight, bias, slope, sum_dz, sum_dz_xhat, count)
    assert torch.equal(grad_input, elemt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", RANGE_SHAPES, ids=str)
def test_statistics_beyond_range(shape, layout, dtype):
    check_statistics_beyond_range(torch.ops.fusedrect, layout, shape, dtype)
