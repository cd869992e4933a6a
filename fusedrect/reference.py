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


def _reduce_dims(x):
    return [0, *range(2, x.dim())]


def bn_stats(x):
    """Per-channel mean and biased variance over every dim but 1 (mean 0, var 0 for an empty batch)."""
    xs = x.to(stats_dtype(x))
    if xs.numel() == 0:
        zeros = xs.new_zeros(x.shape[1])
        return zeros, zeros.clone()
    return xs.mean(_reduce_dims(x)), xs.var(_reduce_dims(x), unbiased=False)


def batch_stats(x, eps):
    """Per-channel mean and 1/sqrt(biased var + eps) over every dim but 1 (mean 0, var 0 for an empty batch)."""
    mean, var = bn_stats(x)
    return mean, torch.rsqrt(var + eps)


def bn_act_train(x, weight=None, bias=None, slope=None, eps=1e-5):
    """Training forward: (y, mean, invstd), with gradients flowing through the batch statistics."""
    mean, invstd = batch_stats(x, eps)
    y = bn_act_eval(x, mean, invstd, weight, bias, slope)
    return y, mean.detach(), invstd.detach()


def _backward_terms(grad_out, x, mean, invstd, weight, bias, slope):
    """(xhat, z, dz) in the statistics dtype: z = xhat * weight + bias, dz = dy * (z > 0 ? 1 : a)."""
    dtype = stats_dtype(x)
    xhat = (x.to(dtype) - _per_channel(mean.to(dtype), x)) * _per_channel(invstd.to(dtype), x)
    z = xhat
    if weight is not None:
        z = z * _per_channel(weight.to(dtype), x)
    if bias is not None:
        z = z + _per_channel(bias.to(dtype), x)
    dy = grad_out.to(dtype)
    if slope is None:
        dz = torch.where(z <= 0, 0.0, dy)
    else:
        dz = torch.where(z > 0, dy, _per_channel(slope.to(dtype).expand(x.shape[1]), x) * dy)
    return xhat, z, dz


def bn_act_bwd_reduce(grad_out, x, mean, invstd, weight=None, bias=None, slope=None):
    """The per-channel sums of the backward: (sum dz, sum dz * xhat, sum dy * min(z, 0)), the last per channel
    (shape (C,); (0,) for ReLU)."""
    xhat, z, dz = _backward_terms(grad_out, x, mean, invstd, weight, bias, slope)
    dims = _reduce_dims(x)
    grad_slope = (grad_out.to(z.dtype) * z.clamp(max=0)).sum(dims) if slope is not None else z.new_zeros(0)
    return dz.sum(dims), (dz * xhat).sum(dims), grad_slope


def bn_act_bwd_elemt(grad_out, x, mean, invstd, weight, bias, slope, sum_dz, sum_dz_xhat, count):
    """dx = weight * invstd * (dz - sum_dz / count - xhat * sum_dz_xhat / count): the input gradient with the
    per-channel sums and element count of the whole batch given (over every rank, for SyncBN)."""
    xhat, _z, dz = _backward_terms(grad_out, x, mean, invstd, weight, bias, slope)
    dtype = xhat.dtype
    scale = invstd.to(dtype) if weight is None else invstd.to(dtype) * weight.to(dtype)
    dx = _per_channel(scale, x) * (dz - _per_channel(sum_dz.to(dtype) / count, x)
                                   - xhat * _per_channel(sum_dz_xhat.to(dtype) / count, x))
    return dx.to(x.dtype)


def update_running_stats(running_mean, running_var, mean, invstd, eps, count, momentum):
    """nn.BatchNorm's running-statistics update after a training forward over ``count`` elements per channel:
    running += momentum * (batch - running), with batch = ``mean`` and the unbiased variance
    count / (count - 1) * (1 / invstd^2 - eps). ``momentum``: a number or a one-element tensor; either buffer
    may be None; an empty batch (count 0) changes nothing."""
    if count == 0:
        return
    with torch.no_grad():
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), _weight(momentum, running_mean))
        if running_var is not None:
            var = invstd.pow(-2).sub_(eps).clamp_min_(0).mul_(count / (count - 1))
            running_var.lerp_(var.to(running_var.dtype), _weight(momentum, running_var))


def _weight(momentum, like):
    return momentum.to(like.dtype).reshape(()) if isinstance(momentum, torch.Tensor) else momentum
