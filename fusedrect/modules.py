"""Drop-in modules: ``FusedBNPReLU`` for ``BatchNorm + PReLU``, ``FusedBNReLU`` for ``BatchNorm + ReLU``, and
``FusedPreActConv2d`` for ``BatchNorm -> ReLU/PReLU -> Conv2d``.

Parameters, buffers, state_dict keys and training semantics are those of ``nn.BatchNorm{1,2,3}d`` (inputs of
shape (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W)), plus ``slope`` for PReLU. The modules hold state
and update running statistics; the math runs in ``fusedrect.functional``.
"""
import math

import torch
from torch import nn

from fusedrect import functional


_BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_BN_PARAMETERS = ("weight", "bias")


class _FusedBNAct(nn.Module):
    """BatchNorm state and forward logic shared by the fused modules (mirrors ``nn.modules.batchnorm._NormBase``)."""

    _version = 2  # the state_dict version of nn.BatchNorm (num_batches_tracked)

    def __init__(self, num_features, eps, momentum, affine, track_running_stats, device, dtype, backend):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.backend = backend
        self.batchnorm_cls = nn.BatchNorm2d  # what to_modules() builds; from_modules() records its source
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, **{k: v for k, v in factory.items() if k != "dtype"}),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self._reset_bn_parameters()

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def _reset_bn_parameters(self):
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _apply_fused(self, input, fn, *extra, **options):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(
                f"input: expected shape (N, {self.num_features}, ...) for {type(self).__name__}"
                f"({self.num_features}), got {tuple(input.shape)}"
            )
        running_mean, running_var = self._tensor("running_mean"), self._tensor("running_var")
        # As nn.BatchNorm: momentum=None is a cumulative moving average over the batches tracked (kept a
        # tensor: reading the count back to Python would synchronise, and break torch.compile graphs).
        factor = 0.0 if self.momentum is None else self.momentum
        tracked = self._tensor("num_batches_tracked")
        counting = self.training and self.track_running_stats and tracked is not None
        if counting and self.momentum is None:
            factor = tracked.add(1).double().reciprocal()  # 1 / the count with this batch, in fp64 as nn.BatchNorm
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        keep_running = not self.training or self.track_running_stats
        output = fn(
            input,
            running_mean if keep_running else None,
            running_var if keep_running else None,
            self._tensor("weight"),
            self._tensor("bias"),
            *extra,
            training=use_batch_stats,
            momentum=factor,
            eps=self.eps,
            backend=self.backend,
            **options,
        )
        # Counted after the batch updated the running statistics, so that the two stay in step where the
        # update did not happen: a non-reentrant torch.utils.checkpoint stops its recomputation of the forward at
        # the op that saves the last tensor backward needs, before the update (nn.BatchNorm counts and updates
        # again in the recomputation).
        if counting:
            tracked.add_(1)
        return output

    def _tensor(self, name):
        """``self.<name>`` for a parameter or buffer, read from its dict where it is there: nn.Module.__getattr__
        costs ~0.5 us per name, a fifth of a small layer's eval. Attribute access otherwise (a parametrized
        tensor, torch.nn.utils.parametrize's, is a property of the module's class)."""
        for table in (self._parameters, self._buffers):
            if name in table:
                return table[name]
        return getattr(self, name)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checkpoints from before num_batches_tracked existed (as nn.BatchNorm accepts them).
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long, device=self.num_batches_tracked.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _bn_config(self):
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _to_batchnorm(self, batchnorm_cls):
        # Built with the buffers this module holds, then its flag: track_running_stats set to False after
        # construction (nn's idiom for batch statistics in training with the buffers kept for eval) keeps them.
        bn = batchnorm_cls(self.num_features, self.eps, self.momentum, self.affine, self.running_mean is not None,
                           **self._factory())
        bn.load_state_dict({k: v for k, v in self.state_dict().items() if k in _BN_STATE})
        bn.track_running_stats = self.track_running_stats
        _copy_trainable(bn, self)
        return bn.train(self.training)

    def _factory(self):
        tensor = next(iter(self.parameters()), None)
        if tensor is None:
            tensor = next(iter(self.buffers()), None)
        if tensor is None:
            return {}
        return {"device": tensor.device, "dtype": tensor.dtype if tensor.is_floating_point() else None}

    @staticmethod
    def _bn_kwargs(bn, act, conv=None):
        """The constructor arguments of the fused equivalent of ``bn`` then ``act`` (then ``conv``); device and
        dtype from the first floating-point tensor any of them holds (a BatchNorm without affine parameters or
        running statistics and a ReLU hold none)."""
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"bn: expected an nn.BatchNorm1d/2d/3d module, got {type(bn).__name__}")
        if bn.affine and bn.bias is None:
            raise ValueError("bn: a BatchNorm without a bias (bias=False) has no fused equivalent: the fused modules "
                             "learn a bias where they are affine")
        tensors = [*bn.parameters(), *(t for t in bn.buffers() if t.is_floating_point()), *act.parameters(),
                   *(conv.parameters() if conv is not None else ())]
        factory = {"device": tensors[0].device, "dtype": tensors[0].dtype} if tensors else {}
        return {  # the buffers bn holds (its flag may have been turned off after construction: _load_bn copies it)
            "num_features": bn.num_features, "eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine,
            "track_running_stats": bn.running_mean is not None, **factory,
        }

    def _load_bn(self, bn):
        state = self.state_dict()
        state.update(bn.state_dict())
        self.load_state_dict(state)
        self.track_running_stats = bn.track_running_stats
        _copy_trainable(self, bn)
        self.train(bn.training)
        self.batchnorm_cls = type(bn)
        return self


class FusedBNPReLU(_FusedBNAct):
    """``nn.BatchNorm{1,2,3}d(num_features)`` followed by ``nn.PReLU(num_parameters)``, fused.

    ``num_parameters=None`` learns one slope per channel; ``1`` shares one slope across channels (He et al. 2015).
    ``slope`` is initialised to ``init``. ``backend`` (keyword-only) pins a backend, see fusedrect.functional.
    ``memory_efficient=True`` (keyword-only) saves only the output for backward (InPlace-ABN's idea, for a
    learnable slope): training then needs every slope > 0 and every |weight| > eps, checked on each forward.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 num_parameters=None, init=0.25, device=None, dtype=None, *, backend=None, memory_efficient=False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, backend)
        self.memory_efficient = memory_efficient
        self.num_parameters = num_features if num_parameters is None else num_parameters
        if self.num_parameters not in (1, num_features):
            raise ValueError(f"num_parameters: expected None, 1 or {num_features}, got {num_parameters}")
        self.init = init
        self.slope = nn.Parameter(torch.full((self.num_parameters,), float(init), device=device, dtype=dtype))

    def reset_parameters(self):
        self._reset_bn_parameters()
        nn.init.constant_(self.slope, self.init)

    def forward(self, input):
        return self._apply_fused(input, functional.bn_prelu, self._tensor("slope"),
                                 memory_efficient=self.memory_efficient)

    def extra_repr(self):
        efficient = ", memory_efficient=True" if self.memory_efficient else ""
        return f"{self._bn_config()}, num_parameters={self.num_parameters}{efficient}"

    @classmethod
    def from_modules(cls, bn, act):
        """The fused equivalent of ``bn`` followed by the ``nn.PReLU`` ``act`` (parameters copied)."""
        if not isinstance(act, nn.PReLU):
            raise TypeError(f"act: expected an nn.PReLU module, got {type(act).__name__}")
        kwargs = cls._bn_kwargs(bn, act)
        if act.num_parameters not in (1, bn.num_features):
            raise ValueError(f"act: expected num_parameters 1 or {bn.num_features}, got {act.num_parameters}")
        fused = cls(**kwargs, num_parameters=act.num_parameters, init=act.init)
        fused._load_bn(bn)
        _copy_parameter(fused.slope, act.weight)
        return fused

    def to_modules(self, batchnorm_cls=None):
        """``nn.Sequential(BatchNorm, nn.PReLU)`` computing the same function (for export and deployment).

        ``batchnorm_cls`` defaults to the class given to ``from_modules``, else ``nn.BatchNorm2d``.
        """
        bn = self._to_batchnorm(batchnorm_cls or self.batchnorm_cls)
        act = nn.PReLU(self.num_parameters, self.init, **self._factory())
        _copy_parameter(act.weight, self.slope)
        return nn.Sequential(bn, act).train(self.training)


class FusedBNReLU(_FusedBNAct):
    """``nn.BatchNorm{1,2,3}d(num_features)`` followed by ``nn.ReLU()``, fused."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, backend=None, memory_efficient=False):
        if memory_efficient:
            raise ValueError("memory_efficient: ReLU maps every negative input to 0, so its output does not "
                             "determine its input; use FusedBNPReLU (slopes > 0) for the memory-efficient mode")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, backend)

    def reset_parameters(self):
        self._reset_bn_parameters()

    def forward(self, input):
        return self._apply_fused(input, functional.bn_relu)

    def extra_repr(self):
        return self._bn_config()

    @classmethod
    def from_modules(cls, bn, act):
        """The fused equivalent of ``bn`` followed by the ``nn.ReLU`` ``act`` (parameters copied)."""
        if not isinstance(act, nn.ReLU):
            raise TypeError(f"act: expected an nn.ReLU module, got {type(act).__name__}")
        return cls(**cls._bn_kwargs(bn, act))._load_bn(bn)

    def to_modules(self, batchnorm_cls=None):
        """``nn.Sequential(BatchNorm, nn.ReLU)`` computing the same function (for export and deployment)."""
        return nn.Sequential(self._to_batchnorm(batchnorm_cls or self.batchnorm_cls), nn.ReLU()).train(self.training)


class FusedPreActConv2d(_FusedBNAct):
    """``nn.Conv2d(in_channels, out_channels, ...)`` applied to ``act(nn.BatchNorm2d(in_channels)(x))``, fused:
    the pre-activation unit of He et al. 2016 ("Identity Mappings in Deep Residual Networks").

    ``activation`` is ``"relu"`` or ``"prelu"`` (``num_parameters``/``init`` as in :class:`FusedBNPReLU`). The
    BatchNorm and activation parameters and buffers are named as in :class:`FusedBNPReLU` (``weight``, ``bias``,
    ``slope``, ``running_mean``, ...), the convolution's ``conv_weight`` and ``conv_bias`` (initialised as by
    ``nn.Conv2d``). The activation is never stored for backward: backward recomputes it from the input.
    Keyword-only: ``affine``, ``track_running_stats`` (of the BatchNorm) and ``backend``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=False,
                 activation="relu", eps=1e-5, momentum=0.1, num_parameters=None, init=0.25, device=None, dtype=None,
                 *, affine=True, track_running_stats=True, backend=None):
        if activation not in ("relu", "prelu"):
            raise ValueError(f"activation: expected 'relu' or 'prelu', got {activation!r}")
        if activation == "relu" and num_parameters is not None:
            raise ValueError("num_parameters: only meaningful with activation='prelu'")
        super().__init__(in_channels, eps, momentum, affine, track_running_stats, device, dtype, backend)
        if (not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or in_channels % groups
                or out_channels % groups):
            raise ValueError(f"groups: expected a positive int dividing in_channels={in_channels} and "
                             f"out_channels={out_channels}, got {groups!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = _explicit_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.groups = groups
        self.activation = activation
        factory = {"device": device, "dtype": dtype}
        # Registered in the order of BN, act, conv: parameters() lines up with nn.Sequential(bn, act, conv).
        if activation == "prelu":
            self.num_parameters = in_channels if num_parameters is None else num_parameters
            if self.num_parameters not in (1, in_channels):
                raise ValueError(f"num_parameters: expected None, 1 or {in_channels}, got {num_parameters}")
            self.init = init
            self.slope = nn.Parameter(torch.full((self.num_parameters,), float(init), **factory))
        else:
            self.register_parameter("slope", None)
        self.conv_weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory))
        self.conv_bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self._reset_conv_parameters()

    def reset_parameters(self):
        self._reset_bn_parameters()
        if self.slope is not None:
            nn.init.constant_(self.slope, self.init)
        self._reset_conv_parameters()

    def _reset_conv_parameters(self):
        """As nn.Conv2d.reset_parameters."""
        nn.init.kaiming_uniform_(self.conv_weight, a=math.sqrt(5))
        if self.conv_bias is not None:
            fan_in = self.conv_weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.conv_bias, -bound, bound)

    def forward(self, input):
        return self._apply_fused(input, functional.preact_conv2d, self._tensor("slope"), self._tensor("conv_weight"),
                                 self._tensor("conv_bias"), stride=self.stride, padding=self.padding,
                                 dilation=self.dilation, groups=self.groups)

    def extra_repr(self):
        conv = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.conv_bias is not None}")
        act = f"activation={self.activation!r}"
        if self.slope is not None:
            act += f", num_parameters={self.num_parameters}"
        return f"{conv}, {act}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, " \
               f"track_running_stats={self.track_running_stats}"

    @classmethod
    def from_modules(cls, bn, act, conv):
        """The fused equivalent of ``bn`` (nn.BatchNorm2d), then ``act`` (nn.ReLU or nn.PReLU), then ``conv``
        (nn.Conv2d with zero padding), parameters and buffers copied."""
        if not isinstance(bn, nn.BatchNorm2d):  # not an nn.SyncBatchNorm either: this module has no synchronized kind
            raise TypeError(f"bn: expected an nn.BatchNorm2d module (before a Conv2d), got {type(bn).__name__}")
        if not isinstance(act, (nn.ReLU, nn.PReLU)):
            raise TypeError(f"act: expected an nn.ReLU or nn.PReLU module, got {type(act).__name__}")
        if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
            raise TypeError(f"conv: expected an nn.Conv2d module, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv: expected padding_mode='zeros', got {conv.padding_mode!r}")
        kwargs = cls._bn_kwargs(bn, act, conv)
        if conv.in_channels != bn.num_features:
            raise ValueError(f"conv: expected in_channels={bn.num_features} (the BatchNorm's features), got "
                             f"{conv.in_channels}")
        prelu = isinstance(act, nn.PReLU)
        if prelu and act.num_parameters not in (1, bn.num_features):
            raise ValueError(f"act: expected num_parameters 1 or {bn.num_features}, got {act.num_parameters}")
        fused = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, "prelu" if prelu else "relu", kwargs["eps"],
            kwargs["momentum"], act.num_parameters if prelu else None, act.init if prelu else 0.25,
            device=kwargs.get("device"), dtype=kwargs.get("dtype"), affine=kwargs["affine"],
            track_running_stats=kwargs["track_running_stats"],
        )
        fused._load_bn(bn)
        _copy_parameter(fused.conv_weight, conv.weight)
        if conv.bias is not None:
            _copy_parameter(fused.conv_bias, conv.bias)
        if prelu:
            _copy_parameter(fused.slope, act.weight)
        return fused

    def to_modules(self, batchnorm_cls=None):
        """``nn.Sequential(BatchNorm, ReLU/PReLU, nn.Conv2d)`` computing the same function."""
        factory = self._factory()
        bn = self._to_batchnorm(batchnorm_cls or self.batchnorm_cls)
        if self.slope is None:
            act = nn.ReLU()
        else:
            act = nn.PReLU(self.num_parameters, self.init, **factory)
            _copy_parameter(act.weight, self.slope)
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.conv_bias is not None, **factory)
        _copy_parameter(conv.weight, self.conv_weight)
        if self.conv_bias is not None:
            _copy_parameter(conv.bias, self.conv_bias)
        return nn.Sequential(bn, act, conv).train(self.training)


def _copy_parameter(dst, src):
    """``src``'s values into ``dst``, and whether it trains: a frozen parameter stays frozen."""
    with torch.no_grad():
        dst.copy_(src)
    dst.requires_grad_(src.requires_grad)


def _copy_trainable(dst, src):
    """Whether each BatchNorm parameter of ``src`` trains, onto ``dst``'s (values come with the state_dict)."""
    for name in _BN_PARAMETERS:
        parameter = getattr(src, name, None)
        if parameter is not None:
            getattr(dst, name).requires_grad_(parameter.requires_grad)


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _explicit_padding(padding, kernel_size, stride, dilation):
    """``padding`` as a pair: as nn.Conv2d takes it, an int, a pair, ``"valid"`` or ``"same"`` (stride 1, and only
    where it pads symmetrically: FusedPreActConv2d pads both sides alike)."""
    if not isinstance(padding, str):
        return _pair(padding)
    if padding == "valid":
        return (0, 0)
    if padding != "same":
        raise ValueError(f"padding: expected an int, a pair, 'valid' or 'same', got {padding!r}")
    if any(s != 1 for s in stride):
        raise ValueError(f"padding: 'same' needs stride 1 (as nn.Conv2d), got stride={stride}")
    total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
    if any(t % 2 for t in total):
        raise ValueError(f"padding: 'same' with kernel_size={kernel_size} and dilation={dilation} pads "
                         "asymmetrically, which FusedPreActConv2d does not support")
    return tuple(t // 2 for t in total)
