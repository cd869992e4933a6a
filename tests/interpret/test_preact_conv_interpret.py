"""The Triton pre-activation convolutions in Triton's CPU interpreter: the implicit-GEMM forward and
weight-gradient kernels against F.conv2d of the reference activation (every kernel size, stride, padding and
activation they cover), and FusedPreActConv2d with backend="triton" against the plain modules. Tiny shapes."""
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import fusedrect
from fusedrect import reference
from fusedrect.kernels import preact_conv as kernels

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (see tests/test_triton_interpreter.py)"

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2}


def channels_last(*shape, dtype=torch.float32):
    return torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "prelu", "prelu_shared"])
@pytest.mark.parametrize("kernel, stride, padding", [(k, s, p) for k, s, p in itertools.product((1, 3), (1, 2), (0, 1))
                                                     if not (k == 1 and p == 1)], ids=str)
def test_kernels_match_conv2d_of_reference_activation(kernel, stride, padding, activation, dtype):
    x = channels_last(2, 5, 7, 6, dtype=dtype)
    mean, invstd, weight, bias = torch.randn(5), torch.rand(5) + 0.5, torch.rand(5) + 0.5, torch.randn(5)
    slope = {"relu": None, "prelu": torch.rand(5), "prelu_shared": torch.rand(1)}[activation]
    conv_weight, conv_bias = torch.randn(9, 5, kernel, kernel).to(dtype), torch.randn(9).to(dtype)
    assert kernels.applies(x, conv_weight, (stride, stride), (padding, padding), (1, 1), 1)
    a = reference.bn_act_eval(x.double(), mean, invstd, weight, bias, slope)
    expected = F.conv2d(a, conv_weight.double(), conv_bias.double(), stride, padding)
    out = kernels.conv_fwd(x, mean, invstd, weight, bias, slope, conv_weight, conv_bias, (stride, stride),
                           (padding, padding))
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * 10)
    grad = channels_last(*expected.shape, dtype=dtype)
    conv_weight_64 = conv_weight.double().requires_grad_()
    F.conv2d(a, conv_weight_64, None, stride, padding).backward(grad.double())
    wgrad = kernels.conv_wgrad(grad, x, mean, invstd, weight, bias, slope, conv_weight, (stride, stride),
                               (padding, padding))
    assert wgrad.shape == conv_weight.shape and wgrad.dtype == dtype
    torch.testing.assert_close(wgrad.double(), conv_weight_64.grad, rtol=tol, atol=tol * 20)


def test_weight_gradient_split_over_many_pixels_is_deterministic():
    """Enough pixels that the weight gradient is split into several partial sums."""
    x = channels_last(2, 3, 40, 40)
    stats = (torch.randn(3), torch.rand(3) + 0.5, None, None, torch.rand(3))
    conv_weight = torch.randn(4, 3, 3, 3)
    grad = channels_last(2, 4, 40, 40)
    splits, _ = kernels._wgrad_split(2 * 40 * 40, 9, 1, kernels.WGRAD_BLOCK_M)
    assert splits > 1
    first = kernels.conv_wgrad(grad, x, *stats, conv_weight, (1, 1), (1, 1))
    second = kernels.conv_wgrad(grad, x, *stats, conv_weight, (1, 1), (1, 1))
    assert torch.equal(first, second)
    a = reference.bn_act_eval(x.double(), *stats)
    conv_weight_64 = conv_weight.double().requires_grad_()
    F.conv2d(a, conv_weight_64, None, 1, 1).backward(grad.double())
    torch.testing.assert_close(first.double(), conv_weight_64.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["relu", "prelu"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_module_with_triton_backend_matches_plain_modules(layout, activation, training):
    """channels_last takes the Triton convolution, NCHW the scratch + framework convolution path."""
    prelu = {"activation": "prelu"} if activation == "prelu" else {}
    fused = fusedrect.FusedPreActConv2d(5, 7, 3, 2, 1, bias=True, backend="triton", **prelu).train(training)
    with torch.no_grad():
        fused.running_mean.normal_()
        fused.weight.uniform_(0.5, 1.5)
    plain = fused.to_modules()
    x = torch.randn(3, 5, 9, 8)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(3, 7, 5, 4)
    results = []
    for module in (fused, plain):
        leaf = x.clone().requires_grad_()
        out = module(leaf)
        out.backward(grad)
        results.append((out, leaf.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    bn, act, conv = plain
    for ours, theirs in [(fused.conv_weight, conv.weight), (fused.conv_bias, conv.bias), (fused.weight, bn.weight),
                         (fused.bias, bn.bias)] + ([(fused.slope, act.weight)] if prelu else []):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.running_var, bn.running_var)


def test_bf16_module_takes_the_framework_convolution():
    """The interpreter computes bf16 tl.dot wrongly (Triton 3.8): a bf16 channels-last unit runs the Triton
    BatchNorm + act kernels and the framework's convolution, and agrees with the cpp backend's."""
    fused = fusedrect.FusedPreActConv2d(8, 16, 3, padding=1, activation="prelu", backend="triton",
                                        dtype=torch.bfloat16)
    cpp = fusedrect.FusedPreActConv2d(8, 16, 3, padding=1, activation="prelu", backend="cpp", dtype=torch.bfloat16)
    cpp.load_state_dict(fused.state_dict())
    x = channels_last(3, 8, 7, 6, dtype=torch.bfloat16)
    torch.testing.assert_close(fused(x), cpp(x), rtol=2e-2, atol=2e-2)


def test_empty_batch_gives_zero_weight_gradient():
    x = channels_last(0, 4, 6, 6).requires_grad_()
    fused = fusedrect.FusedPreActConv2d(4, 8, 3, padding=1, backend="triton")
    fused(x).sum().backward()
    assert torch.equal(fused.conv_weight.grad, torch.zeros_like(fused.conv_weight))
    assert x.grad.shape == x.shape


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch < 2.9 has no per-operator precision")
def test_tf32_read_from_the_per_operator_setting():
    """Set through torch's newer API, the legacy flag can no longer be read (torch raises); applies() follows the
    new setting: fp32 takes the Triton (TF32) convolution only where cuDNN's convolutions may use TF32."""
    x, conv_weight = channels_last(1, 4, 6, 6), torch.randn(8, 4, 3, 3)
    before = torch.backends.cudnn.conv.fp32_precision
    try:
        for precision, expected in (("ieee", False), ("tf32", True)):
            torch.backends.cudnn.conv.fp32_precision = precision
            assert kernels.applies(x, conv_weight, (1, 1), (1, 1), (1, 1), 1) is expected
    finally:
        torch.backends.cudnn.conv.fp32_precision = before
