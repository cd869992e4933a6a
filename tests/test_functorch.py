"""torch.func transforms through the fused modules, against the same plain modules: grad, vjp, jacrev and vmap
(per-sample gradients included). The forward ops' C++ autograd is not for those transforms; under them the ops
run through the autograd.Functions of the direct path."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vjp, vmap

import fusedrect

from conftest import make_input


def pair(activation, running, seed=0):
    """(fused module, the plain equivalent) with random parameters and running statistics."""
    torch.manual_seed(seed)
    if activation == "preact":
        plain = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=running), nn.PReLU(3), nn.Conv2d(3, 4, 3, 1, 1))
    else:
        act = nn.PReLU(3) if activation == "prelu" else nn.ReLU()
        plain = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=running), act)
    with torch.no_grad():
        plain[0].weight.uniform_(0.5, 1.5)
        plain[0].bias.normal_()
        if running:
            plain[0].running_mean.normal_()
            plain[0].running_var.uniform_(0.5, 2)
    if activation == "preact":
        return fusedrect.FusedPreActConv2d.from_modules(*plain), plain
    cls = fusedrect.FusedBNPReLU if activation == "prelu" else fusedrect.FusedBNReLU
    return cls.from_modules(*plain), plain


def parameters(module):
    return {name: p.detach() for name, p in module.named_parameters()}


def loss(module):
    return lambda params, x: functional_call(module, params, (x,)).square().sum()


def assert_same_grads(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


ACTIVATIONS = ["relu", "prelu", "preact"]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_grad_and_per_sample_grads_match_the_plain_modules(activation, training, layout):
    # Training normalises with the batch statistics and keeps none (torch.func cannot update a running buffer
    # in place from inside a transform, for nn.BatchNorm2d either).
    fused, plain = pair(activation, running=not training)
    fused.train(training), plain.train(training)
    x = make_input((4, 3, 5, 5), layout)
    assert_same_grads(grad(loss(fused))(parameters(fused), x).values(),
                      grad(loss(plain))(parameters(plain), x).values())
    assert_same_grads(grad(loss(fused), argnums=1)(parameters(fused), x)[None],
                      grad(loss(plain), argnums=1)(parameters(plain), x)[None])
    batch = make_input((2, 4, 3, 5, 5), layout if layout == "nchw" else "nchw")
    per_sample = vmap(grad(loss(fused)), in_dims=(None, 0))(parameters(fused), batch)
    assert_same_grads(per_sample.values(),
                      vmap(grad(loss(plain)), in_dims=(None, 0))(parameters(plain), batch).values())


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_vjp_jacrev_and_vmap_of_the_forward(activation):
    fused, plain = pair(activation, running=True)
    fused.eval(), plain.eval()
    x = torch.randn(2, 3, 3, 3)
    out, pullback = vjp(fused, x)
    want, want_pullback = vjp(plain, x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    cotangent = torch.randn_like(out)
    assert_same_grads(pullback(cotangent), want_pullback(cotangent))
    torch.testing.assert_close(jacrev(fused)(x), jacrev(plain)(x), atol=1e-5, rtol=1e-5)
    batch = torch.randn(3, 2, 3, 3, 3)
    torch.testing.assert_close(vmap(fused)(batch), vmap(plain)(batch), atol=1e-5, rtol=1e-5)


def test_functional_api_under_grad():
    x = torch.randn(4, 3, 5, 5)
    weight, bias, slope = torch.rand(3) + 0.5, torch.randn(3), torch.rand(3)

    def fused(weight, bias, slope):
        return fusedrect.bn_prelu(x, None, None, weight, bias, slope, training=True).square().sum()

    def plain(weight, bias, slope):
        z = nn.functional.batch_norm(x, None, None, weight, bias, training=True)
        return nn.functional.prelu(z, slope).square().sum()

    assert_same_grads(grad(fused, argnums=(0, 1, 2))(weight, bias, slope),
                      grad(plain, argnums=(0, 1, 2))(weight, bias, slope))


def test_memory_efficient_mode_under_grad_and_vmap():
    fused = fusedrect.FusedBNPReLU(3, track_running_stats=False, memory_efficient=True)
    plain = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), nn.PReLU(3))
    batch = torch.randn(2, 4, 3, 5, 5)
    per_sample = vmap(grad(loss(fused)), in_dims=(None, 0))(parameters(fused), batch)
    assert_same_grads(per_sample.values(),
                      vmap(grad(loss(plain)), in_dims=(None, 0))(parameters(plain), batch).values())


def test_running_statistics_are_left_alone_where_a_transform_refuses_their_update():
    """As for nn.BatchNorm2d: grad refuses the in-place update of a captured running buffer, before it changes."""
    for module in pair("prelu", running=True):
        module.train()
        before = {name: b.clone() for name, b in module.named_buffers()}
        with pytest.raises(RuntimeError, match="in-place operation"):
            grad(loss(module))(parameters(module), torch.randn(4, 3, 5, 5))
        for name, b in module.named_buffers():
            assert torch.equal(b, before[name]), name


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_grad_under_torch_compile(activation):
    """torch.compile of a torch.func.grad over the fused modules (aot_eager: inductor's graphs, without its code
    generation) gives eager torch.func's gradients. (The fused ops break the graph there: traced, the transform
    is not active when the op is chosen. Dynamo had failed outright on the direct Functions' ``*args`` forward.)"""
    fused, _plain = pair(activation, running=True)
    fused.eval()
    x = torch.randn(2, 3, 5, 5)
    step = grad(loss(fused))
    compiled = torch.compile(step, backend="aot_eager")
    assert_same_grads(compiled(parameters(fused), x).values(), step(parameters(fused), x).values())
