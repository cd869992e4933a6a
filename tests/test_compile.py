"""torch.compile(fullgraph=True) through the fused modules (FusedPreActConv2d included) on CPU: no graph break,
no recompilation across steps of the same shape, in training (forward + backward) and eval, with outputs equal
to eager."""
import copy

import pytest
import torch

from conftest import ACTIVATIONS, LAYOUTS, fused_module, make_input
from fusedrect import FusedPreActConv2d


def steps(model, inputs, train):
    model.train(train)
    outputs = []
    for x in inputs:
        x = x.detach().clone().requires_grad_(train)
        y = model(x)
        if train:
            y.square().sum().backward()
        outputs.append((y.detach(), x.grad))
    return outputs


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fullgraph_without_recompiles(layout, activation, momentum):
    check_fullgraph_without_recompiles(fused_module(6, activation, momentum=momentum),
                                       [make_input((4, 6, 5, 5), layout, shift=float(i)) for i in range(3)])


@pytest.mark.parametrize("activation", ["relu", "prelu"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_preact_conv_fullgraph_without_recompiles(layout, activation):
    unit = FusedPreActConv2d(6, 4, 3, 2, 1, bias=True, activation=activation)
    check_fullgraph_without_recompiles(unit, [make_input((4, 6, 5, 5), layout, shift=float(i)) for i in range(3)])


def check_fullgraph_without_recompiles(eager, inputs):
    torch._dynamo.reset()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for train in (True, False):
        expected = steps(eager, inputs, train)
        got = steps(compiled, inputs[:1], train)  # compiles
        with torch._dynamo.config.patch(error_on_recompile=True):
            got += steps(compiled, inputs[1:], train)
        for (y, dx), (y_ref, dx_ref) in zip(got, expected):
            torch.testing.assert_close(y, y_ref)
            if train:
                torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(compiled_module.running_var, eager.running_var)
    assert int(compiled_module.num_batches_tracked) == int(eager.num_batches_tracked)


def test_inductor_runs_the_fused_ops():
    torch._dynamo.reset()
    eager = fused_module(8, "prelu")
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    x = make_input((4, 8, 6, 6), "channels_last")
    for got, want in zip(steps(compiled, [x, x], True), steps(eager, [x, x], True)):
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_training_batch_sizes_share_a_graph(activation):
    """New batch sizes in training make the graph dynamic (as for nn.BatchNorm2d + activation), not one graph each:
    the running statistics' update once took the batch's element count as an op argument, a specialised int."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    eager = fused_module(6, activation, momentum=None)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for n in range(2, 7):
        x = make_input((n, 6, 3, 3), shift=float(n))
        torch.testing.assert_close(compiled(x), eager(x))
    assert counters["stats"]["unique_graphs"] <= 2
    torch.testing.assert_close(compiled_module.running_mean, eager.running_mean)
    torch.testing.assert_close(compiled_module.running_var, eager.running_var)
    assert int(compiled_module.num_batches_tracked) == int(eager.num_batches_tracked) == 5


@pytest.mark.parametrize("train", [True, False])
def test_dynamic_fullgraph(train):
    """dynamic=True makes the modules' float attributes (momentum, eps) symbolic: their checks still trace."""
    torch._dynamo.reset()
    eager = fused_module(6, "prelu").train(train)
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (3, 5):
        x = make_input((n, 6, 4, 4), shift=1.0)
        torch.testing.assert_close(compiled(x), eager(x))
