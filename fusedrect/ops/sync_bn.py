"""SyncBN: BatchNorm + ReLU/PReLU whose batch statistics span every rank of a ``torch.distributed`` process group.

The halves of the fused ops (schemas in csrc/fusedrect.cpp) are ops of their own, with fake implementations
here (their CUDA kernel is the router of fusedrect/ops/bn_act.py): ``bn_stats``, ``bn_act_bwd_reduce``,
``bn_act_bwd_elemt``. They have no autograd: the autograd.Function below combines them with the collectives.
Per channel, rank r holding n_r elements:

    forward   (mean_r, var_r) = bn_stats(x_r); all_gather (n_r, mean_r, M2_r = var_r * n_r) in fp64, then, in
              rank order (Chan et al.'s merge of all ranks at once):
                  n = sum n_r,  mean = sum n_r * mean_r / n,  M2 = sum M2_r + sum n_r * (mean_r - mean)^2
              var = M2 / n (normalising; the running variance takes M2 / (n - 1)), invstd = 1 / sqrt(var + eps);
              y_r = bn_act_fwd_eval(x_r, mean, invstd, ...), the same fused pass as eval mode.
    backward  (sum_dz, sum_dz_xhat, da)_r = bn_act_bwd_reduce(dy_r, x_r, ...) are the local parameter gradients
              (dbeta, dgamma, dslope; DDP averages them over ranks); (sum_dz, sum_dz_xhat) are all-reduced in one
              flat tensor and dx_r = bn_act_bwd_elemt(dy_r, x_r, ..., sums, n).
A rank with an empty batch takes part with n_r = 0. The global count n is read back to the host once per forward
(as nn.SyncBatchNorm does), since bn_act_bwd_elemt takes it as an int.
"""
import math

import torch
import torch.distributed as dist

from fusedrect import reference
from fusedrect.ops import _backend
from fusedrect.ops.bn_act import _IMPLS, _like, _needed_grads, _stats_like, _through_dispatcher, native_layout

_OP_NAMES = ("bn_stats", "bn_act_bwd_reduce", "bn_act_bwd_elemt")
_REFERENCE = {"bn_stats": reference.bn_stats, "bn_act_fwd_eval": reference.bn_act_eval,
              "bn_act_bwd_reduce": reference.bn_act_bwd_reduce, "bn_act_bwd_elemt": reference.bn_act_bwd_elemt}


def _no_autograd(ctx, *grads):
    raise NotImplementedError(
        "fusedrect: bn_stats, bn_act_bwd_reduce and bn_act_bwd_elemt have no autograd of their own; "
        "FusedSyncBNPReLU / FusedSyncBNReLU differentiate through them"
    )


if _backend.compiled():

    @torch.library.register_fake("fusedrect::bn_stats")
    def _bn_stats_fake(input):
        return _stats_like(input), _stats_like(input)

    @torch.library.register_fake("fusedrect::bn_act_bwd_reduce")
    def _bwd_reduce_fake(grad_out, input, mean, invstd, weight, bias, slope):
        slope_grad = _stats_like(input) if slope is not None else input.new_empty((0,), dtype=mean.dtype)
        return _stats_like(input), _stats_like(input), slope_grad

    @torch.library.register_fake("fusedrect::bn_act_bwd_elemt")
    def _bwd_elemt_fake(grad_out, input, mean, invstd, weight, bias, slope, sum_dz, sum_dz_xhat, count):
        return torch.empty_like(input)

    for _name in _OP_NAMES:
        torch.library.register_autograd(f"fusedrect::{_name}", _no_autograd)


def _ops_for(backend, x):
    """The four ops SyncBN runs, on ``backend`` for x: the reference, the dispatcher, or the implementation's own
    functions directly (a backend the dispatcher does not pick for x, e.g. Triton interpreted on CPU tensors)."""
    if backend == "reference":
        return _REFERENCE
    if _through_dispatcher(backend, x):
        return {name: getattr(torch.ops.fusedrect, name) for name in _REFERENCE}
    return {name: _IMPLS[backend][name] for name in _REFERENCE}


def world_size(process_group):
    """The number of ranks whose batches a SyncBN layer normalises together: 1 outside torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _global_stats(x, mean, var, eps, process_group, ranks):
    """(mean, invstd, n) of the batches of every rank, from this rank's (mean, var) of x (see the module doc)."""
    channels = x.shape[1]
    count = x.shape[0] * math.prod(x.shape[2:])
    local = torch.cat([torch.full((1,), count, dtype=torch.float64, device=x.device), mean.double(),
                       var.double() * count])
    gathered = [torch.empty_like(local) for _ in range(ranks)]
    dist.all_gather(gathered, local, group=process_group)
    stats = torch.stack(gathered)  # (ranks, 1 + 2C), rank order: the merge below is deterministic
    counts, means, m2s = stats[:, :1], stats[:, 1:channels + 1], stats[:, channels + 1:]
    total = counts.sum()
    n = int(total)
    total = total.clamp_min(1)  # every batch empty: mean 0, var 0 (never used: the output is empty)
    global_mean = (counts * means).sum(0) / total
    global_var = (m2s.sum(0) + (counts * (means - global_mean).square()).sum(0)) / total
    dtype = reference.stats_dtype(x)
    return global_mean.to(dtype), torch.rsqrt(global_var + eps).to(dtype), n


class _SyncApply(torch.autograd.Function):
    """y = act(BN(x)) with the global batch statistics given; backward accounts for their dependence on the
    input of every rank (two sums all-reduced), so mean and invstd get no gradient of their own."""

    @staticmethod
    def forward(x, mean, invstd, weight, bias, slope, count, process_group, ops):
        return ops["bn_act_fwd_eval"](x, mean, invstd, weight, bias, slope)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mean, invstd, weight, bias, slope, count, process_group, ops = inputs
        ctx.save_for_backward(x, mean, invstd, weight, bias, slope)
        ctx.count, ctx.process_group, ctx.ops = count, process_group, ops

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, mean, invstd, weight, bias, slope = ctx.saved_tensors
        grad_y = _like(grad_y, x)
        sum_dz, sum_dz_xhat, grad_slope = ctx.ops["bn_act_bwd_reduce"](grad_y, x, mean, invstd, weight, bias, slope)
        dx = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dz, sum_dz_xhat])
            dist.all_reduce(sums, group=ctx.process_group)
            global_dz, global_dz_xhat = sums.chunk(2)
            dx = ctx.ops["bn_act_bwd_elemt"](grad_y, x, mean, invstd, weight, bias, slope, global_dz, global_dz_xhat,
                                             ctx.count)
        grads = _needed_grads(ctx, (dx, sum_dz_xhat, sum_dz, grad_slope), (weight, bias, slope), 3)
        dx, dweight, dbias, dslope = grads
        return dx, None, None, dweight, dbias, dslope, None, None, None


def sync_bn_act_train(x, weight, bias, slope, eps, process_group, ranks, backend):
    """Training forward over the ``ranks`` ranks of ``process_group`` (every one of them must call it) on the
    resolved ``backend``: ``(y, mean, invstd, n)`` with the global statistics and element count per channel."""
    x = native_layout(x)
    ops = _ops_for(backend, x)
    with torch.no_grad():
        mean, var = ops["bn_stats"](x)
        mean, invstd, count = _global_stats(x, mean, var, eps, process_group, ranks)
    y = _SyncApply.apply(x, mean, invstd, weight, bias, slope, count, process_group, ops)
    return y, mean, invstd, count
