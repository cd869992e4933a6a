"""Swap BatchNorm -> ReLU/PReLU pairs, and BatchNorm2d -> ReLU/PReLU -> Conv2d pre-activation chains, of an
existing model for the fused modules, and back.

``torch.fx`` traces the model's ``forward`` (through containers, ``nn.Sequential`` included, down to the
BatchNorm, activation and convolution modules) and finds them where they are called one after another: a
BatchNorm node whose only user is a ReLU/PReLU (module, ``F.relu``, ``torch.relu`` or ``.relu()``); a chain where
that activation is a module called only there whose only user is a Conv2d module called only there (a
functional relu stays in the code, so it cannot be moved before a convolution: such a BatchNorm is fused with its
activation only). The model is patched in place (no GraphModule: it keeps its class, methods and state): the
BatchNorm's place holds the fused module, the activation's and the convolution's ``nn.Identity``, so that inside
``nn.Sequential`` indices and state_dict keys stay. A module that does not trace is searched child by child, and
reported; an ``nn.Sequential`` among them (with nn.Sequential's forward, which calls its children in a row) is
then taken structurally, a BatchNorm directly followed by its activation (and a Conv2d) in it fused.
An ``nn.SyncBatchNorm`` becomes the synchronized module (FusedSyncBNReLU / FusedSyncBNPReLU, its process group
kept), with its activation only: FusedPreActConv2d has no synchronized version. A module called at several
places is fused where each call is the same pair or chain; a ReLU module held at several places first gets a
copy at each (it holds no state). Left alone, and reported: a BatchNorm whose output is also used elsewhere
(its normalised output would be lost) or whose calls are followed by different activations; a BatchNorm, PReLU
or convolution module held at several places in the model (its one set of parameters would become several), a
PReLU also called after something else; one with hooks or parametrizations (a hook would no longer run, a
parametrization would be frozen into plain values: legacy ``spectral_norm``/``weight_norm`` are such hooks); a
BatchNorm with ``bias=False`` (the fused modules always have a bias).
"""
import collections
import copy
import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from fusedrect.modules import FusedBNPReLU, FusedBNReLU, FusedPreActConv2d, _FusedBNAct
from fusedrect.sync_batchnorm import FusedSyncBNPReLU, FusedSyncBNReLU

logger = logging.getLogger("fusedrect")

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)


@dataclasses.dataclass
class ConversionReport:
    """What convert_model did: fused pairs as (batchnorm path, activation path or call), chains as (batchnorm,
    activation, convolution paths), and what it skipped."""

    fused: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)

    def __str__(self):
        lines = [f"fusedrect.convert_model: fused {len(self.fused)} BatchNorm+activation pair(s) or chain(s)"]
        lines += [f"  fused   {' -> '.join(entry)}" for entry in self.fused]
        lines += [f"  skipped {where}: {why}" for where, why in self.skipped]
        return "\n".join(lines)


def convert_model(model, inplace=False):
    """``model`` with its BatchNorm -> ReLU/PReLU pairs replaced by FusedBNReLU / FusedBNPReLU (nn.SyncBatchNorm
    -> ReLU/PReLU by FusedSyncBNReLU / FusedSyncBNPReLU), and its BatchNorm2d -> ReLU/PReLU -> Conv2d chains by
    FusedPreActConv2d.

    Parameters, running statistics, device, dtype and train/eval state are kept. ``inplace=False`` converts a
    deep copy (sharing the process groups). The report of what was fused and skipped is logged (logger
    "fusedrect") and attached to the result as ``fusedrect_report``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    model = model if inplace else _copy(model)
    report = ConversionReport()
    _unshare_relus(model)
    _convert_traced(model, "", report, _shared(model))
    logger.info("%s", report)
    model.fusedrect_report = report
    return model


def _copy(model):
    """A deep copy of ``model`` that shares its modules' process groups (which cannot be copied)."""
    memo = {}
    for module in model.modules():
        group = getattr(module, "process_group", None)
        if group is not None:
            memo[id(group)] = group
    return copy.deepcopy(model, memo)


def revert_model(model):
    """``model`` (changed in place) with every fused module replaced by its plain PyTorch equivalent: inside
    ``nn.Sequential``, a fused module followed by ``nn.Identity`` placeholders gets its BatchNorm, activation
    (and convolution) back in those places; elsewhere it becomes ``nn.Sequential(BatchNorm, activation[, conv])``."""
    for child in model.children():
        if not isinstance(child, _FusedBNAct):
            revert_model(child)
    if isinstance(model, nn.Sequential):
        names = list(model._modules)
        for i, name in enumerate(names):
            fused = model._modules[name]
            if not isinstance(fused, _FusedBNAct):
                continue
            plain = list(fused.to_modules())
            places = names[i:i + len(plain)]
            if len(places) == len(plain) and all(type(model._modules[p]) is nn.Identity for p in places[1:]):
                for place, module in zip(places, plain):
                    model._modules[place] = module
    for name, child in list(model.named_children()):
        if isinstance(child, _FusedBNAct):
            setattr(model, name, child.to_modules())
    return model


_BATCHNORM_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


def _is_batchnorm(module):
    """A BatchNorm that computes what nn.BatchNorm does (a subclass with its own forward is left alone), its
    parameters and buffers made (a lazy one before its first forward has none to copy)."""
    return (isinstance(module, nn.modules.batchnorm._BatchNorm) and type(module).forward in _BATCHNORM_FORWARDS
            and not (isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()))


def _is_activation(module):
    """An nn.ReLU or nn.PReLU computing what those do (not a subclass with its own forward)."""
    return isinstance(module, (nn.ReLU, nn.PReLU)) and type(module).forward in (nn.ReLU.forward, nn.PReLU.forward)


def _unshare_relus(model):
    """Gives each further place that holds an nn.ReLU module held at several places its own copy (a ReLU holds no
    state), so that each place can be fused, or become an nn.Identity, on its own; one with hooks stays shared."""
    seen = set()
    for parent in model.modules():
        for name, child in parent._modules.items():
            if type(child) is nn.ReLU and not _has_hooks(child):
                if id(child) in seen:
                    parent._modules[name] = copy.deepcopy(child)
                seen.add(id(child))


def _shared(model):
    """The ids of the modules held in several places (slots of their containers). A container held at several
    places shares its slots: a module swapped in one is swapped in all, so its children are not counted twice."""
    slots = collections.Counter(id(child) for parent in model.modules() for child in parent._modules.values()
                                if child is not None)
    return {key for key, count in slots.items() if count > 1}


# Hooks that fusing would drop: forward and backward ones, and those of the state_dict.
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
          "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _has_hooks(module):
    return any(getattr(module, hooks, None) for hooks in _HOOKS)


def _obstacle(module, shared):
    """Why ``module`` (a BatchNorm, activation or convolution to fuse) must stay as it is, else None."""
    if _has_hooks(module):
        return "has hooks"
    if parametrize.is_parametrized(module):
        return "has parametrizations"
    if id(module) in shared:
        return "is held at several places in the model"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine and module.bias is None:
        return "has no bias (bias=False)"
    return None


def _pair_obstacle(bn, act, shared):
    """Why the pair ``bn`` -> ``act`` must stay as it is (the first module's reason), else None."""
    for module in (bn, act):
        why = _obstacle(module, shared)
        if why is not None:
            return f"{type(module).__name__} {why}"
    return None


def _fusable_activation(bn, act):
    if not _is_activation(act):
        return False
    return isinstance(act, nn.ReLU) or act.num_parameters in (1, bn.num_features)


def _fuse(bn, act):
    """The fused module for ``bn`` -> ``act``: a synchronized one for an nn.SyncBatchNorm (its process group)."""
    sync = isinstance(bn, nn.SyncBatchNorm)
    if isinstance(act, nn.ReLU):
        return (FusedSyncBNReLU if sync else FusedBNReLU).from_modules(bn, act)
    return (FusedSyncBNPReLU if sync else FusedBNPReLU).from_modules(bn, act)


def _chainable(bn, act, conv, shared):
    """True when BatchNorm ``bn``, activation ``act`` (a pair free of obstacles) and ``conv`` can become one
    FusedPreActConv2d."""
    if not (isinstance(bn, nn.BatchNorm2d) and type(conv) is nn.Conv2d and _fusable_activation(bn, act)):
        return False
    if _obstacle(conv, shared) is not None:
        return False
    symmetric = not isinstance(conv.padding, str) or conv.padding == "valid" or all(
        d * (k - 1) % 2 == 0 for d, k in zip(conv.dilation, conv.kernel_size))
    return conv.padding_mode == "zeros" and conv.in_channels == bn.num_features and symmetric


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _built(make):
    """(make(), None), or (None, why) where building the fused module raised: that pair is then skipped and the
    model keeps it, not left half converted."""
    try:
        return make(), None
    except (TypeError, ValueError, RuntimeError) as error:
        return None, f"its fused module could not be built ({type(error).__name__}: {error})"


def _fuse_sequential(module, path, report, shared):
    """Fuses the BatchNorm -> activation (-> Conv2d) runs among the children of ``module``, an nn.Sequential that
    does not trace, whose forward (nn.Sequential's) calls them in a row."""
    names = list(module._modules)
    i = 0
    while i + 1 < len(names):
        bn, act = module._modules[names[i]], module._modules[names[i + 1]]
        conv = module._modules[names[i + 2]] if i + 2 < len(names) else None
        if not (_is_batchnorm(bn) and _fusable_activation(bn, act)):
            i += 1
            continue
        why = _pair_obstacle(bn, act, shared)
        if why is not None:
            report.skipped.append((_join(path, names[i]), why))
            i += 1
            continue
        width = 3 if conv is not None and _chainable(bn, act, conv, shared) else 2
        fused, why = _built(lambda: FusedPreActConv2d.from_modules(bn, act, conv) if width == 3 else _fuse(bn, act))
        if fused is None:
            report.skipped.append((_join(path, names[i]), why))
            i += 1
            continue
        module._modules[names[i]] = fused
        for name in names[i + 1:i + width]:
            module._modules[name] = nn.Identity()
        report.fused.append(tuple(_join(path, name) for name in names[i:i + width]))
        i += width


class _Tracer(fx.Tracer):
    """Traces through containers but stops at BatchNorm, activation and fused modules."""

    def is_leaf_module(self, module, qualified_name):
        return isinstance(module, (_FusedBNAct, nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.PReLU)) or (
            super().is_leaf_module(module, qualified_name))


def _convert_traced(module, path, report, shared):
    """Fuses the pairs that ``module.forward`` calls one after another, patching ``module`` in place (it keeps its
    class, methods and other state): the BatchNorm becomes the fused module and an activation module called
    only there becomes nn.Identity. A ReLU also called elsewhere (or a functional relu) stays in the code: applied
    to the fused output it changes nothing. ``shared``: the ids of modules held at several places."""
    if not any(_is_batchnorm(m) for m in module.modules()) or not list(module.children()):
        return
    try:
        graph = _Tracer().trace(module)
    except Exception as error:  # dynamic control flow and the like: try the children one by one
        report.skipped.append((path or type(module).__name__, f"does not trace ({type(error).__name__}); "
                                                               "searched child by child"))
        for name, child in module.named_children():
            _convert_traced(child, _join(path, name), report, shared)
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            _fuse_sequential(module, path, report, shared)
        return
    _fuse_graph(module, graph, path, report, shared)


def _activation_of(node, modules):
    """The nn.ReLU/PReLU module that ``node`` applies, nn.ReLU() for a functional relu, else None."""
    if node.op == "call_module" and _is_activation(modules.get(node.target)):
        return modules[node.target]
    if (node.op == "call_function" and node.target in _RELU_FUNCTIONS) or (
            node.op == "call_method" and node.target in ("relu", "relu_")):
        return nn.ReLU()
    return None


def _replace(module, target, new):
    parent, _, name = target.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, name, new)


def _fuse_graph(module, graph, path, report, shared):
    """Fuses each BatchNorm module every call of which feeds only the same activation (one module, or a
    functional relu at each), with the convolution that each such activation call feeds alone where they chain.
    A BatchNorm called at several places (a Sequential called twice, a block in a loop) is fused where every call
    is such a pair or chain: the fused module then runs at each of them."""
    modules = dict(module.named_modules())
    calls = collections.defaultdict(list)  # target -> its call_module nodes
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target].append(node)
    for target, bn_nodes in list(calls.items()):
        bn = modules.get(target)
        if not _is_batchnorm(bn):
            continue
        where = _join(path, target)
        act_nodes = [next(iter(node.users)) if len(node.users) == 1 else None for node in bn_nodes]
        if any(node is None or _activation_of(node, modules) is None for node in act_nodes):
            if any(_activation_of(user, modules) is not None for node in bn_nodes for user in node.users):
                report.skipped.append((where, "its output is also used elsewhere"))
            continue
        act = _activation_of(act_nodes[0], modules)
        act_target = act_nodes[0].target if act_nodes[0].op == "call_module" else None
        # every activation call is this module's (or a functional relu everywhere): one activation for the fusion
        kinds = {node.target if node.op == "call_module" else None for node in act_nodes}
        only_here = act_target is not None and len(calls[act_target]) == len(bn_nodes)  # all its calls are here
        obstacle = _pair_obstacle(bn, act, shared)
        if obstacle is not None:
            report.skipped.append((where, obstacle))
        elif len(kinds) > 1:
            report.skipped.append((where, "its calls are followed by different activations"))
        elif isinstance(act, nn.PReLU) and not only_here:
            report.skipped.append((where, f"the PReLU {act_target} is also called elsewhere"))
        elif not _fusable_activation(bn, act):
            report.skipped.append((where, f"PReLU with {act.num_parameters} slopes for {bn.num_features} channels"))
        else:
            conv_target = _chained_conv(act_nodes, only_here, calls, modules, bn, act, shared)
            if conv_target is not None:
                fused, why = _built(lambda: FusedPreActConv2d.from_modules(bn, act, modules[conv_target]))
            else:
                fused, why = _built(lambda: _fuse(bn, act))
            if fused is None:
                report.skipped.append((where, why))
                continue
            _replace(module, target, fused)
            if conv_target is not None:
                _replace(module, act_target, nn.Identity())
                _replace(module, conv_target, nn.Identity())
                report.fused.append((where, _join(path, act_target), _join(path, conv_target)))
                continue
            if only_here:
                _replace(module, act_target, nn.Identity())
            report.fused.append((where, _join(path, act_target or act_nodes[0].name)))


def _chained_conv(act_nodes, only_here, calls, modules, bn, act, shared):
    """The Conv2d module that every call of a BatchNorm -> activation pair (``act_nodes``: its activation's
    calls) feeds alone and that can join it, else None: the activation and the convolution must be modules called
    only there (both become nn.Identity)."""
    if not only_here or any(len(node.users) != 1 for node in act_nodes):
        return None
    conv_nodes = [next(iter(node.users)) for node in act_nodes]
    target = conv_nodes[0].target
    if any(node.op != "call_module" or node.target != target or len(node.args) != 1 or node.kwargs
           for node in conv_nodes):
        return None
    if len(calls[target]) != len(conv_nodes):
        return None
    return target if _chainable(bn, act, modules.get(target), shared) else None
