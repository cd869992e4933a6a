"""Pre-activation residual networks (He et al. 2016, "Identity Mappings in Deep Residual Networks").

A full pre-activation unit computes ``x + F(x)`` where F is a chain of BN -> act -> conv: the shortcut stays a
clean identity. ``fused=True`` builds every BN -> act -> conv as one :class:`FusedPreActConv2d` (the
activation is never stored); ``fused=False`` builds the same network from ``nn.BatchNorm2d``, ``nn.ReLU`` /
``nn.PReLU`` and ``nn.Conv2d`` (each unit an ``nn.Sequential(bn, act, conv)``), for comparisons.
``fusedrect.revert_model`` turns the first into the second, weights and state_dict keys included;
``fusedrect.convert_model`` turns the second into an equivalent fused network whose state_dict keys are not the
first's (each unit keeps its ``nn.Sequential`` indices), so checkpoints move between the kinds through
``revert_model`` and the plain network's keys.

Where a unit changes shape, the pre-activation is computed once and feeds both the residual branch and the
1x1 projection shortcut (as in the paper's code): that one activation is stored, by a fused BN + act module.
The fused ImageNet stem pools with ``MaxPool2dSavingIndices``, which keeps only its indices for backward.
Convolutions are initialised as in He et al. 2015 for the network's rectifier (``fusedrect.init``).
"""
import torch
from torch import nn

from fusedrect import init
from fusedrect.modules import FusedBNPReLU, FusedBNReLU, FusedPreActConv2d

_CIFAR_BLOCKS = {20: "basic", 32: "basic", 44: "basic", 56: "basic", 110: "basic", 164: "bottleneck",
                 1001: "bottleneck"}
_IMAGENET_LAYERS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
                    101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}
DEPTHS = tuple(sorted({*_CIFAR_BLOCKS, *_IMAGENET_LAYERS}))  # what preact_resnet builds
PRELU_INIT = 0.25


def bn_act(channels, activation, fused):
    """BatchNorm2d then the activation: fused, or as nn.Sequential(bn, act)."""
    if fused:
        return FusedBNPReLU(channels, init=PRELU_INIT) if activation == "prelu" else FusedBNReLU(channels)
    act = nn.PReLU(channels, init=PRELU_INIT) if activation == "prelu" else nn.ReLU()
    return nn.Sequential(nn.BatchNorm2d(channels), act)


def preact_conv(in_channels, out_channels, kernel_size, stride, activation, fused):
    """BN -> act -> conv (bias-free, "same" padding for odd kernels): fused, or as nn.Sequential(bn, act, conv)."""
    padding = kernel_size // 2
    if fused:
        prelu = {"activation": "prelu", "init": PRELU_INIT} if activation == "prelu" else {}
        return FusedPreActConv2d(in_channels, out_channels, kernel_size, stride, padding, **prelu)
    return nn.Sequential(*bn_act(in_channels, activation, False),
                         nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False))


class _MaxPoolIndices(torch.autograd.Function):
    """Max pooling that keeps only its argmax indices for backward (nn.MaxPool2d also keeps its input, whose
    values its backward never reads: it scatters the gradient to the indices)."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding):
        out, indices = torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        ctx.input_geometry = (x.shape, x.stride())
        ctx.pool = (kernel_size, stride, padding)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        like = torch.empty_strided(*ctx.input_geometry, dtype=grad.dtype, device=grad.device)  # shape, layout only
        kernel_size, stride, padding = ctx.pool
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, like, kernel_size, stride, padding, [1, 1], False,
                                                               indices), None, None, None


class MaxPool2dSavingIndices(nn.MaxPool2d):
    """``nn.MaxPool2d`` (no dilation, floor mode) that saves only its indices for backward: the ImageNet stem's
    pool, whose input is the largest activation of the network."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__(kernel_size, stride, padding)

    def forward(self, input):
        if not (torch.is_grad_enabled() and input.requires_grad):
            return super().forward(input)
        pair = nn.modules.utils._pair
        return _MaxPoolIndices.apply(input, pair(self.kernel_size), pair(self.stride), pair(self.padding))


class _PreActBlock(nn.Module):
    """The shared forward of the pre-activation blocks: ``units`` (BN -> act -> conv each) on the residual
    branch; with a projection, the first unit's pre-activation ``preact`` is computed once and feeds both the
    branch (through ``first_conv``) and the 1x1 ``shortcut``."""

    def _build(self, in_channels, out_channels, stride, shapes, activation, fused):
        """``shapes``: (in, out, kernel, stride) of each unit of the residual branch."""
        self.projection = stride != 1 or in_channels != out_channels
        first, *rest = shapes
        if self.projection:
            self.preact = bn_act(in_channels, activation, fused)
            self.first_conv = nn.Conv2d(first[0], first[1], first[2], first[3], first[2] // 2, bias=False)
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
        else:
            self.first = preact_conv(*first, activation, fused)
        self.units = nn.Sequential(*(preact_conv(*shape, activation, fused) for shape in rest))

    def forward(self, x):
        if self.projection:
            a = self.preact(x)
            return self.units(self.first_conv(a)) + self.shortcut(a)
        return self.units(self.first(x)) + x


class PreActBasicBlock(_PreActBlock):
    """Two 3x3 pre-activation units (the first with ``stride``), plus the shortcut."""

    expansion = 1

    def __init__(self, in_channels, planes, stride=1, activation="relu", fused=True):
        super().__init__()
        self._build(in_channels, planes, stride, [(in_channels, planes, 3, stride), (planes, planes, 3, 1)],
                    activation, fused)


class PreActBottleneck(_PreActBlock):
    """1x1 (reduce to ``planes``), 3x3 (with ``stride``), 1x1 (expand to 4 * ``planes``) pre-activation units,
    plus the shortcut."""

    expansion = 4

    def __init__(self, in_channels, planes, stride=1, activation="relu", fused=True):
        super().__init__()
        out = planes * self.expansion
        self._build(in_channels, out, stride,
                    [(in_channels, planes, 1, 1), (planes, planes, 3, stride), (planes, out, 1, 1)], activation, fused)


class PreActResNet(nn.Module):
    """A stem, stages of pre-activation blocks, a final BN -> act, global average pooling and a classifier."""

    def __init__(self, block, stages, stem, stem_channels, num_classes, activation, fused):
        super().__init__()
        self.stem = stem
        layers, channels = [], stem_channels
        for planes, blocks, stride in stages:
            for j in range(blocks):
                layers.append(block(channels, planes, stride if j == 0 else 1, activation, fused))
                channels = planes * block.expansion
        self.stages = nn.Sequential(*layers)
        self.final = bn_act(channels, activation, fused)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _he_init(self, PRELU_INIT if activation == "prelu" else 0.0)

    def forward(self, x):
        return self.fc(self.pool(self.final(self.stages(self.stem(x)))).flatten(1))


def _he_init(model, slope):
    """He et al. 2015 for every convolution: std = sqrt(2 / ((1 + slope^2) * fan_in)), ``slope`` being the
    initial negative slope of the network's rectifiers."""
    for module in model.modules():
        if isinstance(module, FusedPreActConv2d):
            init.kaiming_normal_(module.conv_weight, slope=slope)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, slope=slope)


def preact_resnet(depth, num_classes=None, width=None, activation="relu", fused=True):
    """A pre-activation ResNet of ``depth`` layers.

    CIFAR-style (32x32 inputs; depths 20, 32, 44, 56, 110 with basic blocks, 164 and 1001 with bottlenecks):
    a 3x3 stem of ``width`` channels (default 16), three stages of ``width``, 2x and 4x channels; 10 classes by
    default. ImageNet-style (224x224 inputs; depths 18, 34 basic, 50, 101, 152 bottleneck): a 7x7 stride-2 stem
    of ``width`` channels (default 64) with BN -> act and a max pool, four stages; 1000 classes by default.
    ``activation``: ``"relu"`` or ``"prelu"`` (channel-wise slopes, initialised to 0.25). ``num_classes=0``
    gives a head of no outputs, as ``nn.Linear(c, 0)`` (None: the default).
    """
    if activation not in ("relu", "prelu"):
        raise ValueError(f"activation: expected 'relu' or 'prelu', got {activation!r}")
    if width is not None and (not isinstance(width, int) or width < 1):
        raise ValueError(f"width: expected a positive int, got {width!r}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 0):
        raise ValueError(f"num_classes: expected a non-negative int or None, got {num_classes!r}")
    if depth in _CIFAR_BLOCKS:
        bottleneck = _CIFAR_BLOCKS[depth] == "bottleneck"
        block = PreActBottleneck if bottleneck else PreActBasicBlock
        per_stage = (depth - 2) // (9 if bottleneck else 6)
        width = width or 16
        stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        stages = [(width, per_stage, 1), (2 * width, per_stage, 2), (4 * width, per_stage, 2)]
        return PreActResNet(block, stages, stem, width, 10 if num_classes is None else num_classes, activation, fused)
    if depth in _IMAGENET_LAYERS:
        kind, blocks = _IMAGENET_LAYERS[depth]
        block = PreActBottleneck if kind == "bottleneck" else PreActBasicBlock
        width = width or 64
        pool = MaxPool2dSavingIndices(3, 2, 1) if fused else nn.MaxPool2d(3, 2, 1)
        stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), bn_act(width, activation, fused), pool)
        stages = [(width * 2**i, n, 1 if i == 0 else 2) for i, n in enumerate(blocks)]
        return PreActResNet(block, stages, stem, width, 1000 if num_classes is None else num_classes, activation, fused)
    raise ValueError(f"depth: expected one of {sorted(_CIFAR_BLOCKS)} (CIFAR-style) or {sorted(_IMAGENET_LAYERS)} "
                     f"(ImageNet-style), got {depth!r}")
