"""The ops behind SyncBN (bn_stats, bn_act_bwd_reduce, bn_act_bwd_elemt): the CPU kernels against the reference,
the two backward halves against bn_act_bwd, empty batches and bad arguments; and the synchronized autograd
(fusedrect/ops/sync_bn.py) on a one-rank gloo group, by gradcheck in fp64. opcheck is in test_opcheck.py, the
Triton launchers are in tests/interpret, several ranks in test_sync_batchnorm.py."""
import pytest
import torch

from conftest import ACTIVATIONS, LAYOUTS, SHAPES, make_input, make_params
from fusedrect import reference
from fusedrect.ops import sync_bn

OPS = torch.ops.fusedrect
HALVES_SHAPES = [(4, 1, 5, 5), (2, 33, 9, 9), (17, 33, 1, 1), (64, 3), (2, 3, 96, 96), (8, 5, 40, 40), (1, 300, 8, 8)]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def op_inputs(shape, layout, activation, dtype):
    """(grad_out, x, mean, invstd, weight, bias, slope) with the statistics of a wider batch (as SyncBN gives)."""
    x = make_input(shape, layout, dtype, scale=3.0, shift=2.0)
    mean, invstd = reference.batch_stats(x.double() * 0.8 + 0.1, 1e-5)
    stats = reference.stats_dtype(x)
    params = [p.to(dtype) if p is not None else None for p in make_params(shape[1], activation)]
    return torch.randn_like(x), x, mean.to(stats), invstd.to(stats), *params


def assert_close(got, want, dtype):
    tol = TOLERANCE[dtype] * max(1.0, want.abs().max().item()) if want.numel() else 0.0
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", HALVES_SHAPES, ids=str)
def test_halves_match_reference(shape, layout, activation, dtype):
    grad_out, x, mean, invstd, weight, bias, slope = args = op_inputs(shape, layout, activation, dtype)
    double = [t.double() if t is not None else None for t in args]
    for got, want in zip(OPS.bn_stats(x), reference.bn_stats(x.double())):
        assert got.dtype == reference.stats_dtype(x)
        assert_close(got, want, dtype)
    sums = OPS.bn_act_bwd_reduce(*args)
    for got, want in zip(sums, reference.bn_act_bwd_reduce(*double)):
        assert got.dtype == reference.stats_dtype(x)
        assert_close(got, want, dtype)
    count = 3 * x.numel() // shape[1]  # this rank holds a third of the batch
    dx = OPS.bn_act_bwd_elemt(*args, sums[0] * 2, sums[1] * 3, count)
    assert dx.dtype == x.dtype and dx.stride() == x.stride()
    assert_close(dx, reference.bn_act_bwd_elemt(*double, sums[0].double() * 2, sums[1].double() * 3, count), dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", sorted(SHAPES))
def test_halves_compose_to_bn_act_bwd(rank, layout, activation):
    """reduce, then elemt over this batch alone, is bn_act_bwd bit for bit (the same code)."""
    args = op_inputs(SHAPES[rank], layout, activation, torch.float32)
    sum_dz, sum_dz_xhat, grad_slope = OPS.bn_act_bwd_reduce(*args)
    dx = OPS.bn_act_bwd_elemt(*args, sum_dz, sum_dz_xhat, args[1].numel() // args[1].shape[1])
    for got, want in zip((dx, sum_dz_xhat, sum_dz, grad_slope), OPS.bn_act_bwd(*args, True)):
        assert torch.equal(got, want)


def test_bn_stats_is_the_training_statistics():
    x = make_input((8, 5, 40, 40), "channels_last", scale=3.0, shift=2.0)
    mean, var = OPS.bn_stats(x)
    _y, train_mean, invstd = OPS.bn_act_fwd_train(x, None, None, None, 1e-5)
    assert torch.equal(mean, train_mean)
    torch.testing.assert_close(torch.rsqrt(var.double() + 1e-5), invstd.double())


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_empty_batch(activation):
    grad_out, x, mean, invstd, weight, bias, slope = args = op_inputs((0, 3, 4, 4), "nchw", activation, torch.float32)
    assert all(torch.equal(t, torch.zeros(3)) for t in OPS.bn_stats(x))
    sum_dz, sum_dz_xhat, grad_slope = OPS.bn_act_bwd_reduce(*args)
    assert torch.equal(sum_dz, torch.zeros(3)) and torch.equal(sum_dz_xhat, torch.zeros(3))
    assert grad_slope.shape == ((0,) if slope is None else (3,))
    assert OPS.bn_act_bwd_elemt(*args, torch.ones(3), torch.ones(3), 0).shape == x.shape


def test_bad_arguments():
    args = op_inputs((2, 3, 4, 4), "nchw", "prelu", torch.float32)
    with pytest.raises(RuntimeError, match="count: expected at least the input's 32"):
        OPS.bn_act_bwd_elemt(*args, torch.zeros(3), torch.zeros(3), 31)
    with pytest.raises(RuntimeError, match=r"sum_dz_xhat: expected shape \(3,\)"):
        OPS.bn_act_bwd_elemt(*args, torch.zeros(3), torch.zeros(4), 64)
    with pytest.raises(RuntimeError, match="grad_out: expected the shape"):
        OPS.bn_act_bwd_reduce(args[0][:1], *args[1:])
    with pytest.raises(NotImplementedError, match="no autograd of their own"):
        OPS.bn_stats(args[1].requires_grad_())[0].sum().backward()


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", [2, 4])
def test_synchronized_gradcheck(one_rank_group, rank, layout, activation, backend):
    shape = SHAPES[rank]
    x = make_input(shape, layout, torch.float64, scale=2.0, shift=0.5).requires_grad_()
    params = [p.requires_grad_() if p is not None else None for p in make_params(shape[1], activation)]

    def fn(x, weight, bias, *slope):
        y, _mean, _invstd, count = sync_bn.sync_bn_act_train(x, weight, bias, slope[0] if slope else None, 1e-5,
                                                             one_rank_group, 1, backend)
        assert count == x.numel() // shape[1]
        return y

    inputs = (x, *(p for p in params if p is not None))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    y, mean, invstd = reference.bn_act_train(x, *params)
    torch.testing.assert_close(fn(*inputs), y)
