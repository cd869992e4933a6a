"""Pure-PyTorch BatchNorm + ReLU/PReLU: the oracle of every test and the fallback backend.

Written for clarity, not speed; float64-capable, differentiable by autograd. Same contract as the ops:
statistics in fp32 (fp64 for fp64 input), biased variance for normalising, ``slope=None`` means ReLU.
"""
import torch
import torch.nn.functional as F


def stats_dtype(x):
    """The dtype of statistics and per-channel reductions for input ``x``."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(t, x):
    """Reshapes a (C,) tensor to broadcast over x's channel dim."""
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def bn_act_eval(x, mean, invstd, weight=None, bias=None, slope=None):
    """y = act((x - mean) * invstd * weight + bias) with the given per-channel statistics."""
    dtype = stats_dtype(x)
    z = (x.to(dtype) - _per_channel(mean.to(dtype), x)) * _per_channel(invstd.to(dtype), x)
    if weight is not None:
        z = z * _per_channel(weight.to(dtype), x)
    if bias is not None:
        z = z + _per_channel(bias.to(dtype), x)
    y = F.relu(z) if slope is None else F.prelu(z, slope.to(dtype))
    return y.to(x.dtype)


def batch_stats(x, eps):
    """Per-channel mean and 1/sqrt(biased var + eps) over every dim but 1 (mean 0, var 0 for an empty batch)."""
    dims = [0, *range(2, x.dim())]
    xs = x.to(stats_dtype(x))
    if xs.numel() == 0:
        zeros = xs.new_zeros(x.shape[1])
        return zeros, torch.rsqrt(zeros + eps)
    return xs.mean(dims), torch.rsqrt(xs.var(dims, unbiased=False) + eps)


def bn_act_train(x, weight=None, bias=None, slope=None, eps=1e-5):
    """Training forward: (y, mean, invstd), with gradients flowing through the batch statistics."""
    mean, invstd = batch_stats(x, eps)
    y = bn_act_eval(x, mean, invstd, weight, bias, slope)
    return y, mean.detach(), invstd.detach()
