"""The fused pre-activation convolution ops ``torch.ops.fusedrect.preact_conv_*`` (schemas in
csrc/fusedrect.cpp): conv2d(act(BN(x))) whose activation is never stored for backward.

Implementations: on CPU the C++ kernels of csrc/cpu/preact_conv.cpp (the scratch path below); on CUDA the
Python implementation registered here (the same code with the Triton launchers runs directly on CPU tensors
under TRITON_INTERPRET=1). Autograd of the forward ops is C++ (csrc/autograd.cpp), that of the direct path the
autograd.Functions below.
    forward   Triton implicit GEMM that applies BN + act in its input loader (CUDA, the cases
              fusedrect.kernels.preact_conv.applies() covers); elsewhere the fused BN + act into a scratch
              tensor, the framework's convolution (oneDNN / cuDNN), the scratch freed at once.
    backward  the activation is recomputed: weight gradient by the Triton implicit GEMM with the same loader,
              else the framework's convolution backward on a recomputed scratch; input gradient by the
              framework's transposed convolution, then the fused BN + act backward.
Saved for backward: x, the per-channel statistics and the parameters; never the activation.
"""
import functools

import torch

from fusedrect import reference
from fusedrect.ops import _backend
from fusedrect.ops.bn_act import _DirectEval as _DirectBNEval, _like, _needed_grads, _ops_for, _stats_like
from fusedrect.ops.bn_act import _through_dispatcher, direct_function, dispatcher_ops, native_layout

aten = torch.ops.aten


def _conv(a, conv_weight, conv_bias, stride, padding, dilation, groups):
    return aten.convolution(a, conv_weight, conv_bias, stride, padding, dilation, False, [0, 0], groups)


class _Impl:
    """The three ops on one set of BatchNorm + act kernels (``bn``: op name -> function), with the Triton
    convolution where ``triton_conv(x)`` and the call is one it covers."""

    def __init__(self, bn, triton_conv):
        self.bn = bn
        self.triton_conv = triton_conv

    def _kernels(self, x, conv_weight, stride, padding, dilation, groups):
        """fusedrect.kernels.preact_conv when its convolution runs this call, else None."""
        if not self.triton_conv(x):
            return None
        from fusedrect.kernels import preact_conv

        return preact_conv if preact_conv.applies(x, conv_weight, stride, padding, dilation, groups) else None

    def fwd_train(self, x, weight, bias, slope, eps, conv_weight, conv_bias, stride, padding, dilation, groups):
        kernels = self._kernels(x, conv_weight, stride, padding, dilation, groups)
        if kernels is not None:
            from fusedrect.kernels.bn_act import batch_stats

            mean, invstd = batch_stats(x, eps)
            out = kernels.conv_fwd(x, mean, invstd, weight, bias, slope, conv_weight, conv_bias, stride, padding)
            return out, mean, invstd
        a, mean, invstd = self.bn["bn_act_fwd_train"](x, weight, bias, slope, eps)
        return _conv(a, conv_weight, conv_bias, stride, padding, dilation, groups), mean, invstd

    def fwd_eval(self, x, mean, invstd, weight, bias, slope, conv_weight, conv_bias, stride, padding, dilation,
                 groups):
        kernels = self._kernels(x, conv_weight, stride, padding, dilation, groups)
        if kernels is not None:
            return kernels.conv_fwd(x, mean, invstd, weight, bias, slope, conv_weight, conv_bias, stride, padding)
        a = self.bn["bn_act_fwd_eval"](x, mean, invstd, weight, bias, slope)
        return _conv(a, conv_weight, conv_bias, stride, padding, dilation, groups)

    def bwd(self, grad_out, x, mean, invstd, weight, bias, slope, conv_weight, has_conv_bias, stride, padding,
            dilation, groups, batch_stats):
        kernels = self._kernels(x, conv_weight, stride, padding, dilation, groups)
        conv_args = (stride, padding, dilation, False, [0, 0], groups)
        if kernels is not None:
            grad_conv_weight = kernels.conv_wgrad(grad_out, x, mean, invstd, weight, bias, slope, conv_weight,
                                                  stride, padding)
            # The transposed convolution reads only x's shape and layout, never its values.
            grad_a = aten.convolution_backward(grad_out, x, conv_weight, None, *conv_args, [True, False, False])[0]
        else:
            a = self.bn["bn_act_fwd_eval"](x, mean, invstd, weight, bias, slope)
            grad_a, grad_conv_weight, _ = aten.convolution_backward(grad_out, a, conv_weight, None, *conv_args,
                                                                    [True, True, False])
            del a
            grad_conv_weight = _like(grad_conv_weight, conv_weight)
        grad_conv_bias = grad_out.sum((0, 2, 3)) if has_conv_bias else grad_out.new_empty((0,))
        grads = self.bn["bn_act_bwd"](_like(grad_a, x), x, mean, invstd, weight, bias, slope, batch_stats)
        return (*grads, grad_conv_weight, grad_conv_bias)


# Autograd of the direct path: ctx.bwd is the backward of the same backend.


def _setup(ctx, x, mean, invstd, bn_params, conv_weight, conv_bias, conv_args, batch_stats, bwd):
    ctx.save_for_backward(x, mean, invstd, *bn_params, conv_weight)
    ctx.has_conv_bias = conv_bias is not None
    ctx.conv_args, ctx.batch_stats, ctx.bwd = conv_args, batch_stats, bwd


def _train_setup(ctx, inputs, output, bwd):
    x, weight, bias, slope, _eps, conv_weight, conv_bias, *conv_args = inputs
    _out, mean, invstd = output
    ctx.mark_non_differentiable(mean, invstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for mean and invstd
    _setup(ctx, x, mean, invstd, (weight, bias, slope), conv_weight, conv_bias, conv_args, True, bwd)


def _eval_setup(ctx, inputs, output, bwd):
    x, mean, invstd, weight, bias, slope, conv_weight, conv_bias, *conv_args = inputs
    _setup(ctx, x, mean, invstd, (weight, bias, slope), conv_weight, conv_bias, conv_args, False, bwd)


def _backward(ctx, grad_out):
    """Gradients of (input, weight, bias, slope, conv_weight, conv_bias), None where not needed."""
    x, mean, invstd, weight, bias, slope, conv_weight = ctx.saved_tensors
    grads = ctx.bwd(grad_out, x, mean, invstd, weight, bias, slope, conv_weight, ctx.has_conv_bias,
                    *ctx.conv_args, ctx.batch_stats)
    offset = 1 if ctx.batch_stats else 3  # the BN parameters' place among the inputs
    conv_at = offset + 3 + (1 if ctx.batch_stats else 0)  # after eps in training
    needs = ctx.needs_input_grad
    return (*_needed_grads(ctx, grads[:4], (weight, bias, slope), offset),
            grads[4] if needs[conv_at] else None,
            grads[5] if ctx.has_conv_bias and needs[conv_at + 1] else None)


def _train_backward(ctx, grad_out, _grad_mean, _grad_invstd):
    if grad_out is None:  # no gradient reached the output: none for the inputs
        return (None,) * 11
    dx, dweight, dbias, dslope, dconv_weight, dconv_bias = _backward(ctx, grad_out)
    return dx, dweight, dbias, dslope, None, dconv_weight, dconv_bias, None, None, None, None


def _eval_backward(ctx, grad_out):
    dx, dweight, dbias, dslope, dconv_weight, dconv_bias = _backward(ctx, grad_out)
    return dx, None, None, dweight, dbias, dslope, dconv_weight, dconv_bias, None, None, None, None


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "fusedrect: second-order gradients through the pre-activation convolution are not implemented; "
        "use backend='reference' (pure PyTorch) for double backward"
    )


def _routed_to_triton(x):
    """True when the ops' CUDA router runs Triton for x (then the Triton convolution runs as well)."""
    return x.device.type == "cuda" and _backend.cuda_implementation(x) == "triton"


@functools.cache
def _registered():
    """The implementation the dispatcher runs on CUDA: the BatchNorm + act ops through the dispatcher, the Triton
    convolution where the ops' CUDA router picks Triton."""
    return _Impl(dispatcher_ops(), _routed_to_triton)


def _kernel(method):
    def run(*args):
        return getattr(_registered(), method)(*args)

    return run


if _backend.compiled():
    @torch.library.register_fake("fusedrect::preact_conv_fwd_train")
    def _fwd_train_fake(input, weight, bias, slope, eps, conv_weight, conv_bias, stride, padding, dilation, groups):
        out = _conv(input, conv_weight, conv_bias, stride, padding, dilation, groups)
        return out, _stats_like(input), _stats_like(input)

    @torch.library.register_fake("fusedrect::preact_conv_fwd_eval")
    def _fwd_eval_fake(input, mean, invstd, weight, bias, slope, conv_weight, conv_bias, stride, padding, dilation,
                       groups):
        return _conv(input, conv_weight, conv_bias, stride, padding, dilation, groups)

    @torch.library.register_fake("fusedrect::preact_conv_bwd")
    def _bwd_fake(grad_out, input, mean, invstd, weight, bias, slope, conv_weight, has_conv_bias, stride, padding,
                  dilation, groups, batch_stats):
        slope_grad = _stats_like(input) if slope is not None else input.new_empty((0,), dtype=mean.dtype)
        conv_bias_grad = grad_out.new_empty((conv_weight.shape[0] if has_conv_bias else 0,))
        return (torch.empty_like(input), _stats_like(input), _stats_like(input), slope_grad,
                torch.empty_like(conv_weight), conv_bias_grad)

    for _method in ("fwd_train", "fwd_eval", "bwd"):
        torch.library.register_kernel(f"fusedrect::preact_conv_{_method}", "cuda", _kernel(_method))
    torch.library.register_autograd("fusedrect::preact_conv_bwd", _no_double_backward)


def _direct_train(x, weight, bias, slope, eps, conv_weight, conv_bias, stride, padding, dilation, groups, impl):
    return impl.fwd_train(x, weight, bias, slope, eps, conv_weight, conv_bias, stride, padding, dilation, groups)


def _direct_eval(x, mean, invstd, weight, bias, slope, conv_weight, conv_bias, stride, padding, dilation, groups,
                 impl):
    return impl.fwd_eval(x, mean, invstd, weight, bias, slope, conv_weight, conv_bias, stride, padding, dilation,
                         groups)


_DirectTrain = direct_function(
    "Training forward of an implementation called outside the dispatcher (Triton interpreted on CPU, or under a "
    "torch.func transform).", _direct_train,
    lambda ctx, inputs, output, impl: _train_setup(ctx, inputs, output, impl.bwd), _train_backward)
_DirectEval = direct_function(
    "Eval forward of an implementation called outside the dispatcher (Triton interpreted on CPU, or under a "
    "torch.func transform).", _direct_eval,
    lambda ctx, inputs, output, impl: _eval_setup(ctx, inputs, output, impl.bwd), _eval_backward)


@functools.cache
def _under_functorch():
    """The implementation the dispatcher runs, for a torch.func transform (which refuses the forward ops' C++
    autograd): its backward's recomputation of the activation through the direct path's autograd.Function."""
    ops = dispatcher_ops()
    return _Impl({**ops, "bn_act_fwd_eval": lambda *args: _DirectBNEval.apply(*args, ops)}, _routed_to_triton)


def _direct_impl(backend, x):
    """The implementation of ``backend`` for x when the dispatcher does not route x's device to it, or when a
    torch.func transform runs, else None."""
    if _through_dispatcher(backend, x):
        return _under_functorch() if _backend.functorch_active() else None
    return _Impl(_ops_for(backend, x), _triton_conv_runs if backend == "triton" else lambda _x: False)


def _triton_conv_runs(x):
    """Whether the Triton convolution runs x: on a GPU, yes; in Triton's interpreter (CPU tensors) not in bf16,
    whose tl.dot the interpreter computes wrongly (Triton 3.8: a 16x16 bf16 product off by ~1e10, fp16's
    exact), the framework's convolution following the Triton BatchNorm + act kernels instead."""
    return x.device.type != "cpu" or x.dtype != torch.bfloat16


def preact_conv_train(x, weight, bias, slope, eps, conv_weight, conv_bias, stride, padding, dilation, groups,
                      backend):
    """Training forward on the resolved ``backend``: ``(out, mean, invstd)``."""
    if backend == "reference":
        a, mean, invstd = reference.bn_act_train(x, weight, bias, slope, eps)
        return _conv(a, conv_weight, conv_bias, stride, padding, dilation, groups), mean, invstd
    x = native_layout(x)
    args = (x, weight, bias, slope, eps, conv_weight, conv_bias, stride, padding, dilation, groups)
    impl = _direct_impl(backend, x)
    if impl is None:
        return torch.ops.fusedrect.preact_conv_fwd_train.default(*args)
    return _DirectTrain.apply(*args, impl)


def preact_conv_eval(x, mean, invstd, weight, bias, slope, conv_weight, conv_bias, stride, padding, dilation, groups,
                     backend):
    """Forward with given per-channel statistics on the resolved ``backend``."""
    if backend == "reference":
        a = reference.bn_act_eval(x, mean, invstd, weight, bias, slope)
        return _conv(a, conv_weight, conv_bias, stride, padding, dilation, groups)
    x = native_layout(x)
    args = (x, mean, invstd, weight, bias, slope, conv_weight, conv_bias, stride, padding, dilation, groups)
    impl = _direct_impl(backend, x)
    if impl is None:
        return torch.ops.fusedrect.preact_conv_fwd_eval.default(*args)
    return _DirectEval.apply(*args, impl)
