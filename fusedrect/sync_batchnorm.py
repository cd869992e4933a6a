"""Synchronized fused modules, ``FusedSyncBNPReLU`` and ``FusedSyncBNReLU``, and ``convert_sync_batchnorm``, the
counterpart of ``nn.SyncBatchNorm.convert_sync_batchnorm`` for models holding fused modules.

In training, within an initialised ``torch.distributed`` process group of several ranks, the batch statistics
span the batches of every rank (see fusedrect/ops/sync_bn.py); otherwise, and in eval mode, the modules are
exactly FusedBNPReLU / FusedBNReLU (same parameters, buffers, state_dict keys and kernels).
"""
from torch import nn
from torch.nn.utils import parametrize

from fusedrect import functional
from fusedrect.modules import FusedBNPReLU, FusedBNReLU, FusedPreActConv2d, _FusedBNAct


class _SyncMixin:
    """What the two synchronized modules add to their unsynchronized base: the process group, the synchronized
    training forward, and conversion to and from nn.SyncBatchNorm."""

    def _init_sync(self, process_group, memory_efficient):
        if memory_efficient:
            raise ValueError(f"memory_efficient: not supported by {type(self).__name__} (its backward halves "
                             "recompute from the input); use memory_efficient=False")
        self.process_group = process_group

    def _sync_forward(self, input, fn, *extra):
        if not self.training:  # as nn.SyncBatchNorm: no synchronization in eval mode
            return super().forward(input)
        return self._apply_fused(input, fn, *extra, process_group=self.process_group)

    def to_modules(self, batchnorm_cls=None):
        """``nn.Sequential(nn.SyncBatchNorm, activation)`` with this module's process group (``batchnorm_cls``
        builds another BatchNorm class)."""
        modules = super().to_modules(batchnorm_cls or nn.SyncBatchNorm)
        if isinstance(modules[0], nn.SyncBatchNorm):
            modules[0].process_group = self.process_group
        return modules

    @classmethod
    def _sync_from_modules(cls, from_modules, bn, act, process_group):
        fused = from_modules(bn, act)
        if process_group is None and isinstance(bn, nn.SyncBatchNorm):
            process_group = bn.process_group
        fused.process_group = process_group
        return fused

    def extra_repr(self):
        group = "" if self.process_group is None else f", process_group={self.process_group}"
        return super().extra_repr() + group


class FusedSyncBNPReLU(_SyncMixin, FusedBNPReLU):
    """``nn.SyncBatchNorm(num_features)`` followed by ``nn.PReLU(num_parameters)``, fused: :class:`FusedBNPReLU`
    whose training statistics span every rank of ``process_group`` (None: the whole world). Every rank of the
    group must call forward and backward; batches may differ in size (empty included). The memory-efficient mode
    is not supported."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 num_parameters=None, init=0.25, process_group=None, device=None, dtype=None, *, backend=None,
                 memory_efficient=False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, num_parameters, init, device,
                         dtype, backend=backend)
        self._init_sync(process_group, memory_efficient)

    def forward(self, input):
        return self._sync_forward(input, functional.sync_bn_prelu, self.slope)

    @classmethod
    def from_modules(cls, bn, act, process_group=None):
        """The fused equivalent of ``bn`` (any BatchNorm, nn.SyncBatchNorm included: its process group is the
        default) followed by the ``nn.PReLU`` ``act``."""
        return cls._sync_from_modules(super().from_modules, bn, act, process_group)


class FusedSyncBNReLU(_SyncMixin, FusedBNReLU):
    """``nn.SyncBatchNorm(num_features)`` followed by ``nn.ReLU()``, fused: :class:`FusedBNReLU` whose training
    statistics span every rank of ``process_group``, as :class:`FusedSyncBNPReLU`."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, *, backend=None, memory_efficient=False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, backend=backend)
        self._init_sync(process_group, memory_efficient)

    def forward(self, input):
        return self._sync_forward(input, functional.sync_bn_relu)

    @classmethod
    def from_modules(cls, bn, act, process_group=None):
        """The fused equivalent of ``bn`` (nn.SyncBatchNorm included) followed by the ``nn.ReLU`` ``act``."""
        return cls._sync_from_modules(super().from_modules, bn, act, process_group)


def convert_sync_batchnorm(model, process_group=None):
    """``model`` with every BatchNorm synchronized over ``process_group`` (None: the whole world), changed in
    place as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does (a converted root is returned instead):
    FusedBNPReLU / FusedBNReLU become FusedSyncBNPReLU / FusedSyncBNReLU, and plain ``nn.BatchNorm1d/2d/3d``
    become ``nn.SyncBatchNorm`` (that one runs on GPU tensors only). Parameters and buffers are the same tensor
    objects (an optimizer built before still holds them); train/eval state and backend are kept. Modules that are
    already synchronized get ``process_group``.

    fusedrect.convert_model fuses nn.SyncBatchNorm -> ReLU/PReLU pairs into the synchronized modules too, so it may
    run before or after this one. A FusedPreActConv2d (convert_model's, where it ran first) has no synchronized
    version: it becomes ``nn.Sequential(FusedSyncBN<act>, nn.Conv2d)`` holding its tensors (its state_dict keys
    move under ``0.`` and ``1.``: ``conv_weight`` becomes ``1.weight``). A module in the memory-efficient mode
    raises, as does a fused module with parametrized tensors (``torch.nn.utils.parametrize``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    return _convert(model, process_group, "")


def _convert(module, process_group, path):
    if isinstance(module, _FusedBNAct) and parametrize.is_parametrized(module):
        names = ", ".join(module.parametrizations)
        raise ValueError(f"model: {path or 'the model'} has parametrized tensors ({names}), which its synchronized "
                         "version would not carry over; convert before torch.nn.utils.parametrize.register_"
                         "parametrization, or remove_parametrizations() first")
    if isinstance(module, FusedBNPReLU):
        converted = _synchronized(FusedSyncBNPReLU, module, process_group, path,
                                  num_parameters=module.num_parameters, init=module.init)
    elif isinstance(module, FusedBNReLU):
        converted = _synchronized(FusedSyncBNReLU, module, process_group, path)
    elif isinstance(module, FusedPreActConv2d):
        converted = _synchronized_preact(module, process_group, path)
    elif isinstance(module, _FusedBNAct):
        raise ValueError(f"model: {path or 'the model'} is a {type(module).__name__}, which has no synchronized "
                         "version; fusedrect.revert_model() it (its BatchNorm then converts to nn.SyncBatchNorm)")
    else:
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group) if isinstance(
            module, nn.modules.batchnorm._BatchNorm) else module
    for name, child in module.named_children():
        converted.add_module(name, _convert(child, process_group, f"{path}.{name}" if path else name))
    return converted


def _synchronized(cls, module, process_group, path, **extra):
    """A ``cls`` holding ``module``'s parameters and buffers themselves."""
    if getattr(module, "memory_efficient", False):
        raise ValueError(f"model: {path or 'the model'} uses memory_efficient=True, which {cls.__name__} does not "
                         "support; build it with memory_efficient=False first")
    synced = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                 process_group=process_group, backend=module.backend, device="meta", **extra)
    own = {name for name, _ in [*synced.named_parameters(recurse=False), *synced.named_buffers(recurse=False)]}
    for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if name in own:  # a FusedPreActConv2d also holds its convolution's
            setattr(synced, name, tensor)
    return synced.train(module.training)


def _synchronized_preact(module, process_group, path):
    """``nn.Sequential(synchronized BN + act, nn.Conv2d)`` holding the FusedPreActConv2d ``module``'s tensors."""
    if module.slope is None:
        bn_act = _synchronized(FusedSyncBNReLU, module, process_group, path)
    else:
        bn_act = _synchronized(FusedSyncBNPReLU, module, process_group, path, num_parameters=module.num_parameters,
                               init=module.init)
    conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                     module.dilation, module.groups, module.conv_bias is not None, device="meta")
    conv.weight = module.conv_weight
    conv.bias = module.conv_bias
    return nn.Sequential(bn_act, conv).train(module.training)
