"""The fused modules as drop-in replacements of nn.BatchNorm{1,2,3}d + nn.PReLU/nn.ReLU: outputs, gradients,
parameters and running statistics over optimiser steps, every BatchNorm option, eval, empty batches,
conversion to and from the PyTorch modules."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fusedrect
from conftest import (ACTIVATIONS, BATCHNORM, LAYOUTS, SHAPES, check_no_gradient_for_the_output, fused_module,
                      make_input, torch_modules)

BN_OPTIONS = [
    {},
    {"momentum": None},
    {"momentum": 0.3, "eps": 1e-3},
    {"affine": False},
    {"track_running_stats": False},
    {"affine": False, "track_running_stats": False},
]


def train_steps(model, inputs, grads, lr=0.1):
    """Three SGD steps; returns the outputs and input gradients of every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if list(model.parameters()) else None
    results = []
    for x, g in zip(inputs, grads):
        x = x.detach().clone().requires_grad_()
        y = model(x)
        y.backward(g)
        results.append((y.detach(), x.grad))
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
    return results


def canonical_state(model):
    """Floating-point state under the fused module's names, for a fused module or nn.Sequential(bn, act)."""
    if isinstance(model, nn.Sequential):
        state = {k[2:]: v for k, v in model.state_dict().items() if k.startswith("0.")}
        if "1.weight" in model.state_dict():
            state["slope"] = model.state_dict()["1.weight"]
    else:
        state = model.state_dict()
    return {k: v for k, v in state.items() if v.is_floating_point()}


def assert_same_state(fused, pair, atol, rtol):
    bn, act = pair
    expected = dict(bn.state_dict())
    if isinstance(act, nn.PReLU):
        expected["slope"] = act.weight.detach()
    got = fused.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=atol, rtol=rtol, msg=key)


@pytest.mark.parametrize("options", BN_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", sorted(SHAPES))
def test_three_training_steps_then_eval(rank, layout, activation, options):
    shape = SHAPES[rank]
    pair = torch_modules(shape[1], rank, activation, **options)
    fused = fused_module(shape[1], activation, **options)
    fused.load_state_dict(fused.state_dict() | {k: v for k, v in pair[0].state_dict().items()})
    reference = nn.Sequential(*pair)
    inputs = [make_input(shape, layout, scale=2.0, shift=float(i)) for i in range(3)]
    grads = [torch.randn(shape) for _ in range(3)]

    for got, want in zip(train_steps(fused, inputs, grads), train_steps(reference, inputs, grads)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert_same_state(fused, pair, atol=1e-5, rtol=1e-4)

    fused.eval()
    reference.eval()
    for got, want in zip(train_steps(fused, inputs, grads), train_steps(reference, inputs, grads)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bfloat16_three_training_steps(layout, activation):
    """bf16 parameters and input over three SGD steps: outputs, gradients, parameters and running statistics
    within twice PyTorch's own bf16 error of the fp64 result (plus a small atol), at every step."""
    shape = (4, 6, 5, 5)
    exact = nn.Sequential(*torch_modules(6, 4, activation, dtype=torch.float64))
    theirs = copy.deepcopy(exact).to(torch.bfloat16)
    ours = fused_module(6, activation, dtype=torch.bfloat16)
    ours.load_state_dict(ours.state_dict() | {k: v.to(torch.bfloat16) for k, v in exact[0].state_dict().items()})
    models = {"exact": (exact, torch.float64), "theirs": (theirs, torch.bfloat16), "ours": (ours, torch.bfloat16)}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.1) for name, (m, _) in models.items()}
    for step in range(3):
        x = make_input(shape, layout, scale=2.0, shift=1.0 + step)
        g = torch.randn(shape)
        results = {}
        for name, (model, dtype) in models.items():
            xi = x.to(dtype).requires_grad_()
            y = model(xi)
            y.backward(g.to(dtype))
            optimizers[name].step()
            optimizers[name].zero_grad()
            state = canonical_state(model)
            results[name] = [y.double(), xi.grad.double(), *(state[k].double() for k in sorted(state))]
        for got, theirs_, want in zip(results["ours"], results["theirs"], results["exact"]):
            err = (got - want).abs().max().item()
            assert err <= 2 * (theirs_ - want).abs().max().item() + 1e-2 * max(1.0, want.abs().max().item()), step


def test_mixed_precision_input_with_fp32_parameters():
    """bf16 activations with fp32 parameters and statistics (as autocast leaves nn.BatchNorm2d)."""
    layer = fusedrect.FusedBNPReLU(4)
    x = torch.randn(3, 4, 5, 5, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert layer.weight.grad.dtype == layer.slope.grad.dtype == layer.running_mean.dtype == torch.float32


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_empty_batch_behaves_as_pytorch(activation):
    pair = torch_modules(3, 4, activation)
    fused = fused_module(3, activation)
    for model in (fused, nn.Sequential(*pair)):
        x = torch.randn(0, 3, 4, 4, requires_grad=True)
        y = model(x)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
    assert_same_state(fused, pair, atol=0, rtol=0)
    assert int(fused.num_batches_tracked) == 1
    assert fused.weight.grad is not None and not fused.weight.grad.any()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("rank", sorted(SHAPES))
def test_from_modules_to_modules_round_trip(rank, activation):
    bn, act = torch_modules(5, rank, activation, momentum=0.2, eps=1e-4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(7)
        if isinstance(act, nn.PReLU):
            act.weight.uniform_(0, 0.5)
    bn.eval()
    cls = fusedrect.FusedBNReLU if activation == "relu" else fusedrect.FusedBNPReLU
    fused = cls.from_modules(bn, act)
    assert not fused.training and fused.eps == 1e-4 and fused.momentum == 0.2
    assert_same_state(fused, (bn, act), atol=0, rtol=0)

    restored = fused_module(5, activation)
    restored.load_state_dict(fused.state_dict())
    plain = restored.to_modules(BATCHNORM[rank])
    assert isinstance(plain[0], BATCHNORM[rank]) and type(plain[1]) is type(act)
    assert_same_state(fused, (plain[0], plain[1]), atol=0, rtol=0)

    x = torch.randn(SHAPES[rank])
    torch.testing.assert_close(fused(x), act(bn(x)))
    torch.testing.assert_close(fused.to_modules().eval()(x), act(bn(x)))


def test_from_modules_and_to_modules_keep_frozen_parameters_frozen():
    """Fine-tuning with a frozen backbone: which parameters train survives the conversion both ways, and the
    returned Sequential is in the module's mode."""
    bn, act, conv = nn.BatchNorm2d(4), nn.PReLU(4), nn.Conv2d(4, 3, 3, bias=True)
    bn.weight.requires_grad_(False)
    act.weight.requires_grad_(False)
    conv.bias.requires_grad_(False)
    frozen = ("weight", "slope", "conv_bias")
    for fused in (fusedrect.FusedBNPReLU.from_modules(bn, act), fusedrect.FusedPreActConv2d.from_modules(bn, act, conv)):
        assert {name for name, p in fused.named_parameters() if not p.requires_grad} == {
            name for name in frozen if hasattr(fused, name) and getattr(fused, name) is not None}
        plain = fused.eval().to_modules()
        assert not plain.training
        assert [p.requires_grad for p in plain.parameters()] == [p.requires_grad for p in fused.parameters()]
    assert not fusedrect.FusedBNReLU(4).eval().to_modules().training


def test_preact_from_modules_takes_a_batchnorm2d_only():
    for bn in (nn.BatchNorm1d(4), nn.BatchNorm3d(4), nn.SyncBatchNorm(4)):  # no synchronized FusedPreActConv2d
        with pytest.raises(TypeError, match="bn: expected an nn.BatchNorm2d module"):
            fusedrect.FusedPreActConv2d.from_modules(bn, nn.ReLU(), nn.Conv2d(4, 3, 3))


def test_to_modules_defaults_to_the_source_batchnorm_class():
    fused = fusedrect.FusedBNReLU.from_modules(nn.BatchNorm3d(4), nn.ReLU())
    assert isinstance(fused.to_modules()[0], nn.BatchNorm3d)
    assert isinstance(fusedrect.FusedBNReLU(4).to_modules()[0], nn.BatchNorm2d)


@pytest.mark.parametrize("make", [
    lambda bn: fusedrect.FusedBNReLU.from_modules(bn, nn.ReLU()),
    lambda bn: fusedrect.FusedPreActConv2d.from_modules(bn, nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)),
    lambda bn: fusedrect.convert_model(nn.Sequential(bn, nn.ReLU()))[0],
], ids=["from_modules", "preact", "convert_model"])
def test_tracking_turned_off_after_construction_keeps_the_buffers(make):
    """nn's idiom: bn.track_running_stats = False after construction trains on batch statistics, leaves the
    buffers alone and evaluates with them. The fused module, and the BatchNorm it converts back to, do the same."""
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    bn.track_running_stats = False
    fused = make(bn)
    assert not fused.track_running_stats and torch.equal(fused.running_mean, bn.running_mean)
    back = fused.to_modules()[0]
    assert not back.track_running_stats and torch.equal(back.running_var, bn.running_var)
    x = torch.randn(5, 4, 6, 6)
    before = bn.running_mean.clone()
    for module in (bn, fused, back):
        module.train()
        module(x)
        assert torch.equal(module.running_mean, before)  # not updated
        module.eval()
    torch.testing.assert_close(back(x), bn(x), rtol=0, atol=0)
    if isinstance(fused, fusedrect.FusedBNReLU):
        torch.testing.assert_close(fused(x), bn(x).relu(), rtol=1e-6, atol=1e-6)  # eval from the buffers


def test_module_attributes_match_batchnorm():
    layer = fusedrect.FusedBNPReLU(8, dtype=torch.float64)
    bn = nn.BatchNorm2d(8, dtype=torch.float64)
    assert {n for n, _ in layer.named_parameters()} == {n for n, _ in bn.named_parameters()} | {"slope"}
    assert {n for n, _ in layer.named_buffers()} == {n for n, _ in bn.named_buffers()}
    assert layer.slope.shape == (8,) and torch.all(layer.slope == 0.25) and layer.weight.dtype == torch.float64
    assert fusedrect.FusedBNPReLU(8, num_parameters=1, init=0.1).slope.shape == (1,)
    assert repr(layer).startswith("FusedBNPReLU(8, eps=1e-05, momentum=0.1, affine=True")


@pytest.mark.parametrize("module,name", [("prelu", "weight"), ("prelu", "bias"), ("prelu", "slope"),
                                         ("preact", "slope"), ("preact", "conv_weight"), ("preact", "conv_bias")])
def test_parametrized_parameters_are_used(module, name):
    """torch.nn.utils.parametrize moves a parameter out of the module's dict into a property of its class: the
    forward reads the parametrized value, and the gradient reaches the original."""
    class Negated(nn.Module):
        def forward(self, t):
            return -t

    layer = (fusedrect.FusedBNPReLU(4, dtype=torch.float64) if module == "prelu" else
             fusedrect.FusedPreActConv2d(4, 2, 3, padding=1, bias=True, activation="prelu", dtype=torch.float64))
    plain = copy.deepcopy(layer)
    with torch.no_grad():
        getattr(plain, name).neg_()
    torch.nn.utils.parametrize.register_parametrization(layer, name, Negated())
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(y, plain(x))
    y.sum().backward()
    plain(x).sum().backward()
    original = getattr(layer.parametrizations, name).original
    torch.testing.assert_close(original.grad, -getattr(plain, name).grad)


def test_running_statistics_update_is_seen_by_autograd():
    """A buffer saved for another backward and then updated by a training forward makes that backward raise,
    as with nn.BatchNorm2d: the update bumps the buffers' version counters."""
    layer = fusedrect.FusedBNPReLU(5)
    x = torch.randn(4, 5, 3, 3, requires_grad=True)
    y = (x * layer.running_var.view(1, 5, 1, 1)).sum()
    layer(torch.randn(4, 5, 3, 3))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_state_dict_without_num_batches_tracked_loads():
    """Old checkpoints (state_dict version 1) load as into nn.BatchNorm2d."""
    layer = fusedrect.FusedBNReLU(3)
    state = layer.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    layer.load_state_dict(state)
    assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_autocast_bfloat16_behaves_like_batchnorm(activation):
    """Under CPU autocast: fp32 parameters and statistics, bf16 activations in and out, as nn.BatchNorm2d."""
    conv = nn.Conv2d(3, 6, 3, padding=1)
    fused = fused_module(6, activation)
    pair = nn.Sequential(*torch_modules(6, 4, activation))
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        ours, theirs = fused(h), pair(h)
    exact = nn.Sequential(*torch_modules(6, 4, activation, dtype=torch.float64))(h.double())
    assert h.dtype == ours.dtype == theirs.dtype == torch.bfloat16
    assert fused.running_mean.dtype == fused.weight.dtype == torch.float32
    err = (ours.double() - exact).abs().max().item()
    assert err <= 2 * (theirs.double() - exact).abs().max().item() + 1e-2
    torch.testing.assert_close(fused.running_var, pair[0].running_var, atol=1e-3, rtol=1e-3)
    ours.float().sum().backward()
    assert fused.weight.grad.dtype == torch.float32 and conv.weight.grad is not None


def test_double_backward_raises_instead_of_returning_zeros():
    layer = fusedrect.FusedBNPReLU(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="second-order gradients"):
        grad.sum().backward()


@pytest.mark.parametrize("module", ["prelu", "memory_efficient", "preact"])
def test_training_backward_without_a_gradient_for_the_output(module):
    check_no_gradient_for_the_output({
        "prelu": lambda: fusedrect.FusedBNPReLU(3),
        "memory_efficient": lambda: fusedrect.FusedBNPReLU(3, memory_efficient=True),
        "preact": lambda: fusedrect.FusedPreActConv2d(3, 4, 3, padding=1)}[module]())


def test_autograd_nodes_are_cpp():
    """The training graph holds the C++ autograd nodes of csrc/autograd.cpp: no Python runs per layer in backward."""
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    assert "BnActTrain" in fusedrect.FusedBNPReLU(3)(x).grad_fn.name()
    assert "BnActEval" in fusedrect.FusedBNReLU(3).eval()(x).grad_fn.name()
    assert "PreActConvTrain" in fusedrect.FusedPreActConv2d(3, 2, 3, padding=1)(x).grad_fn.name()


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_frozen_batchnorm_backward_is_one_elementwise_pass(layout, activation, affine):
    """In eval mode where no parameter needs a gradient (frozen for fine-tuning, or not asked for), backward needs
    only dx = weight * invstd * dz: it runs the elementwise op alone, without the reduction over (x, dy) that sums
    the parameters' gradients, and gives the input gradient of the full backward op bit for bit."""
    live = fused_module(6, activation, affine=affine).double().eval()
    with torch.no_grad():
        live.running_mean.normal_()
        live.running_var.uniform_(0.5, 2.0)
        if affine:
            live.weight.uniform_(-1.5, 1.5)
    frozen = copy.deepcopy(live).requires_grad_(False)
    x = make_input((5, 6, 7, 3), layout, torch.float64).requires_grad_()
    grad = make_input((5, 6, 7, 3), layout, torch.float64)
    slope = getattr(live, "slope", None)
    expected = torch.ops.fusedrect.bn_act_bwd(grad, x, live.running_mean, (live.running_var + live.eps).rsqrt(),
                                              live.weight, live.bias, slope, False)[0]

    def backward_ops(run):
        with torch.profiler.profile() as prof:
            run()
        return {event.name for event in prof.events()} & {"fusedrect::bn_act_bwd", "fusedrect::bn_act_bwd_elemt"}

    if list(live.parameters()):
        assert backward_ops(lambda: live(x).backward(grad)) == {"fusedrect::bn_act_bwd"}
        assert torch.equal(x.grad, expected)
    for module in (frozen, live):  # live: only x's gradient asked for
        got = []
        assert backward_ops(lambda: got.extend(torch.autograd.grad(module(x), x, grad))) == {
            "fusedrect::bn_act_bwd_elemt"}
        assert torch.equal(got[0], expected)
    assert torch.autograd.gradcheck(frozen, (x,))


@pytest.mark.parametrize("state", ["train", "eval", "eval_frozen", "eval_slope_only"])
def test_backward_unpacks_each_saved_tensor_once(state):
    """Saved-tensor hooks see one unpack per pack, so non-reentrant activation checkpointing (which allows no
    second unpack) works in every mode, the frozen backward and its fallback included."""
    module = fusedrect.FusedBNPReLU(4).train(state == "train")
    if state == "eval_frozen":
        module.requires_grad_(False)
    if state == "eval_slope_only":
        module.weight.requires_grad_(False)
        module.bias.requires_grad_(False)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    grad = torch.randn(3, 4, 5, 5)
    counts = {"pack": 0, "unpack": 0}

    def pack(t):
        counts["pack"] += 1
        return t

    def unpack(t):
        counts["unpack"] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = module(x)
    y.backward(grad)
    assert counts["pack"] > 0 and counts["unpack"] == counts["pack"]
    expected = x.grad.clone()
    x.grad = None
    checkpoint(module, x, use_reentrant=False).backward(grad)
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_checkpoint_keeps_the_count_and_the_statistics_in_step(momentum):
    """A non-reentrant checkpoint stops recomputing the forward at the op that saves backward's last tensor,
    before the running statistics' update: the batch count skips it too (each batch counted once, its statistics
    blended once, as without checkpointing)."""
    plain, checkpointed = fusedrect.FusedBNReLU(2, momentum=momentum), fusedrect.FusedBNReLU(2, momentum=momentum)
    for i in range(4):
        x = torch.randn(8, 2, 4, 4) + i
        plain(x).sum().backward()
        checkpoint(checkpointed, x.requires_grad_(), use_reentrant=False).sum().backward()
    assert int(checkpointed.num_batches_tracked) == int(plain.num_batches_tracked) == 4
    torch.testing.assert_close(checkpointed.running_mean, plain.running_mean)
    torch.testing.assert_close(checkpointed.running_var, plain.running_var)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 3, 40, 40), (64, 3, 3, 3), (64, 3, 7, 7)], ids=str)
def test_overflowing_squares_give_an_infinite_variance(layout, shape):
    """|x| ~ 1e25 in fp32: its squares overflow. As nn.BatchNorm2d: the variance (and running variance) infinite,
    invstd 0, the output the bias (relu'd), not NaN. Long NCHW runs take two passes, short runs and channels-last
    the shifted sums."""
    x = make_input(shape, layout, scale=1e25)
    module = fusedrect.FusedBNReLU(3)
    with torch.no_grad():
        module.bias.copy_(torch.tensor([0.5, -0.5, 2.0]))
    y = module(x)
    torch.testing.assert_close(y, torch.tensor([0.5, 0.0, 2.0]).view(1, 3, 1, 1).expand_as(y))
    assert torch.isinf(module.running_var).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(4, 0, 3, 3), (4, 0, 7, 7), (4, 0)], ids=str)
def test_training_with_zero_channels(shape, layout):
    """No channel in training (statistics of nothing): an empty output and gradient of x's shape, for BatchNorm
    + ReLU and + PReLU (a shared slope); nn.BatchNorm's training forward raises an IndexError here."""
    for layer in (fusedrect.FusedBNReLU(0), fusedrect.FusedBNPReLU(0, num_parameters=1)):
        x = make_input(shape, layout if len(shape) > 2 else "nchw").requires_grad_()
        y = layer.train()(x)
        (grad,) = torch.autograd.grad(y, x, torch.ones(shape))
        assert y.shape == grad.shape == x.shape
        assert layer.running_mean.shape == layer.running_var.shape == (0,)
        assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("shape", [(4, 0, 3, 3), (4, 0), (0, 0, 2)], ids=str)
def test_frozen_backward_of_zero_channels(shape):
    """No channel: an empty gradient of x's shape, as nn.BatchNorm gives."""
    layer = fusedrect.FusedBNReLU(0).eval().requires_grad_(False)
    x = torch.randn(shape, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x), x, torch.ones(shape))
    assert grad.shape == x.shape
