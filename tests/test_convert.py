"""convert_model / revert_model on models defined here: a torchvision-style ResNet (a ReLU module reused at
several places), a pre-activation ResNet, an iresnet-style face-recognition block, Sequential stacks, a BN whose
output is used twice, functional relu calls, BN -> act -> conv chains (in Sequential and traced, up to a whole
fusedrect.resnet pre-activation ResNet built from plain modules), and a model that does not trace."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fusedrect
from fusedrect.modules import FusedBNPReLU, FusedBNReLU, FusedPreActConv2d
from fusedrect.resnet import preact_resnet


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: one ReLU module used after bn1 and after the residual addition."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, 2))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PreActBlock(nn.Module):
    """Full pre-activation unit (He et al. 2016): BN -> ReLU -> conv, twice, plus the identity."""

    def __init__(self, c):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, 1, 1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        return x + out


class IResBlock(nn.Module):
    """iresnet (ArcFace) block: BN -> conv -> BN -> PReLU -> conv -> BN, plus the shortcut."""

    def __init__(self, c):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.prelu = nn.PReLU(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + x


class SharedOutput(nn.Module):
    """bn's output feeds the ReLU and the sum: fusing would lose the normalised tensor."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()

    def forward(self, x):
        z = self.bn(x)
        return self.act(z) + z


class Untraceable(nn.Module):
    """Data-dependent control flow: does not trace, so its bn -> act pair stays (and is reported); its
    Sequential child still converts."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.PReLU(1))
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.act(self.bn(x))
        if x.sum() > 0:
            return self.body(x)
        return -self.body(x)


def randomize_state(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(0.05, 0.5)
    return model


def assert_same_training_step(original, converted, x):
    for model in (original, converted):
        model.zero_grad()
    outs = []
    for model in (original, converted):
        xi = x.clone().requires_grad_()
        y = model(xi)
        y.square().mean().backward()
        outs.append((y, xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-4, rtol=1e-4)


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "factory, shape, fused_relu, fused_prelu, chains",
    [
        (ResNet, (4, 3, 8, 8), 3, 0, 0),  # stem bn1 and each block's bn1; bn2 feeds the addition
        # functional relus: each BatchNorm fused with its activation, not with the convolution after it
        (lambda: nn.Sequential(PreActBlock(6), PreActBlock(6)), (2, 6, 5, 5), 4, 0, 0),
        (lambda: IResBlock(6), (2, 6, 5, 5), 0, 0, 1),  # bn2 -> prelu -> conv2
        (lambda: nn.Sequential(nn.BatchNorm1d(5), nn.PReLU(5), nn.Linear(5, 5), nn.BatchNorm1d(5), nn.ReLU()),
         (8, 5), 1, 1, 0),
        (lambda: nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, 2, 1), nn.BatchNorm2d(6),
                               nn.PReLU(), nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.ReLU()), (2, 4, 7, 7), 1, 0, 2),
        (lambda: preact_resnet(20, fused=False), (2, 3, 16, 16), 3, 0, 16),  # projections: shared pre-activation
    ],
    ids=["resnet", "preact", "iresnet", "sequential", "sequential-chains", "preact-resnet20"],
)
def test_convert_keeps_outputs_and_gradients(factory, shape, fused_relu, fused_prelu, chains, train):
    original = randomize_state(factory()).train(train)
    converted = fusedrect.convert_model(original)
    assert count(converted, FusedBNReLU) == fused_relu and count(converted, FusedBNPReLU) == fused_prelu
    assert count(converted, FusedPreActConv2d) == chains
    assert len(converted.fusedrect_report.fused) == fused_relu + fused_prelu + chains
    assert converted.training == train
    x = torch.randn(shape)
    assert_same_training_step(original, converted, x)
    if train:  # running statistics were updated alike
        bns = [m for m in original.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        fused = [m for m in converted.modules() if isinstance(m, (FusedBNReLU, FusedBNPReLU))]
        assert {round(float(m.running_var.sum()), 4) for m in fused} <= {
            round(float(m.running_var.sum()), 4) for m in bns}


class SyncBlock(nn.Module):
    """A SyncBatchNorm followed by a functional relu: fused by tracing."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.SyncBatchNorm(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_sync_batchnorm_becomes_the_synchronized_module(tmp_path, train):
    """An nn.SyncBatchNorm -> act pair becomes FusedSyncBN<act> (never a FusedPreActConv2d) with its process group,
    which the converted copy shares (a ProcessGroup cannot be copied). With one rank the fused module runs
    unsynchronized: the same step as BatchNorm2d (nn.SyncBatchNorm itself trains on GPU tensors only)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        original = randomize_state(
            nn.Sequential(nn.SyncBatchNorm(4, process_group=group), nn.PReLU(4), nn.Conv2d(4, 4, 3))).train(train)
        converted = fusedrect.convert_model(original)
        assert [type(m) for m in converted] == [fusedrect.FusedSyncBNPReLU, nn.Identity, nn.Conv2d]
        assert converted[0].process_group is group and original[0].process_group is group
        assert converted.fusedrect_report.fused == [("0", "1")]
        plain = nn.Sequential(nn.BatchNorm2d(4), nn.PReLU(4), nn.Conv2d(4, 4, 3)).train(train)
        plain.load_state_dict(original.state_dict())
        assert_same_training_step(plain, converted, torch.randn(2, 4, 6, 6))
        traced = fusedrect.convert_model(randomize_state(SyncBlock()).train(train))
        assert type(traced.bn) is fusedrect.FusedSyncBNReLU and traced.bn.process_group is None
        reverted = fusedrect.revert_model(converted)
        assert type(reverted[0]) is nn.SyncBatchNorm and reverted[0].process_group is group
    finally:
        dist.destroy_process_group()


def test_convert_keeps_dtype_and_reverts():
    original = randomize_state(IResBlock(4)).double()
    converted = fusedrect.convert_model(original)
    fused = next(m for m in converted.modules() if isinstance(m, FusedPreActConv2d))
    assert fused.weight.dtype == torch.float64 and fused.conv_weight.dtype == torch.float64
    reverted = fusedrect.revert_model(copy.deepcopy(converted))
    assert count(reverted, FusedPreActConv2d) == 0 and count(reverted, nn.PReLU) == 1
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(reverted.eval()(x), original.eval()(x))


def test_sequential_conversion_keeps_class_and_state_dict_keys():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
    keys = set(model.state_dict())
    converted = fusedrect.convert_model(model)
    assert type(converted) is nn.Sequential and isinstance(converted[1], FusedBNReLU)
    assert set(converted.state_dict()) == keys
    reverted = fusedrect.revert_model(converted)
    assert [type(m) for m in reverted] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]


def test_sequential_chain_reverts_to_the_same_modules_and_keys():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
    keys = list(model.state_dict())
    converted = fusedrect.convert_model(model)
    assert isinstance(converted[1], FusedPreActConv2d) and [type(m) for m in converted[2:]] == [nn.Identity] * 2
    reverted = fusedrect.revert_model(converted)
    assert [type(m) for m in reverted] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    assert list(reverted.state_dict()) == keys


def test_chain_not_formed_where_the_activation_is_shared_or_the_conv_cannot_take_it():
    class SharedReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.relu, self.conv = nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding_mode="reflect")

        def forward(self, x):
            return self.relu(self.conv(self.relu(self.bn(x))))

    original = randomize_state(SharedReLU())
    converted = fusedrect.convert_model(original)
    assert count(converted, FusedPreActConv2d) == 0 and count(converted, FusedBNReLU) == 1
    assert_same_training_step(original, converted, torch.randn(2, 4, 5, 5))
    reflect = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding_mode="reflect"))
    assert count(fusedrect.convert_model(reflect), FusedPreActConv2d) == 0


def test_frozen_parameters_stay_frozen_both_ways():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), nn.PReLU(4),
                          nn.Conv2d(4, 2, 1))
    model.requires_grad_(False)
    model[1].bias.requires_grad_(True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    fused = fusedrect.convert_model(model)
    assert [name for name, p in fused.named_parameters() if p.requires_grad] == ["1.bias"]
    assert {name for name, p in fusedrect.revert_model(fused).named_parameters() if p.requires_grad} == trainable


class _NegatingSequential(nn.Sequential):
    """Negates the BatchNorm's output before its activation: not its children in a row."""

    def forward(self, x):
        return self[1](-self[0](x))


class _ShiftedBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) + 1


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(_NegatingSequential(nn.BatchNorm2d(4), nn.ReLU())),
    lambda: nn.Sequential(_ShiftedBatchNorm(4), nn.ReLU()),
    lambda: nn.Sequential(nn.BatchNorm2d(4), type("_LeakyReLU", (nn.ReLU,), {"forward": lambda self, x: x * 0.5})()),
], ids=["sequential", "batchnorm", "activation"])
def test_modules_with_their_own_forward_keep_it(make):
    """A subclass with its own forward computes something else than the pair it looks like: what it computes is
    kept (the Sequential's children may still be fused where its forward calls them in a row)."""
    model = make()
    x = torch.randn(2, 4, 3, 3)
    expected = model(x)
    torch.testing.assert_close(fusedrect.convert_model(model)(x), expected)


def test_lazy_batchnorm_is_fused_once_it_has_its_parameters():
    model = nn.Sequential(nn.LazyBatchNorm2d(), nn.ReLU())
    assert fusedrect.convert_model(model, inplace=True) is model and isinstance(model[0], nn.LazyBatchNorm2d)
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)  # makes its parameters
    torch.testing.assert_close(fusedrect.convert_model(model)(x), expected)


def test_bn_output_used_elsewhere_is_not_fused():
    converted = fusedrect.convert_model(SharedOutput())
    assert count(converted, FusedBNReLU) == 0
    assert any("also used elsewhere" in why for _, why in converted.fusedrect_report.skipped)


def test_untraceable_model_is_searched_child_by_child():
    original = randomize_state(Untraceable())
    converted = fusedrect.convert_model(original)
    assert count(converted, FusedBNPReLU) == 1 and count(converted, FusedBNReLU) == 0
    assert any("does not trace" in why for _, why in converted.fusedrect_report.skipped)
    x = torch.randn(2, 4, 3, 3)
    assert_same_training_step(original, converted, x)


def test_pair_whose_fused_module_cannot_be_built_is_skipped_whole(monkeypatch):
    """A from_modules that raises (a case convert_model does not foresee) skips that pair, reported, and leaves
    it as it was; the other pairs still convert (traced, and child by child where the parent does not trace)."""
    def refuse(cls, bn, act):
        raise ValueError("bn: not this one")

    monkeypatch.setattr(FusedBNReLU, "from_modules", classmethod(refuse))
    traced = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3), nn.PReLU(3))
    untraced = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), Untraceable())
    for model in (traced, untraced):
        converted = fusedrect.convert_model(model, inplace=True)
        assert type(converted[0]) is nn.BatchNorm2d and type(converted[1]) is nn.ReLU
        assert count(converted, FusedBNPReLU) == 1
        assert any("could not be built (ValueError: bn: not this one)" in why
                   for _, why in converted.fusedrect_report.skipped)


def test_inplace_converts_the_given_model():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    assert fusedrect.convert_model(model, inplace=True) is model and isinstance(model[0], FusedBNReLU)
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        fusedrect.convert_model(lambda x: x)


def test_report_is_logged(caplog):
    with caplog.at_level("INFO", logger="fusedrect"):
        fusedrect.convert_model(ResNet())
    assert "fused 3 BatchNorm+activation pair(s)" in caplog.text


class Mixed(nn.Module):
    """A Sequential stem, a forward-called pair, a frozen BatchNorm, and state that forward does not use."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.PReLU(4)
        self.frozen = nn.BatchNorm2d(4)
        self.aux = nn.Linear(4, 2)

    def forward(self, x):
        return self.frozen(self.act(self.bn(self.stem(x))))

    def head(self, x):
        return self.aux(x.mean((2, 3)))


def test_convert_patches_in_place_and_keeps_everything_else():
    original = randomize_state(Mixed()).train()
    original.frozen.eval()
    converted = fusedrect.convert_model(original)
    assert type(converted) is Mixed and isinstance(converted.stem[1], FusedBNReLU)
    assert isinstance(converted.bn, FusedBNPReLU) and isinstance(converted.act, nn.Identity)
    assert not converted.frozen.training and converted.training
    assert "aux.weight" in converted.state_dict() and converted.head(torch.randn(2, 4, 3, 3)).shape == (2, 2)
    assert not converted.fusedrect_report.skipped
    assert_same_training_step(original, converted, torch.randn(2, 3, 5, 5))


def test_converted_model_compiles_fullgraph():
    torch._dynamo.reset()
    converted = fusedrect.convert_model(randomize_state(ResNet()))
    assert type(converted) is ResNet
    compiled = torch.compile(converted, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8)
    compiled(x).sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x).sum().backward()


def _skip_reasons(model):
    return [why for _, why in model.fusedrect_report.skipped]


def test_modules_with_hooks_are_left_alone():
    """A hook would no longer run on a module fused away; legacy spectral_norm is a forward pre-hook on the
    convolution (fused, its normalisation would be lost)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.act, self.conv = nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1)
            self.bn2, self.act2 = nn.BatchNorm2d(3), nn.PReLU()

        def forward(self, x):
            return self.act2(self.bn2(self.conv(self.act(self.bn(x)))))

    seen = []
    model = Block()
    model.bn.register_forward_hook(lambda module, args, out: seen.append(out))
    model.act2.register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
    sequential = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), torch.nn.utils.spectral_norm(nn.Conv2d(3, 3, 1)),
                               nn.BatchNorm2d(3), nn.ReLU())
    sequential[3].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    x = torch.randn(2, 3, 4, 4)
    # The Sequential's first BatchNorm and ReLU are fused, without the convolution (its hook); its second
    # BatchNorm is left alone, as are both of the Block's pairs.
    for original, fused, skipped in ((model, [], 2), (sequential, [("0", "1")], 1)):
        converted = fusedrect.convert_model(original.eval())  # before a forward: spectral_norm's copies then
        assert converted.fusedrect_report.fused == fused
        assert [why for why in _skip_reasons(converted) if "has hooks" in why] == _skip_reasons(converted)
        assert len(_skip_reasons(converted)) == skipped
        torch.testing.assert_close(converted(x), original(x))
    assert len(seen) == 2  # the Block's hook, in the converted Block and in the original
    assert hasattr(converted[2], "weight_orig")


class _DataDependent(nn.Module):
    """Does not trace (control flow on a value): a Sequential holding it is taken structurally."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_modules_held_at_several_places_are_not_split():
    """One BatchNorm, PReLU or convolution held at several places stays one set of parameters (and statistics):
    traced, taken structurally (an untraceable Sequential), or through an alias. A ReLU, stateless, is copied to
    each of its places, each then fused (chains too) on its own."""
    bn, prelu, conv, relu = nn.BatchNorm2d(3), nn.PReLU(3), nn.Conv2d(3, 3, 1), nn.ReLU()
    traced = nn.Sequential(nn.Sequential(bn, relu), nn.Conv2d(3, 3, 1), nn.Sequential(bn, relu),
                           nn.BatchNorm2d(3), prelu, nn.BatchNorm2d(3), prelu,
                           nn.BatchNorm2d(3), relu, conv, conv, nn.BatchNorm2d(3), relu, nn.Conv2d(3, 3, 1))
    structural = nn.Sequential(_DataDependent(), bn, relu, nn.BatchNorm2d(3), prelu, nn.BatchNorm2d(3), relu, conv,
                               _DataDependent(), bn, nn.ReLU(), nn.BatchNorm2d(3), prelu, nn.BatchNorm2d(3), nn.ReLU(),
                               nn.Conv2d(3, 3, 1))

    class Alias(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.act = nn.BatchNorm2d(3), nn.PReLU(3)
            self.same_bn = self.bn

        def forward(self, x):
            return self.act(self.same_bn(x))

    cases = [
        (traced, [("7", "8"), ("11", "12", "13")], ["held at several places"] * 3),
        (structural, [("5", "6", "7"), ("13", "14", "15")], ["held at several places"] * 4),
        (Alias(), [], ["held at several places"]),
    ]
    for model, fused, reasons in cases:
        original = randomize_state(model)
        converted = fusedrect.convert_model(original)
        assert converted.fusedrect_report.fused == fused
        why = [w for w in _skip_reasons(converted) if "does not trace" not in w]
        assert len(why) == len(reasons) and all(r in w for r, w in zip(reasons, why)), why
        assert sum(p.numel() for p in converted.parameters()) == sum(p.numel() for p in original.parameters())
        for _ in range(2):
            assert_same_training_step(original, converted, torch.randn(4, 3, 5, 5).abs())


def test_sequential_iterated_by_its_parent_keeps_its_intermediate_outputs():
    """A parent that walks a Sequential and keeps an intermediate output (a feature tap) decides: traced, the
    BatchNorm whose output is tapped is not fused."""

    class Taps(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1),
                                          nn.BatchNorm2d(3), nn.ReLU())

        def forward(self, x):
            taps = []
            for i, layer in enumerate(self.features):
                x = layer(x)
                if i == 1:
                    taps.append(x)
            return x, taps[0]

    original = randomize_state(Taps()).eval()
    converted = fusedrect.convert_model(original)
    assert converted.fusedrect_report.fused == [("features.4", "features.5")]
    x = torch.randn(2, 3, 4, 4)
    for got, expected in zip(converted(x), original(x)):
        torch.testing.assert_close(got, expected)


def test_batchnorm_without_bias_is_left_alone():
    if "bias" not in nn.BatchNorm2d.__init__.__code__.co_varnames:
        pytest.skip("this torch's BatchNorm has no bias argument")
    model = nn.Sequential(nn.BatchNorm2d(3, bias=False), nn.PReLU(3))
    with pytest.raises(ValueError, match=r"bn: a BatchNorm without a bias \(bias=False\)"):
        FusedBNPReLU.from_modules(model[0], model[1])
    converted = fusedrect.convert_model(model)
    assert not converted.fusedrect_report.fused and "has no bias (bias=False)" in _skip_reasons(converted)[0]
    converted.load_state_dict(model.state_dict())  # the same keys: nothing gained


def test_parametrized_batchnorm_is_left_alone():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", nn.Softplus())
    x = torch.randn(2, 3, 4, 4)
    converted = fusedrect.convert_model(model)
    assert "has parametrizations" in _skip_reasons(converted)[0]
    torch.testing.assert_close(converted(x), model(x))


def test_modules_called_or_held_through_several_paths_are_fused_once():
    """A Sequential called twice (Siamese branches), a block in a loop, a container also held in a ModuleList
    (an FPN's view of its backbone's stages), and one ReLU module at two places of a Sequential: the fused
    module runs at every call, with one set of parameters and statistics; the Sequential's keys come back on
    revert."""

    class Siamese(nn.Module):
        def __init__(self):
            super().__init__()
            self.branch = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1))

        def forward(self, x):
            return self.branch(x) - self.branch(x.flip(-1))

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.BatchNorm2d(3), nn.PReLU(3), nn.Conv2d(3, 3, 1))

        def forward(self, x):
            for _ in range(3):
                x = self.block(x)
            return x

    class Pyramid(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()),
                                          nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()))
            self.stages = nn.ModuleList(self.backbone)

        def forward(self, x):
            features = []
            for stage in self.stages:
                x = stage(x)
                features.append(x)
            return features[0].sum() + features[1]

    relu = nn.ReLU()
    shared_relu = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), relu, nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3),
                                relu)
    cases = [(Siamese(), [("branch.1", "branch.2", "branch.3")]), (Loop(), [("block.0", "block.1", "block.2")]),
             (Pyramid(), [("backbone.0.1", "backbone.0.2"), ("backbone.1.1", "backbone.1.2")]),
             (shared_relu, [("1", "2", "3"), ("4", "5")])]
    for model, fused in cases:
        original = randomize_state(model)
        converted = fusedrect.convert_model(original)
        assert converted.fusedrect_report.fused == fused and not converted.fusedrect_report.skipped
        assert sum(p.numel() for p in converted.parameters()) == sum(p.numel() for p in original.parameters())
        for _ in range(2):
            assert_same_training_step(original, converted, torch.randn(2, 3, 4, 4))
        bn = next(m for m in original.modules() if isinstance(m, nn.BatchNorm2d))
        fused_bn = next(m for m in converted.modules() if isinstance(m, (FusedBNReLU, FusedBNPReLU, FusedPreActConv2d)))
        torch.testing.assert_close(fused_bn.running_var, bn.running_var)
        assert int(fused_bn.num_batches_tracked) == int(bn.num_batches_tracked)
    assert list(fusedrect.revert_model(converted).state_dict()) == list(shared_relu.state_dict())
