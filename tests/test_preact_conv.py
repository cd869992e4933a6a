"""FusedPreActConv2d and fusedrect.preact_conv2d on CPU: agreement with conv2d(act(bn(x))) from plain PyTorch
modules over kernel sizes, strides, paddings, groups, layouts, train/eval and activations; gradcheck in fp64
for every parameter; opcheck of the three ops; what is saved for backward; conversions and errors."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedrect
from conftest import make_input
from fusedrect import reference
from fusedrect.modules import FusedPreActConv2d
from fusedrect.resnet import preact_resnet


def fused_unit(kernel, stride, padding, groups, activation, bias=True, dtype=torch.float64, in_channels=4, **kwargs):
    """A FusedPreActConv2d(in_channels -> 6) whose BatchNorm parameters and running statistics are away from
    defaults."""
    prelu = {"activation": "prelu", "num_parameters": 1 if activation == "prelu_shared" else None} \
        if activation != "relu" else {}
    unit = FusedPreActConv2d(in_channels, 6, kernel, stride, padding, groups=groups, bias=bias, dtype=dtype, **prelu,
                             **kwargs)
    with torch.no_grad():
        unit.weight.uniform_(0.5, 1.5)
        unit.bias.normal_()
        unit.running_mean.normal_()
        unit.running_var.uniform_(0.5, 2.0)
        if unit.slope is not None:
            unit.slope.uniform_(0.05, 0.5)
    return unit


def run_step(module, x, grad):
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad)
    return out, x.grad


CASES = list(itertools.product((1, 3), (1, 2), (0, 1), (1, 2)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["relu", "prelu", "prelu_shared"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("kernel, stride, padding, groups", CASES, ids=lambda v: str(v))
def test_matches_plain_modules(kernel, stride, padding, groups, layout, activation, training):
    fused = fused_unit(kernel, stride, padding, groups, activation).train(training)
    plain = fused.to_modules()
    x = make_input((3, 4, 7, 6), layout, torch.float64)
    grad = torch.randn(F.conv2d(x, plain[2].weight, None, stride, padding, groups=groups).shape, dtype=x.dtype)
    out, dx = run_step(fused, x, grad)
    out_ref, dx_ref = run_step(plain, x, grad)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(dx, dx_ref)
    bn, act, conv = plain
    pairs = [(fused.weight, bn.weight), (fused.bias, bn.bias), (fused.conv_weight, conv.weight),
             (fused.conv_bias, conv.bias), (fused.running_mean, bn.running_mean), (fused.running_var, bn.running_var)]
    if activation != "relu":
        pairs.append((fused.slope, act.weight))
    for ours, theirs in pairs:
        torch.testing.assert_close(ours, theirs)
        if ours.requires_grad:
            torch.testing.assert_close(ours.grad, theirs.grad)
    assert fused.num_batches_tracked == bn.num_batches_tracked


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("channels", [6, 11])
def test_input_gradient_in_place_over_partial_vectors(channels, layout):
    """The backward writes the input's gradient over the activation's (grad_out itself): rows of 6 and 11 fp64
    channels and 7x6 runs end in a partial vector, done as the whole vector ending there, which overlaps the one
    before it; every element must still be read before it is written."""
    fused = fused_unit(3, 1, 1, 1, "prelu", in_channels=channels)
    plain = fused.to_modules()
    x = make_input((3, channels, 7, 6), layout, torch.float64)
    grad = torch.randn(3, 6, 7, 6, dtype=torch.float64)
    out, dx = run_step(fused, x, grad)
    out_ref, dx_ref = run_step(plain, x, grad)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(dx, dx_ref)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["relu", "prelu", "prelu_shared"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("kernel, stride, padding, groups", [(3, 1, 1, 1), (1, 2, 0, 2), (3, 2, 0, 1)], ids=str)
def test_gradcheck(kernel, stride, padding, groups, layout, activation, training):
    """Fast mode (a random projection of the Jacobian) over every case; the full Jacobian in one below."""
    assert torch.autograd.gradcheck(*gradcheck_case(kernel, stride, padding, groups, layout, activation, training),
                                    fast_mode=True)


def test_gradcheck_full_jacobian():
    assert torch.autograd.gradcheck(*gradcheck_case(3, 2, 1, 1, "channels_last", "prelu", True))


def gradcheck_case(kernel, stride, padding, groups, layout, activation, training):
    x = make_input((2, 2, 4, 4), layout, torch.float64).requires_grad_()
    weight, bias = torch.rand(2, dtype=torch.float64) + 0.5, torch.randn(2, dtype=torch.float64)
    slope = {"relu": None, "prelu": torch.rand(2, dtype=torch.float64),
             "prelu_shared": torch.rand(1, dtype=torch.float64)}[activation]
    conv_weight = torch.randn(4, 2 // groups, kernel, kernel, dtype=torch.float64)
    conv_bias = torch.randn(4, dtype=torch.float64)
    running = (torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5)
    inputs = [t.requires_grad_() if t is not None else None for t in (x, weight, bias, slope, conv_weight, conv_bias)]

    def fn(x, weight, bias, slope, conv_weight, conv_bias):
        stats = (None, None) if training else running
        return fusedrect.preact_conv2d(x, *stats, weight, bias, slope, conv_weight, conv_bias, stride, padding,
                                       groups=groups, training=training)

    return fn, inputs


def test_matches_conv2d_of_reference_activation_in_fp32():
    """Against F.conv2d of the reference BN+act: the functional API with explicit stats, dilation 2."""
    x = make_input((4, 8, 9, 9), "channels_last", torch.float32)
    mean, invstd = torch.randn(8), torch.rand(8) + 0.5
    weight, bias, slope = torch.rand(8) + 0.5, torch.randn(8), torch.rand(8)
    conv_weight = torch.randn(5, 8, 3, 3)
    out = fusedrect.preact_conv2d(x, mean, invstd.pow(-2) - 1e-5, weight, bias, slope, conv_weight, None, 1, 2,
                                  dilation=2)
    expected = F.conv2d(reference.bn_act_eval(x, mean, invstd, weight, bias, slope), conv_weight, None, 1, 2, 2)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def samples():
    for layout, dtype, activation, conv_bias in itertools.product(
            ("nchw", "channels_last"), (torch.float32, torch.float64), ("relu", "prelu"), (True, False)):
        x = make_input((2, 4, 5, 5), layout, dtype)
        bn = [torch.rand(4, dtype=dtype) + 0.5, torch.randn(4, dtype=dtype),
              torch.rand(4, dtype=dtype) if activation == "prelu" else None]
        conv = [torch.randn(6, 4, 3, 3, dtype=dtype), torch.randn(6, dtype=dtype) if conv_bias else None]
        yield pytest.param(x, bn, conv, id=f"{layout}-{dtype}-{activation}-{conv_bias}")


@pytest.mark.parametrize("x, bn, conv", list(samples()))
def test_opcheck(x, bn, conv):
    grad = [t.requires_grad_() if t is not None else None for t in (x, *bn, *conv)]
    x, *rest = grad
    bn, conv = rest[:3], rest[3:]
    conv_args = ([2, 2], [1, 1], [1, 1], 1)
    torch.library.opcheck(torch.ops.fusedrect.preact_conv_fwd_train.default, (x, *bn, 1e-5, *conv, *conv_args))
    mean, invstd = reference.batch_stats(x.detach(), 1e-5)
    torch.library.opcheck(torch.ops.fusedrect.preact_conv_fwd_eval.default, (x, mean, invstd, *bn, *conv, *conv_args))
    detached = [t.detach() if t is not None else None for t in bn]
    grad_out = torch.randn(x.shape[0], 6, 3, 3, dtype=x.dtype)
    if x.is_contiguous(memory_format=torch.channels_last):
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    for batch_stats in (True, False):
        torch.library.opcheck(torch.ops.fusedrect.preact_conv_bwd.default,
                              (grad_out, x.detach(), mean, invstd, *detached, conv[0].detach(), conv[1] is not None,
                               *conv_args, batch_stats))


def saved_tensor_sizes(module, x):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sorted(sizes, reverse=True)


@pytest.mark.parametrize("activation", ["relu", "prelu"])
def test_saves_the_input_alone_not_the_activation(activation):
    unit = fused_unit(3, 1, 1, 1, activation, dtype=torch.float32)
    x = torch.randn(4, 4, 16, 16, requires_grad=True)
    sizes = saved_tensor_sizes(unit, x)
    assert sizes[0] == x.numel()  # the input
    assert sizes[1] == unit.conv_weight.numel() and all(s <= 6 * 4 * 9 for s in sizes[1:])
    plain = saved_tensor_sizes(unit.to_modules(), x)
    assert sum(s for s in plain if s == x.numel()) >= 2 * x.numel()  # eager keeps the activation as well


def test_deterministic():
    unit = fused_unit(3, 2, 1, 1, "prelu", dtype=torch.float32)
    x = make_input((8, 4, 20, 20), "channels_last", torch.float32)
    grad = torch.randn(8, 6, 10, 10)
    first = run_step(unit, x, grad), unit.conv_weight.grad.clone(), unit.slope.grad.clone()
    unit.zero_grad()
    second = run_step(unit, x, grad), unit.conv_weight.grad.clone(), unit.slope.grad.clone()
    for a, b in zip(first[0] + first[1:], second[0] + second[1:]):
        assert torch.equal(a, b)


def test_bfloat16_close_to_fp32():
    unit = fused_unit(3, 1, 1, 1, "prelu", dtype=torch.float32)
    x = make_input((4, 4, 8, 8), "channels_last", torch.float32)
    expected = unit(x)
    low = unit.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, rtol=5e-2, atol=5e-2)


def test_from_modules_round_trip_and_state_dict():
    bn, act = nn.BatchNorm2d(4), nn.PReLU(4, init=0.1)
    conv = nn.Conv2d(4, 8, 3, padding="same", bias=True)
    with torch.no_grad():
        bn.running_mean.normal_()
    fused = FusedPreActConv2d.from_modules(bn, act, conv).eval()
    assert fused.padding == (1, 1) and fused.activation == "prelu" and fused.slope.shape == (4,)
    assert list(fused.state_dict()) == ["weight", "bias", "slope", "conv_weight", "conv_bias", "running_mean",
                                        "running_var", "num_batches_tracked"]
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(fused(x), conv(act(bn.eval()(x))))
    back = fused.to_modules()
    torch.testing.assert_close(back(x), fused(x))
    assert "activation='prelu'" in repr(fused) and "kernel_size=(3, 3)" in repr(fused)


def test_from_modules_takes_dtype_and_device_from_the_convolution_too():
    """A BatchNorm without tensors (no affine, no running statistics) and a ReLU: the convolution's dtype."""
    plain = nn.Sequential(nn.BatchNorm2d(4, affine=False, track_running_stats=False), nn.ReLU(),
                          nn.Conv2d(4, 6, 3)).double()
    fused = FusedPreActConv2d.from_modules(*plain)
    assert fused.conv_weight.dtype == torch.float64
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fused(x), plain(x))
    torch.testing.assert_close(fusedrect.convert_model(plain)(x), plain(x))


def test_from_modules_relu_and_bad_modules():
    fused = FusedPreActConv2d.from_modules(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
    assert fused.slope is None and fused.conv_bias is not None
    with pytest.raises(TypeError, match="act"):
        FusedPreActConv2d.from_modules(nn.BatchNorm2d(4), nn.Tanh(), nn.Conv2d(4, 4, 1))
    with pytest.raises(TypeError, match="conv"):
        FusedPreActConv2d.from_modules(nn.BatchNorm2d(4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="in_channels=4"):
        FusedPreActConv2d.from_modules(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match="padding_mode"):
        FusedPreActConv2d.from_modules(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding_mode="reflect"))
    with pytest.raises(ValueError, match="asymmetrically"):
        FusedPreActConv2d.from_modules(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 2, padding="same"))


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_padding_strings_as_conv2d(padding):
    """The constructor takes nn.Conv2d's padding strings, resolved to the pair they pad."""
    fused = FusedPreActConv2d(4, 6, (3, 5), padding=padding, dilation=(2, 1), bias=True).eval()
    conv = nn.Conv2d(4, 6, (3, 5), padding=padding, dilation=(2, 1))
    conv.load_state_dict({"weight": fused.conv_weight, "bias": fused.conv_bias})
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(fused(x), conv(F.relu(F.batch_norm(x, fused.running_mean, fused.running_var))))
    assert fused.padding == ((2, 2) if padding == "same" else (0, 0))


def test_meta_device_forward():
    """Shapes without data (the meta device, where autocast has no state to ask about)."""
    unit = FusedPreActConv2d(4, 6, 3, padding=1, device="meta", backend="reference")
    assert unit(torch.empty(2, 4, 8, 8, device="meta")).shape == (2, 6, 8, 8)


def test_padding_string_errors():
    with pytest.raises(ValueError, match="padding: 'same' needs stride 1"):
        FusedPreActConv2d(4, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="pads asymmetrically"):
        FusedPreActConv2d(4, 4, 2, padding="same")
    with pytest.raises(ValueError, match="padding: expected an int, a pair, 'valid' or 'same', got 'full'"):
        FusedPreActConv2d(4, 4, 3, padding="full")


@pytest.mark.parametrize("activation", ["relu", "prelu"])
def test_autocast_casts_the_convolution_as_nn_conv2d(activation):
    """Under CPU autocast (bf16) a bf16 input (what an autocast layer before gives) meets fp32 parameters: the
    convolution's are cast as autocast casts nn.Conv2d's, the gradients reach them in fp32; an fp32 input stays
    fp32. A whole preact ResNet runs under autocast."""
    unit = FusedPreActConv2d(4, 6, 3, padding=1, bias=True, activation=activation)
    plain = unit.to_modules()
    x = torch.randn(2, 4, 8, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = unit(x), plain(x)
        y_fp32 = unit(x.float())
        y.float().square().sum().backward()
        expected.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and y_fp32.dtype == torch.float32
    torch.testing.assert_close(y, expected)
    assert unit.conv_weight.grad.dtype == torch.float32
    torch.testing.assert_close(unit.conv_weight.grad, plain[2].weight.grad)
    torch.testing.assert_close(unit.conv_bias.grad, plain[2].bias.grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert preact_resnet(20)(torch.randn(2, 3, 16, 16)).dtype == torch.bfloat16


def test_constructor_errors():
    with pytest.raises(ValueError, match="activation"):
        FusedPreActConv2d(4, 4, 3, activation="tanh")
    with pytest.raises(ValueError, match="num_parameters"):
        FusedPreActConv2d(4, 4, 3, num_parameters=1)
    with pytest.raises(ValueError, match="groups"):
        FusedPreActConv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="groups: expected a positive int"):
        FusedPreActConv2d(4, 6, 3, groups=True)


def test_functional_errors_name_the_argument():
    x = torch.randn(2, 4, 5, 5)
    stats = (torch.zeros(4), torch.ones(4), None, None, None)
    with pytest.raises(ValueError, match="conv_weight: expected shape"):
        fusedrect.preact_conv2d(x, *stats, torch.randn(6, 3, 3, 3))
    with pytest.raises(TypeError, match="conv_weight: expected the input's dtype"):
        fusedrect.preact_conv2d(x, *stats, torch.randn(6, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="conv_bias: expected shape"):
        fusedrect.preact_conv2d(x, *stats, torch.randn(6, 4, 3, 3), torch.randn(5))
    with pytest.raises(ValueError, match="stride"):
        fusedrect.preact_conv2d(x, *stats, torch.randn(6, 4, 3, 3), stride=0)
    with pytest.raises(ValueError, match="padding"):
        fusedrect.preact_conv2d(x, *stats, torch.randn(6, 4, 3, 3), padding=(1, 1, 1))
    with pytest.raises(ValueError, match="kernel's reach"):
        fusedrect.preact_conv2d(x, *stats, torch.randn(6, 4, 7, 7))
    with pytest.raises(ValueError, match="4-D"):
        fusedrect.preact_conv2d(torch.randn(2, 4, 5), *stats, torch.randn(6, 4, 3))
    with pytest.raises(ValueError, match="groups"):
        fusedrect.preact_conv2d(x, *stats, torch.randn(6, 4, 3, 3), groups=0)
    with pytest.raises(ValueError, match=r"conv_weight: .* kH, kW >= 1, got \(6, 4, 0, 3\)"):
        fusedrect.preact_conv2d(x, *stats, torch.randn(6, 4, 0, 3))


def test_triton_convolution_left_out_only_for_bf16_in_the_interpreter():
    """The framework-convolution fallback for bf16 is for Triton's interpreter (CPU tensors): a GPU tensor (here a
    meta one standing in) keeps the Triton convolution in every dtype."""
    from fusedrect.ops.preact_conv import _triton_conv_runs
    assert not _triton_conv_runs(torch.empty(1, dtype=torch.bfloat16))
    assert _triton_conv_runs(torch.empty(1, dtype=torch.float16))
    assert _triton_conv_runs(torch.empty(1, dtype=torch.bfloat16, device="meta"))
