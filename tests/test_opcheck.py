"""torch.library.opcheck on every fusedrect op over a list of sample inputs: schema, fake (meta)
implementation, autograd registration and AOT dispatch; the running-statistics ops bit for bit against the ATen
ops they replace."""
import pytest
import torch

from conftest import make_input, make_params
from fusedrect import reference


def samples():
    for shape, layout in (((3, 4, 5, 5), "nchw"), ((3, 4, 5, 5), "channels_last"), ((6, 3), "nchw"),
                          ((2, 1, 7), "nchw"), ((2, 3, 2, 2, 2), "channels_last")):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for activation in ("relu", "prelu", "prelu_shared"):
                for affine in (True, False):
                    x = make_input(shape, layout, dtype)
                    params = [p.to(x.dtype) if p is not None else None
                              for p in make_params(shape[1], activation, affine=affine)]
                    yield pytest.param(x, params, id=f"{shape}-{layout}-{dtype}-{activation}-{affine}")


@pytest.mark.parametrize("x, params", list(samples()))
def test_opcheck(x, params):
    requires_grad = x.dtype != torch.bfloat16
    x = x.requires_grad_(requires_grad)
    params = [p.requires_grad_(requires_grad) if p is not None else None for p in params]
    torch.library.opcheck(torch.ops.fusedrect.bn_act_fwd_train.default, (x, *params, 1e-5))

    mean, invstd = reference.batch_stats(x.detach(), 1e-5)
    torch.library.opcheck(torch.ops.fusedrect.bn_act_fwd_eval.default, (x, mean, invstd, *params))
    running_var = invstd.pow(-2) - 1e-5
    torch.library.opcheck(torch.ops.fusedrect.bn_act_fwd_eval_running.default, (x, mean, running_var, 1e-5, *params))

    grad_out = torch.randn_like(x)
    detached = [p.detach() if p is not None else None for p in params]
    for batch_stats in (True, False):
        torch.library.opcheck(
            torch.ops.fusedrect.bn_act_bwd.default, (grad_out, x.detach(), mean, invstd, *detached, batch_stats)
        )


@pytest.mark.parametrize("x, params", list(samples()))
def test_opcheck_sync_bn_halves(x, params):
    """The ops of SyncBN have no autograd of their own: checked without gradients."""
    torch.library.opcheck(torch.ops.fusedrect.bn_stats.default, (x,))
    mean, invstd = reference.batch_stats(x, 1e-5)
    grad_out = torch.randn_like(x)
    sum_dz, sum_dz_xhat, _ = torch.ops.fusedrect.bn_act_bwd_reduce(grad_out, x, mean, invstd, *params)
    torch.library.opcheck(torch.ops.fusedrect.bn_act_bwd_reduce.default, (grad_out, x, mean, invstd, *params))
    count = 2 * (x.numel() // x.shape[1])
    torch.library.opcheck(torch.ops.fusedrect.bn_act_bwd_elemt.default,
                          (grad_out, x, mean, invstd, *params, sum_dz, sum_dz_xhat, count))


def running_stats_samples():
    for buffers in ("both", "mean", "var"):
        for buffer_dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            for stats_dtype in (torch.float32, torch.float64):
                for momentum in (0.1, 0.7, "tensor"):
                    for C in (5, 67):
                        yield pytest.param(buffers, buffer_dtype, stats_dtype, momentum, C,
                                           id=f"{buffers}-{buffer_dtype}-{stats_dtype}-{momentum}-{C}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
@pytest.mark.parametrize("buffers, buffer_dtype, stats_dtype, momentum, C", list(running_stats_samples()))
def test_update_running_stats(buffers, buffer_dtype, stats_dtype, momentum, C, device):
    """The running-statistics op mutates exactly its buffers, bit for bit as reference.update_running_stats
    does (on CPU one loop over the channels, its lerp written as ATen's vectorised kernel computes it; on CUDA
    one kernel with ATen's lerp), and bumps their version counters as lerp_ does."""
    count, eps = 12, 1e-5
    mean = torch.randn(C, dtype=stats_dtype, device=device)
    invstd = torch.rand(C, dtype=stats_dtype, device=device) + 0.5
    factor = torch.tensor(1 / 3, device=device) if momentum == "tensor" else momentum

    def fresh():
        return (torch.randn(C, dtype=buffer_dtype, device=device) if buffers != "var" else None,
                torch.rand(C, dtype=buffer_dtype, device=device) + 1 if buffers != "mean" else None)

    torch.manual_seed(0)
    ours = fresh()
    torch.manual_seed(0)
    expected = fresh()
    op = torch.ops.fusedrect.bn_update_running_stats
    op(*ours, mean, invstd, eps, count, 0.0 if momentum == "tensor" else momentum,
       factor if momentum == "tensor" else None)
    reference.update_running_stats(*expected, mean, invstd, eps, count, factor)
    for a, b in zip(ours, expected):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            assert a._version == b._version == 1
    torch.manual_seed(0)
    torch.library.opcheck(op.default, (*fresh(), mean, invstd, eps, count, 0.1, None))
    torch.library.opcheck(op.default, (*fresh(), mean, invstd, eps, count, 0.0, torch.tensor(0.5, device=device)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("var_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_invstd_is_the_aten_ops_bit_for_bit(var_dtype, stats_dtype, device):
    """bn_invstd: (var.to(dtype) + eps).rsqrt_() in one op, the same bits on every device (on CUDA 1 / sqrt,
    each step correctly rounded, as on the CPU), for variances of every size, 0, inf and NaN, strided too."""
    var = (torch.rand(67, dtype=torch.float64) * 10.0 ** torch.randint(-9, 5, (67,))).to(var_dtype)
    var[:3] = torch.tensor([0.0, float("inf"), float("nan")])
    var = var.to(device)
    for v in (var, var[::2]):
        for eps in (1e-5, 0.1, 0.0):
            got = torch.ops.fusedrect.bn_invstd(v, eps, stats_dtype)
            want = (v.cpu().to(stats_dtype) + eps).rsqrt_()
            assert got.dtype == stats_dtype and got.device == v.device
            torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)
        torch.library.opcheck(torch.ops.fusedrect.bn_invstd.default, (v[3:], 1e-5, stats_dtype))  # NaN != NaN there


@pytest.mark.parametrize("running_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_eval_from_running_statistics_is_its_two_ops(dtype, running_dtype):
    """bn_act_fwd_eval_running: bn_act_fwd_eval with the running mean (in the statistics dtype) and
    bn_invstd(running_var), bit for bit."""
    x = make_input((3, 5, 4, 4), "channels_last", dtype)
    weight, bias, slope = (p.to(dtype) for p in make_params(5, "prelu"))
    running_mean, running_var = torch.randn(5).to(running_dtype), (torch.rand(5) + 0.1).to(running_dtype)
    stats = reference.stats_dtype(x)
    invstd = torch.ops.fusedrect.bn_invstd(running_var, 1e-3, stats)
    want = torch.ops.fusedrect.bn_act_fwd_eval(x, running_mean.to(stats), invstd, weight, bias, slope)
    got = torch.ops.fusedrect.bn_act_fwd_eval_running(x, running_mean, running_var, 1e-3, weight, bias, slope)
    assert got.stride() == x.stride() and torch.equal(got, want)


def test_invstd_rejects_what_the_statistics_cannot_be():
    with pytest.raises(ValueError, match="dtype: expected float32 or float64, got Half"):
        torch.ops.fusedrect.bn_invstd(torch.ones(3), 1e-5, torch.float16)
    with pytest.raises(TypeError, match="var: expected a floating-point tensor, got Long"):
        torch.ops.fusedrect.bn_invstd(torch.ones(3, dtype=torch.long), 1e-5, torch.float32)


def test_running_statistics_ops_name_the_argument_of_the_wrong_size():
    """Where lerp_ would broadcast a single value over every channel, or ATen would name no argument."""
    update = torch.ops.fusedrect.bn_update_running_stats
    mean, invstd = torch.randn(4), torch.rand(4) + 0.5
    with pytest.raises(ValueError, match="invstd: expected 4 values"):
        update(torch.zeros(4), torch.ones(4), mean, invstd[:1], 1e-5, 8, 0.1, None)
    with pytest.raises(ValueError, match="running_var: expected 4 values"):
        update(torch.zeros(4), torch.ones(3), mean, invstd, 1e-5, 8, 0.1, None)
    with pytest.raises(ValueError, match="momentum_tensor: expected one value"):
        update(torch.zeros(4), torch.ones(4), mean, invstd, 1e-5, 8, 0.0, torch.ones(2))
    x = torch.randn(2, 4, 3, 3)
    for bad, name in (((torch.zeros(3), torch.ones(4)), "running_mean"), ((torch.zeros(4), torch.ones(4, 1)),
                                                                           "running_var")):
        with pytest.raises(ValueError, match=rf"{name}: expected shape \(4,\)"):
            torch.ops.fusedrect.bn_act_fwd_eval_running(x, *bad, 1e-5, None, None, None)


def test_update_running_stats_with_overlapping_arguments_as_the_reference():
    """Buffers that overlap the statistics (here running_var and invstd, one element apart) take the
    composite's path, which reads every statistic before it writes."""
    buffer = torch.rand(6) + 0.5
    ours, expected = buffer.clone(), buffer.clone()
    mean = torch.randn(5)
    torch.ops.fusedrect.bn_update_running_stats(None, ours[1:], mean, ours[:-1], 1e-5, 12, 0.1, None)
    reference.update_running_stats(None, expected[1:], mean, expected[:-1], 1e-5, 12, 0.1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_update_running_stats_empty_batch_changes_nothing():
    running_mean, running_var = torch.randn(3), torch.rand(3) + 1
    before = (running_mean.clone(), running_var.clone())
    torch.ops.fusedrect.bn_update_running_stats(running_mean, running_var, torch.randn(3), torch.rand(3), 1e-5, 0,
                                                0.1, None)
    torch.testing.assert_close((running_mean, running_var), before, rtol=0, atol=0)
