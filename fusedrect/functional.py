"""Functional API: BatchNorm followed by PReLU or ReLU in one fused op, and the pre-activation convolution
conv2d(act(BN(x))) that never stores the activation.

Arguments follow ``torch.nn.functional.batch_norm``: in training, batch statistics normalise the input and,
where given, ``running_mean``/``running_var`` are updated in place with ``momentum`` (unbiased variance);
otherwise the running statistics normalise it. Every argument is validated here, before any kernel runs.
"""
import math
import numbers

import torch
import torch.distributed as dist

from fusedrect import reference
from fusedrect.ops import _backend, bn_act, preact_conv, sync_bn

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def bn_prelu(
    input, running_mean, running_var, weight=None, bias=None, slope=None, training=False, momentum=0.1, eps=1e-5,
    *, backend=None, memory_efficient=False,
):
    """BatchNorm over dim 1 followed by PReLU with ``slope`` of shape ``(1,)`` (shared) or ``(C,)``.

    ``memory_efficient=True`` (training only) saves the output instead of the input for backward and recovers
    the input from it, which needs every slope > 0 and every |weight| > eps (checked, on the host).

    ``backend``: ``"auto"``, ``"cpp"``, ``"triton"``, ``"cuda"`` or ``"reference"`` (default:
    ``$FUSEDRECT_BACKEND``, else auto); see fusedrect.ops._backend.
    """
    if slope is None:
        raise TypeError("slope: bn_prelu needs a tensor of shape (1,) or (C,); use bn_relu for ReLU")
    if not isinstance(memory_efficient, bool):
        raise TypeError(f"memory_efficient: expected a bool, got {type(memory_efficient).__name__}")
    return _bn_act(input, running_mean, running_var, weight, bias, slope, training, momentum, eps, backend,
                   memory_efficient)


def bn_relu(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
    *, backend=None,
):
    """BatchNorm over dim 1 followed by ReLU. ``backend`` as in :func:`bn_prelu`."""
    return _bn_act(input, running_mean, running_var, weight, bias, None, training, momentum, eps, backend)


def _bn_act(input, running_mean, running_var, weight, bias, slope, training, momentum, eps, backend,
            memory_efficient=False):
    _validate(input, running_mean, running_var, weight, bias, slope, training, momentum, eps)
    backend = _backend.resolve(backend, input)
    if training:
        train = bn_act.bn_act_train
        if memory_efficient:
            _check_invertible(weight, slope, eps)
            train = bn_act.bn_act_train_memory_efficient
        y, mean, invstd = train(input, weight, bias, slope, eps, backend)
        _update_running_stats(_count(input), running_mean, running_var, mean, invstd, momentum, eps, backend)
        return y
    return bn_act.bn_act_eval_running(input, running_mean, running_var, eps, weight, bias, slope, backend)


def preact_conv2d(
    input, running_mean, running_var, weight, bias, slope, conv_weight, conv_bias=None, stride=1, padding=0,
    dilation=1, groups=1, training=False, momentum=0.1, eps=1e-5, *, backend=None,
):
    """``conv2d(act(batch_norm(input)), conv_weight, conv_bias, stride, padding, dilation, groups)``, the unit of
    a pre-activation ResNet (He et al. 2016), with act = PReLU(``slope``) or ReLU (``slope=None``).

    The BatchNorm arguments are those of :func:`bn_prelu`, the convolution's those of
    ``torch.nn.functional.conv2d`` (``stride``, ``padding``, ``dilation``: an int or a pair). The activation is
    never stored: backward recomputes it from ``input``. ``backend`` as in :func:`bn_prelu`.
    """
    _validate(input, running_mean, running_var, weight, bias, slope, training, momentum, eps)
    conv_weight, conv_bias = _autocast_conv_parameters(input, conv_weight, conv_bias)
    conv_args = _validate_conv(input, conv_weight, conv_bias, stride, padding, dilation, groups)
    backend = _backend.resolve(backend, input)
    if training:
        out, mean, invstd = preact_conv.preact_conv_train(input, weight, bias, slope, eps, conv_weight, conv_bias,
                                                          *conv_args, backend)
        _update_running_stats(_count(input), running_mean, running_var, mean, invstd, momentum, eps, backend)
        return out
    mean, invstd = bn_act.running_statistics(input, running_mean, running_var, eps, backend)
    return preact_conv.preact_conv_eval(input, mean, invstd, weight, bias, slope, conv_weight, conv_bias, *conv_args,
                                        backend)


def sync_bn_prelu(
    input, running_mean, running_var, weight=None, bias=None, slope=None, training=False, momentum=0.1, eps=1e-5,
    process_group=None, *, backend=None,
):
    """:func:`bn_prelu` whose training batch statistics span every rank of ``process_group`` (a
    ``torch.distributed`` process group; None: the whole world), as ``nn.SyncBatchNorm``: every rank of the group
    must call it, with a batch of any size (empty included). Outside torch.distributed, with a single rank, or
    with ``training=False`` it is :func:`bn_prelu`. ``backend`` as in :func:`bn_prelu`."""
    if slope is None:
        raise TypeError("slope: sync_bn_prelu needs a tensor of shape (1,) or (C,); use sync_bn_relu for ReLU")
    return _sync_bn_act(input, running_mean, running_var, weight, bias, slope, training, momentum, eps,
                        process_group, backend)


def sync_bn_relu(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
    process_group=None, *, backend=None,
):
    """:func:`bn_relu` with the batch statistics of every rank of ``process_group``, as :func:`sync_bn_prelu`."""
    return _sync_bn_act(input, running_mean, running_var, weight, bias, None, training, momentum, eps, process_group,
                        backend)


def _sync_bn_act(input, running_mean, running_var, weight, bias, slope, training, momentum, eps, process_group,
                 backend):
    if process_group is not None and not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"process_group: expected a torch.distributed.ProcessGroup or None, got "
                        f"{type(process_group).__name__}")
    ranks = sync_bn.world_size(process_group) if training else 1
    if ranks == 1:
        return _bn_act(input, running_mean, running_var, weight, bias, slope, training, momentum, eps, backend)
    _validate(input, running_mean, running_var, weight, bias, slope, training, momentum, eps, synced=True)
    backend = _backend.resolve(backend, input)
    y, mean, invstd, count = sync_bn.sync_bn_act_train(input, weight, bias, slope, eps, process_group, ranks, backend)
    if count == 1:  # the same on every rank, so every rank raises
        raise ValueError("Expected more than 1 value per channel when training, got 1 over all ranks of the "
                         "process group")
    _update_running_stats(count, running_mean, running_var, mean, invstd, momentum, eps, backend)
    return y


def _count(input):
    """Elements per channel."""
    return input.numel() // input.shape[1] if input.shape[1] else 0


def _update_running_stats(count, running_mean, running_var, mean, invstd, momentum, eps, backend):
    """running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance M/(M-1) var of the
    batch's ``count`` elements per channel. An empty batch leaves them as they are (as nn.BatchNorm does).
    ``momentum`` may be a 0-dim tensor (the modules' cumulative average), which keeps the update free of host
    synchronisation under torch.compile. One op of the extension where it is built, else the reference's ATen ops:
    on the reference backend (pure PyTorch), and where torch.compile traces them (fusing them: the op's int count
    would make it specialise the graph on the batch size, recompiling for each new one). Under a torch.func
    transform too, which refuses their in-place update of a captured buffer before it changes anything (as
    nn.BatchNorm's), where the op would change it."""
    if (backend == "reference" or not _backend.compiled() or torch.compiler.is_compiling()
            or _backend.functorch_active()):
        reference.update_running_stats(running_mean, running_var, mean, invstd, eps, count, momentum)
    elif count and running_mean is not None:  # both or neither (_validate)
        tensor = momentum if isinstance(momentum, torch.Tensor) else None
        torch.ops.fusedrect.bn_update_running_stats.default(running_mean, running_var, mean, invstd, eps, count,
                                                            0.0 if tensor is not None else float(momentum), tensor)


def _check_invertible(weight, slope, eps):
    """The memory-efficient backward divides by every slope and every weight."""
    bad = (~(slope > 0)).nonzero()  # NaN included
    if len(bad):
        which = "the shared slope" if slope.numel() == 1 else f"channel {int(bad[0, 0])}'s slope"
        raise ValueError(f"slope: memory_efficient needs every slope > 0 to invert the PReLU, but {which} is "
                         f"{float(slope[bad[0, 0]]):g}")
    if weight is not None:
        bad = (~(weight.abs() > eps)).nonzero()
        if len(bad):
            raise ValueError(f"weight: memory_efficient needs every |weight| > eps ({eps:g}) to invert the affine, "
                             f"but channel {int(bad[0, 0])}'s weight is {float(weight[bad[0, 0]]):g}")


def _validate(input, running_mean, running_var, weight, bias, slope, training, momentum, eps, synced=False):
    """Every argument of the BatchNorm part; ``synced``: the batch statistics span several ranks, so this rank's
    batch may hold a single value per channel (or none)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
    if not isinstance(training, bool):  # as torch.batch_norm: a truthy string would train and update the buffers
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input: expected a float16, bfloat16, float32 or float64 tensor, got {input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"input: expected at least 2 dims (N, C, ...), got shape {tuple(input.shape)}")
    channels, device = input.shape[1], input.device
    expected = (channels,)
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias),
                    ("slope", slope)):
        # The usual case in one comparison per property (this runs on every call: ~0.25 us per tensor).
        if t is not None and not (isinstance(t, torch.Tensor) and t.shape == expected and t.is_floating_point()
                                  and t.device == device):
            _check_per_channel(name, t, channels, device, shared=name == "slope")
    if (running_mean is None) != (running_var is None):
        given = "running_mean" if running_var is None else "running_var"
        raise ValueError(f"running_mean and running_var: expected both or neither, got only {given}")
    if not _is_real(eps) or not eps >= 0:
        raise ValueError(f"eps: expected a non-negative number, got {eps!r}")
    if training and eps == 0:
        raise ValueError("eps: must be positive during training (as torch.batch_norm), got 0")
    if isinstance(momentum, torch.Tensor):
        if momentum.numel() != 1 or not momentum.is_floating_point():
            raise ValueError(f"momentum: expected a number or a one-element float tensor, got {momentum!r}")
    elif not _is_real(momentum) or not -math.inf < momentum < math.inf:  # a comparison: a SymFloat's too
        raise ValueError(f"momentum: expected a finite number, got {momentum!r}")
    if training and not synced:
        if _count(input) == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {input.size()}"
            )


def _is_real(value):
    """isinstance(value, numbers.Real), with a float's answer first (the ABC check costs ~0.25 us)."""
    return type(value) is float or isinstance(value, numbers.Real)


def _check_per_channel(name, t, channels, device, shared=False):
    """``t`` of shape (channels,), or (1,) where ``shared``, on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    shape = t.shape
    if len(shape) != 1 or not (shape[0] == channels or (shared and shape[0] == 1)):
        expected = f"(1,) or ({channels},)" if shared else f"({channels},)"
        raise ValueError(f"{name}: expected shape {expected} for input with {channels} channels, got {tuple(shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the input's device), got {t.device}")


def _pair(name, value, minimum):
    """``value`` (an int or a pair of ints, each >= ``minimum``) as a list of two ints."""
    pair = [value, value] if isinstance(value, numbers.Integral) else value
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= minimum for v in pair)):
        raise ValueError(f"{name}: expected an int >= {minimum} or a pair of them, got {value!r}")
    return [int(v) for v in pair]


def _autocast_conv_parameters(input, conv_weight, conv_bias):
    """Under torch.autocast, with an input in its low-precision dtype (the output of an autocast layer before),
    the convolution's parameters cast to that dtype, as autocast casts nn.Conv2d's (differentiably: gradients
    reach the fp32 parameters). An fp32 input keeps the parameters and the output in fp32, as the BatchNorm
    modules do."""
    device = input.device.type
    if (not torch._C._is_any_autocast_enabled() or not torch.amp.is_autocast_available(device)
            or not torch.is_autocast_enabled(device) or input.dtype != torch.get_autocast_dtype(device)):
        return conv_weight, conv_bias

    def cast(t):
        return t.to(input.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    return cast(conv_weight), cast(conv_bias)


def _validate_conv(input, conv_weight, conv_bias, stride, padding, dilation, groups):
    """(stride, padding, dilation, groups) as the op takes them, after checking every convolution argument."""
    if input.dim() != 4:
        raise ValueError(f"input: expected a 4-D (N, C, H, W) tensor for a 2-D convolution, got shape "
                         f"{tuple(input.shape)}")
    if not isinstance(conv_weight, torch.Tensor):
        raise TypeError(f"conv_weight: expected a torch.Tensor, got {type(conv_weight).__name__}")
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    channels = input.shape[1]
    if (conv_weight.dim() != 4 or conv_weight.shape[0] % groups or conv_weight.shape[1] * groups != channels
            or min(conv_weight.shape[2:]) < 1):
        raise ValueError(f"conv_weight: expected shape (out_channels, {channels} / groups, kH, kW) with "
                         f"out_channels divisible by groups={groups} and kH, kW >= 1, got {tuple(conv_weight.shape)}")
    for name, t in (("conv_weight", conv_weight), ("conv_bias", conv_bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype != input.dtype:
            raise TypeError(f"{name}: expected the input's dtype {input.dtype}, got {t.dtype}")
        if t.device != input.device:
            raise ValueError(f"{name}: expected a tensor on {input.device} (the input's device), got {t.device}")
    if conv_bias is not None and tuple(conv_bias.shape) != (conv_weight.shape[0],):
        raise ValueError(f"conv_bias: expected shape ({conv_weight.shape[0]},), got {tuple(conv_bias.shape)}")
    conv_args = (_pair("stride", stride, 1), _pair("padding", padding, 0), _pair("dilation", dilation, 1), int(groups))
    stride, padding, dilation, _ = conv_args
    for i, size in enumerate(input.shape[2:]):
        reach = dilation[i] * (conv_weight.shape[2 + i] - 1) + 1
        if size + 2 * padding[i] < reach:
            raise ValueError(f"input: spatial size {tuple(input.shape[2:])} with padding {padding} is smaller than "
                             f"the kernel's reach {reach} along dim {2 + i}")
    return conv_args
