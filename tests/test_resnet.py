"""Pre-activation ResNets: fused and plain builds compute the same function with the same weights, the fused
one keeps at most 65% of the plain one's activation memory for backward (the stem's max pool keeping only its
indices), He initialisation, errors."""
import copy

import pytest
import torch

import fusedrect
from fusedrect.modules import FusedPreActConv2d
from fusedrect.resnet import MaxPool2dSavingIndices, PreActBasicBlock, PreActBottleneck, preact_resnet


def saved_activation_bytes(model, x):
    """Bytes of the distinct tensors autograd saves in one training forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


@pytest.mark.parametrize("depth, activation, size", [(20, "relu", 16), (164, "prelu", 8), (18, "prelu", 64),
                                                     (50, "relu", 64)])
def test_fused_equals_reverted_plain_network(depth, activation, size):
    fused = preact_resnet(depth, activation=activation, fused=True).double()
    plain = fusedrect.revert_model(copy.deepcopy(fused))
    assert list(plain.state_dict()) == list(preact_resnet(depth, activation=activation, fused=False).state_dict())
    assert not any(isinstance(m, FusedPreActConv2d) for m in plain.modules())
    x = torch.randn(2, 3, size, size, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    outputs = []
    for model in (fused, plain):
        out = model(x)
        out.square().sum().backward()
        outputs.append(out)
    torch.testing.assert_close(*outputs)
    for (name, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), (_, b) in zip(fused.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("depth, activation", [(20, "relu"), (56, "prelu"), (164, "relu"), (18, "relu"), (50, "relu")])
def test_saved_activation_memory_at_most_65_percent_of_eager(depth, activation):
    fused = preact_resnet(depth, activation=activation, fused=True)
    plain = preact_resnet(depth, activation=activation, fused=False)
    size = 32 if depth in (20, 56, 164) else 64
    x = torch.randn(2, 3, size, size)
    ratio = saved_activation_bytes(fused, x) / saved_activation_bytes(plain, x)
    assert ratio <= 0.65, ratio


def test_stem_pool_saves_only_its_indices_and_matches_max_pool():
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 3, 9, 9, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
        grads = []
        for pool in (MaxPool2dSavingIndices(3, 2, 1), torch.nn.MaxPool2d(3, 2, 1)):
            out = pool(x)
            out.backward(torch.ones_like(out))
            grads.append((out, x.grad))
            x.grad = None
        torch.testing.assert_close(*grads[0][:1], *grads[1][:1])
        assert torch.equal(grads[0][1], grads[1][1])
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    assert saved_activation_bytes(MaxPool2dSavingIndices(3, 2, 1), x) == 2 * 3 * 5 * 5 * 8  # int64 indices
    assert torch.autograd.gradcheck(MaxPool2dSavingIndices(3, 2, 1), (torch.randn(1, 2, 7, 7, dtype=torch.float64,
                                                                                  requires_grad=True),))


def test_blocks_shapes_and_projection():
    x = torch.randn(2, 16, 8, 8)
    assert PreActBasicBlock(16, 16)(x).shape == (2, 16, 8, 8)
    block = PreActBasicBlock(16, 32, stride=2, activation="prelu")
    assert block.projection and block(x).shape == (2, 32, 4, 4)
    bottleneck = PreActBottleneck(16, 8, stride=2)
    assert bottleneck.projection and bottleneck(x).shape == (2, 32, 4, 4)
    assert not PreActBottleneck(32, 8).projection


def test_depths_classes_and_he_initialisation():
    model = preact_resnet(110)
    convs = [m for m in model.modules() if isinstance(m, FusedPreActConv2d)]
    assert len(convs) + sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 110 - 1 + 2  # +2 shortcuts
    assert model.fc.out_features == 10 and preact_resnet(18).fc.out_features == 1000
    assert preact_resnet(20, num_classes=0)(torch.randn(2, 3, 8, 8)).shape == (2, 0)  # as nn.Linear(c, 0)
    weight = convs[-1].conv_weight
    torch.testing.assert_close(weight.std().item(), (2.0 / weight[0].numel()) ** 0.5, rtol=0.05, atol=0)
    prelu = [m for m in preact_resnet(20, activation="prelu").modules() if isinstance(m, FusedPreActConv2d)]
    assert prelu[-1].slope is not None and torch.all(prelu[-1].slope == 0.25)


def test_errors():
    with pytest.raises(ValueError, match="depth"):
        preact_resnet(21)
    with pytest.raises(ValueError, match="activation"):
        preact_resnet(20, activation="tanh")
    with pytest.raises(ValueError, match="width"):
        preact_resnet(20, width=0)
    with pytest.raises(ValueError, match="num_classes: expected a non-negative int or None, got -1"):
        preact_resnet(20, num_classes=-1)
