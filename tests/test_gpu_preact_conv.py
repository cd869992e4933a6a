"""GPU tests of the Triton pre-activation convolutions (marked gpu; skipped without a CUDA device or Triton): the
implicit-GEMM forward and weight-gradient kernels against F.conv2d of the fp64 reference activation at network
sizes, in fp32 (TF32), bf16 and fp16; FusedPreActConv2d on the GPU against the plain modules, training step and
eval; the weight gradient bitwise the same run to run."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import fusedrect
from fusedrect import reference
from fusedrect.ops import _backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(torch.cuda.is_available() and _backend.why_unavailable("triton", torch.device("cuda")),
                       reason="needs Triton"),
]
# Relative error ||got - want|| / ||want|| (fp32 runs as TF32 on the tensor cores).
RELATIVE_ERROR = {torch.float32: 5e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}
GEOMETRY = [(k, s, p) for k, s, p in itertools.product((1, 3), (1, 2), (0, 1)) if not (k == 1 and p == 1)]


def relative_error(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def channels_last(*shape, dtype=torch.float32):
    return torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "prelu", "prelu_shared"])
@pytest.mark.parametrize("kernel, stride, padding", GEOMETRY, ids=str)
def test_gpu_conv_kernels_match_conv2d_of_reference_activation(kernel, stride, padding, activation, dtype):
    from fusedrect.kernels import preact_conv as kernels

    x = channels_last(8, 48, 17, 15, dtype=dtype)
    channels = x.shape[1]
    mean, invstd = torch.randn(channels, device="cuda"), torch.rand(channels, device="cuda") + 0.5
    weight, bias = torch.rand(channels, device="cuda") + 0.5, torch.randn(channels, device="cuda")
    slope = {"relu": None, "prelu": torch.rand(channels, device="cuda"),
             "prelu_shared": torch.rand(1, device="cuda")}[activation]
    conv_weight = (torch.randn(40, channels, kernel, kernel, device="cuda") / (channels * kernel ** 2) ** 0.5).to(dtype)
    conv_bias = torch.randn(40, device="cuda").to(dtype)
    with torch.backends.cudnn.flags(allow_tf32=True):
        assert kernels.applies(x, conv_weight, (stride, stride), (padding, padding), (1, 1), 1)
        out = kernels.conv_fwd(x, mean, invstd, weight, bias, slope, conv_weight, conv_bias, (stride, stride),
                               (padding, padding))
        grad = channels_last(*out.shape, dtype=dtype)
        wgrad = kernels.conv_wgrad(grad, x, mean, invstd, weight, bias, slope, conv_weight, (stride, stride),
                                   (padding, padding))
    a = reference.bn_act_eval(x.double(), mean, invstd, weight, bias, slope)
    conv_weight_64 = conv_weight.double().requires_grad_()
    expected = F.conv2d(a, conv_weight_64, conv_bias.double(), stride, padding)
    expected.backward(grad.double())
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype
    assert wgrad.shape == conv_weight.shape and wgrad.dtype == dtype
    assert relative_error(out, expected) < RELATIVE_ERROR[dtype]
    assert relative_error(wgrad, conv_weight_64.grad) < RELATIVE_ERROR[dtype]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["relu", "prelu"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_module_matches_plain_modules(layout, activation, training):
    """channels_last takes the Triton convolution, NCHW the scratch + framework convolution path; fp32 with
    TF32 allowed in both, so the plain modules' convolution rounds alike."""
    prelu = {"activation": "prelu"} if activation == "prelu" else {}
    fused = fusedrect.FusedPreActConv2d(64, 64, 3, 1, 1, bias=False, backend="triton", device="cuda",
                                        **prelu).train(training)
    with torch.no_grad():
        fused.running_mean.normal_()
        fused.weight.uniform_(0.5, 1.5)
    plain = fused.to_modules()
    x = torch.randn(16, 64, 28, 28, device="cuda") + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(16, 64, 28, 28, device="cuda")
    results = []
    with torch.backends.cudnn.flags(allow_tf32=True):
        for module in (fused, plain):
            leaf = x.clone().requires_grad_()
            out = module(leaf)
            out.backward(grad)
            results.append((out, leaf.grad))
    (out, dx), (plain_out, plain_dx) = results
    assert relative_error(out, plain_out.double()) < 5e-3
    assert relative_error(dx, plain_dx.double()) < 5e-3
    bn, act, conv = plain
    pairs = [(fused.conv_weight, conv.weight), (fused.weight, bn.weight), (fused.bias, bn.bias)]
    for ours, theirs in pairs + ([(fused.slope, act.weight)] if prelu else []):
        assert relative_error(ours.grad, theirs.grad.double()) < 5e-3
    torch.testing.assert_close(fused.running_var, bn.running_var)


def test_gpu_weight_gradient_is_bitwise_deterministic():
    """Many pixels: the weight gradient is split into partial sums, added in a fixed order."""
    from fusedrect.kernels import preact_conv as kernels

    x = channels_last(32, 64, 28, 28, dtype=torch.bfloat16)
    stats = (torch.randn(64, device="cuda"), torch.rand(64, device="cuda") + 0.5, None, None,
             torch.rand(64, device="cuda"))
    conv_weight = torch.randn(64, 64, 3, 3, device="cuda").to(torch.bfloat16)
    grad = channels_last(32, 64, 28, 28, dtype=torch.bfloat16)
    first = kernels.conv_wgrad(grad, x, *stats, conv_weight, (1, 1), (1, 1))
    for _ in range(3):
        assert torch.equal(first, kernels.conv_wgrad(grad, x, *stats, conv_weight, (1, 1), (1, 1)))
