"""The fused BatchNorm + ReLU/PReLU ops (``torch.ops.fusedrect.bn_act_*``, schemas in csrc/fusedrect.cpp):
their fake implementations and autograd, and the per-call entry points that run the resolved backend.

The ops are free of side effects: training forward returns ``(y, mean, invstd)`` and the caller updates
running statistics. Backward recomputes the activation from ``x``; only ``x``, the parameters and the
per-channel statistics are saved.
"""
import torch

from fusedrect import reference
from fusedrect.ops import _backend


def native_layout(x):
    """``x`` itself when the kernels walk its memory directly (contiguous, or a channels-last (N*S, C)
    matrix of any rank); otherwise a contiguous copy."""
    if x.is_contiguous() or x.movedim(1, -1).is_contiguous():
        return x
    return x.contiguous()


def _like(grad, x):
    """``grad`` in ``x``'s memory layout (gradients arrive expanded, or in another layout)."""
    if grad.stride() == x.stride():
        return grad
    return torch.empty_like(x).copy_(grad)


def _param_grad(grad, param, needed):
    """A per-channel gradient (fp32/fp64) in the dtype of its parameter, or None."""
    if not needed or param is None:
        return None
    if grad.numel() != param.numel():  # a channel-shared PReLU slope: sum the per-channel gradients
        grad = grad.sum().reshape(param.shape)
    return grad.to(param.dtype)


def _backward(ctx, grad_y, x, mean, invstd, weight, bias, slope, batch_stats, param_offset):
    dx, dweight, dbias, dslope = torch.ops.fusedrect.bn_act_bwd(
        _like(grad_y, x), x, mean, invstd, weight, bias, slope, batch_stats
    )
    needs = ctx.needs_input_grad
    return (
        dx if needs[0] else None,
        _param_grad(dweight, weight, needs[param_offset]),
        _param_grad(dbias, bias, needs[param_offset + 1]),
        _param_grad(dslope, slope, needs[param_offset + 2]),
    )


def _stats_like(x):
    return x.new_empty((x.shape[1],), dtype=reference.stats_dtype(x))


if _backend.compiled():

    @torch.library.register_fake("fusedrect::bn_act_fwd_train")
    def _fwd_train_fake(input, weight, bias, slope, eps):
        return torch.empty_like(input), _stats_like(input), _stats_like(input)

    @torch.library.register_fake("fusedrect::bn_act_fwd_eval")
    def _fwd_eval_fake(input, mean, invstd, weight, bias, slope):
        return torch.empty_like(input)

    @torch.library.register_fake("fusedrect::bn_act_bwd")
    def _bwd_fake(grad_out, input, mean, invstd, weight, bias, slope, batch_stats):
        slope_grad = _stats_like(input) if slope is not None else input.new_empty((0,), dtype=mean.dtype)
        return torch.empty_like(input), _stats_like(input), _stats_like(input), slope_grad

    def _fwd_train_setup(ctx, inputs, output):
        x, weight, bias, slope, _eps = inputs
        _y, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        ctx.save_for_backward(x, mean, invstd, weight, bias, slope)

    def _fwd_train_backward(ctx, grad_y, _grad_mean, _grad_invstd):
        x, mean, invstd, weight, bias, slope = ctx.saved_tensors
        dx, dweight, dbias, dslope = _backward(ctx, grad_y, x, mean, invstd, weight, bias, slope, True, 1)
        return dx, dweight, dbias, dslope, None

    def _fwd_eval_setup(ctx, inputs, output):
        x, mean, invstd, weight, bias, slope = inputs
        ctx.save_for_backward(x, mean, invstd, weight, bias, slope)

    def _fwd_eval_backward(ctx, grad_y):
        x, mean, invstd, weight, bias, slope = ctx.saved_tensors
        dx, dweight, dbias, dslope = _backward(ctx, grad_y, x, mean, invstd, weight, bias, slope, False, 3)
        return dx, None, None, dweight, dbias, dslope

    torch.library.register_autograd(
        "fusedrect::bn_act_fwd_train", _fwd_train_backward, setup_context=_fwd_train_setup
    )
    torch.library.register_autograd("fusedrect::bn_act_fwd_eval", _fwd_eval_backward, setup_context=_fwd_eval_setup)


def bn_act_train(x, weight, bias, slope, eps, backend):
    """Training forward on the resolved ``backend``: ``(y, mean, invstd)``."""
    if backend == "reference":
        return reference.bn_act_train(x, weight, bias, slope, eps)
    return torch.ops.fusedrect.bn_act_fwd_train(native_layout(x), weight, bias, slope, eps)


def bn_act_eval(x, mean, invstd, weight, bias, slope, backend):
    """Forward with given per-channel statistics on the resolved ``backend``: ``y``."""
    if backend == "reference":
        return reference.bn_act_eval(x, mean, invstd, weight, bias, slope)
    return torch.ops.fusedrect.bn_act_fwd_eval(native_layout(x), mean, invstd, weight, bias, slope)
