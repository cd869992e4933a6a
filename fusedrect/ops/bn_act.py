"""The fused BatchNorm + ReLU/PReLU ops (``torch.ops.fusedrect.bn_act_*``, schemas in csrc/fusedrect.cpp):
their fake implementations and CUDA kernel registered from Python, and the per-call entry points that run the
resolved backend. The forward ops' autograd is C++ (csrc/autograd.cpp: no Python per call in a training step);
the backward ops get one here that raises on a second-order gradient.

The ops are free of side effects: training forward returns ``(y, mean, invstd)`` and the caller updates
running statistics. Backward recomputes the activation from ``x``; only ``x``, the parameters and the
per-channel statistics are saved (in the memory-efficient mode, ``y`` instead of ``x``).

Kernels reach the ops through the dispatcher, which is what ``torch.compile`` and ``opcheck`` see. CPU: the
C++ kernels registered by ``fusedrect._C``. CUDA: the implementation ``_backend.cuda_implementation`` picks
for the op's tensor (the Triton launchers or the CUDA C++ functions of ``fusedrect._C.cuda``), through one
router per op: in C++ where the extension has its CUDA part (csrc/cuda/router.cpp, which hands Triton calls to
the Python router below), else the Python router itself, registered below. A backend that the dispatcher
would not run for a tensor (an explicit ``backend=`` other than the router's pick, or Triton in its
interpreter on CPU tensors) is called directly under an autograd.Function whose backward runs that backend's
backward (as csrc/autograd.cpp does through the dispatcher).
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


def _triton(name):
    """A Triton launcher of fusedrect.kernels.bn_act, imported on first use (triton is slow to import)."""

    def launch(*args):
        from fusedrect.kernels import bn_act as kernels

        return getattr(kernels, name)(*args)

    return launch


def _cuda(name):
    """A CUDA C++ function of fusedrect._C.cuda."""

    def launch(*args):
        return getattr(_backend.cuda_module(), name)(*args)

    return launch


# Autograd of the direct path: `bwd` is the backward function of the same backend.


def _train_setup(ctx, inputs, output, bwd):
    x, weight, bias, slope = inputs[:4]
    _y, mean, invstd = output
    ctx.mark_non_differentiable(mean, invstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for mean and invstd
    ctx.save_for_backward(x, mean, invstd, weight, bias, slope)
    ctx.bwd, ctx.batch_stats = bwd, True


def _eval_setup(ctx, inputs, output, bwd):
    x, mean, invstd, weight, bias, slope = inputs[:6]
    ctx.save_for_backward(x, mean, invstd, weight, bias, slope)
    ctx.bwd, ctx.batch_stats = bwd, False


def _needed_grads(ctx, grads, params, offset):
    """(dx, dweight, dbias, dslope) for the inputs that need them; the parameters start at input ``offset``."""
    needs = ctx.needs_input_grad
    dx, *param_grads = grads
    return (dx if needs[0] else None,
            *(_param_grad(g, p, needs[offset + i]) for i, (g, p) in enumerate(zip(param_grads, params))))


def _backward(ctx, grad_y):
    """Gradients for (input, weight, bias, slope)."""
    x, mean, invstd, weight, bias, slope = ctx.saved_tensors
    grads = ctx.bwd(_like(grad_y, x), x, mean, invstd, weight, bias, slope, ctx.batch_stats)
    return _needed_grads(ctx, grads, (weight, bias, slope), 1 if ctx.batch_stats else 3)  # eval: x, mean, invstd


def _train_backward(ctx, grad_y, _grad_mean, _grad_invstd):
    if grad_y is None:  # no gradient reached y: none for the inputs
        return (None,) * 5
    return (*_backward(ctx, grad_y), None)


def _eval_backward(ctx, grad_y):
    dx, dweight, dbias, dslope = _backward(ctx, grad_y)
    return dx, None, None, dweight, dbias, dslope


_OP_NAMES = ("bn_act_fwd_train", "bn_act_fwd_eval", "bn_act_bwd", "bn_act_bwd_from_output")
# Every op with a CUDA implementation, and the position of the argument whose layout and dtype pick it.
_ROUTED = {"bn_act_fwd_train": 0, "bn_act_fwd_eval": 0, "bn_act_bwd": 1, "bn_act_bwd_from_output": 1,
           "bn_stats": 0, "bn_act_bwd_reduce": 1, "bn_act_bwd_elemt": 1}
# The functions of each CUDA implementation (Triton also on CPU tensors in its interpreter), by op name.
_IMPLS = {"triton": {name: _triton(name) for name in _ROUTED}, "cuda": {name: _cuda(name) for name in _ROUTED}}


def _router(name):
    """The CUDA kernel of op ``name``: runs the implementation that _backend picks for the op's tensor."""
    position = _ROUTED[name]

    def route(*args):
        x = args[position]
        backend = _backend.cuda_implementation(x)
        reason = _backend.why_unavailable(backend, x.device)
        if reason is not None:
            raise RuntimeError(f"fusedrect backend {backend!r} cannot run: {reason}")
        return _IMPLS[backend][name](*args)

    return route


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "fusedrect: second-order gradients through the fused BatchNorm + activation are not implemented; "
        "use backend='reference' (pure PyTorch) for double backward"
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

    @torch.library.register_fake("fusedrect::bn_act_bwd_from_output")
    def _bwd_from_output_fake(grad_out, output, invstd, weight, bias, slope):
        return torch.empty_like(output), _stats_like(output), _stats_like(output), _stats_like(output)

    torch.library.register_autograd("fusedrect::bn_act_bwd", _no_double_backward)
    torch.library.register_autograd("fusedrect::bn_act_bwd_from_output", _no_double_backward)
    _ROUTERS = {_name: _router(_name) for _name in _ROUTED}
    if _backend.cuda_module() is not None:  # the CUDA kernels are csrc/cuda/router.cpp's
        _backend.cuda_module().set_python_router(lambda name, *args: _ROUTERS[name](*args))
    else:
        for _name, _route in _ROUTERS.items():
            torch.library.register_kernel(f"fusedrect::{_name}", "cuda", _route)


def direct_function(doc, forward, setup, backward):
    """An autograd.Function for an implementation called outside the dispatcher, passed as its last input
    ``impl``: ``forward(*args, impl)`` (its parameters named one by one: torch.compile, tracing the Function
    under a torch.func transform, took a ``*args`` forward's first input for the context), ``setup(ctx, args,
    output, impl)``, and the op's registered ``backward`` (None for ``impl``)."""

    class Direct(torch.autograd.Function):
        __doc__ = doc
        generate_vmap_rule = True  # torch.func.vmap runs forward and backward over the batch dimension

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup(ctx, inputs[:-1], output, inputs[-1])

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, *grads):
            return *backward(ctx, *grads), None

    Direct.forward = staticmethod(forward)
    return Direct


def _direct_train(x, weight, bias, slope, eps, ops):
    return ops["bn_act_fwd_train"](x, weight, bias, slope, eps)


def _direct_eval(x, mean, invstd, weight, bias, slope, ops):
    return ops["bn_act_fwd_eval"](x, mean, invstd, weight, bias, slope)


_DirectTrain = direct_function(
    "Training forward of the implementation ``ops`` (op name -> function) called outside the dispatcher.",
    _direct_train,
    lambda ctx, inputs, output, ops: _train_setup(ctx, inputs, output, ops["bn_act_bwd"]), _train_backward)
_DirectEval = direct_function(
    "Eval forward of the implementation ``ops`` called outside the dispatcher.", _direct_eval,
    lambda ctx, inputs, output, ops: _eval_setup(ctx, inputs, output, ops["bn_act_bwd"]), _eval_backward)


def _through_dispatcher(backend, x):
    """True when the dispatcher runs ``backend`` for x: cpp for CPU tensors, the router's pick for CUDA ones."""
    if not _backend.compiled():
        return False
    if backend == "cpp":
        return True
    return x.device.type == "cuda" and _backend.cuda_implementation(x) == backend


def dispatcher_ops():
    """The ops through the dispatcher, by name (what each device's registered kernel runs)."""
    return {name: getattr(torch.ops.fusedrect, name) for name in _OP_NAMES}


class _MemoryEfficientTrain(torch.autograd.Function):
    """Training forward of BatchNorm + PReLU that saves the output y instead of the input x (InPlace-ABN's idea
    with a learnable slope): backward recovers x - mean from y by inverting the activation and the affine."""

    generate_vmap_rule = True  # as the direct path's Functions: torch.func.vmap runs it over the batch dimension

    @staticmethod
    def forward(x, weight, bias, slope, eps, ops):
        return ops["bn_act_fwd_train"](x, weight, bias, slope, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _x, weight, bias, slope, _eps, ops = inputs
        y, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)  # as _train_setup
        ctx.save_for_backward(y, invstd, weight, bias, slope)
        ctx.bwd = ops["bn_act_bwd_from_output"]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_invstd):
        if grad_y is None:
            return (None,) * 6
        y, invstd, weight, bias, slope = ctx.saved_tensors
        grads = ctx.bwd(_like(grad_y, y), y, invstd, weight, bias, slope)
        return (*_needed_grads(ctx, grads, (weight, bias, slope), 1), None, None)


def _ops_for(backend, x):
    """The op functions of ``backend`` for x: through the dispatcher, or the implementation's own directly."""
    return dispatcher_ops() if _through_dispatcher(backend, x) else _IMPLS[backend]


def bn_act_train_memory_efficient(x, weight, bias, slope, eps, backend):
    """Training forward that saves only its output for backward: ``(y, mean, invstd)``. The caller checks that
    every slope is > 0 and every |weight| > eps (the activation and the affine must be invertible)."""
    if backend == "reference":
        raise ValueError("memory_efficient: needs a kernel backend (cpp, triton or cuda), not the reference")
    x = native_layout(x)
    return _MemoryEfficientTrain.apply(x, weight, bias, slope, eps, _ops_for(backend, x))


def bn_act_train(x, weight, bias, slope, eps, backend):
    """Training forward on the resolved ``backend``: ``(y, mean, invstd)``."""
    if backend == "reference":
        return reference.bn_act_train(x, weight, bias, slope, eps)
    x = native_layout(x)
    if _through_dispatcher(backend, x) and not _backend.functorch_active():
        return torch.ops.fusedrect.bn_act_fwd_train.default(x, weight, bias, slope, eps)
    return _DirectTrain.apply(x, weight, bias, slope, eps, _ops_for(backend, x))


def running_statistics(x, running_mean, running_var, eps, backend):
    """(mean, invstd) in the statistics dtype from the running statistics (eval mode) for the resolved
    ``backend``. invstd is one op of the extension where it is built (one launch on a GPU instead of two or three),
    the same bits as the ATen ops it replaces, which still serve the reference backend (pure PyTorch) and a running
    variance that autograd tracks."""
    _require_running(running_mean, running_var)
    dtype = reference.stats_dtype(x)
    mean = running_mean if running_mean.dtype == dtype else running_mean.to(dtype)  # a no-op .to costs ~1 us
    if backend != "reference" and _backend.compiled() and not _tracked(running_var):
        return mean, torch.ops.fusedrect.bn_invstd.default(running_var, eps, dtype)
    var = running_var if running_var.dtype == dtype else running_var.to(dtype)
    return mean, (var + eps).rsqrt_()


def _require_running(running_mean, running_var):
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required when training=False")


def _tracked(running_var):
    """Whether autograd records ops on the running variance (bn_invstd has no autograd)."""
    return running_var.requires_grad and torch.is_grad_enabled()


def bn_act_eval_running(x, running_mean, running_var, eps, weight, bias, slope, backend):
    """Eval forward from the running statistics on the resolved ``backend``: ``y``. Where the dispatcher runs the
    backend, one op (bn_act_fwd_eval_running: the statistics and the pass in one call from Python); else the
    statistics, then :func:`bn_act_eval`."""
    _require_running(running_mean, running_var)
    if (backend != "reference" and _through_dispatcher(backend, x) and not _tracked(running_var)
            and not _backend.functorch_active()):
        return torch.ops.fusedrect.bn_act_fwd_eval_running.default(native_layout(x), running_mean, running_var, eps,
                                                                   weight, bias, slope)
    return bn_act_eval(x, *running_statistics(x, running_mean, running_var, eps, backend), weight, bias, slope,
                       backend)


def bn_act_eval(x, mean, invstd, weight, bias, slope, backend):
    """Forward with given per-channel statistics on the resolved ``backend``: ``y``."""
    if backend == "reference":
        return reference.bn_act_eval(x, mean, invstd, weight, bias, slope)
    x = native_layout(x)
    if _through_dispatcher(backend, x) and not _backend.functorch_active():
        return torch.ops.fusedrect.bn_act_fwd_eval.default(x, mean, invstd, weight, bias, slope)
    return _DirectEval.apply(x, mean, invstd, weight, bias, slope, _ops_for(backend, x))
