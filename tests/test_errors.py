"""Bad input raises a clear ValueError/TypeError naming the argument, before any kernel runs."""
import pytest
import torch

import fusedrect
from fusedrect import reference
from fusedrect.ops.bn_act import native_layout


def call(x=None, running_mean=None, running_var=None, weight=None, bias=None, slope=None, training=True, **kw):
    x = torch.randn(4, 3, 5, 5) if x is None else x
    slope = torch.full((3,), 0.25) if slope is None else slope
    return fusedrect.bn_prelu(x, running_mean, running_var, weight, bias, slope, training, **kw)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"x": torch.randn(5)}, ValueError, r"input: expected at least 2 dims .* got shape \(5,\)"),
        ({"x": torch.randint(0, 5, (4, 3, 2, 2))}, TypeError, "input: expected a float16, bfloat16, float32"),
        ({"x": [[1.0, 2.0]]}, TypeError, "input: expected a torch.Tensor, got list"),
        ({"x": torch.randn(1, 3, 1, 1)}, ValueError, "Expected more than 1 value per channel when training"),
        ({"x": torch.randn(1, 3)}, ValueError, "Expected more than 1 value per channel when training"),
        ({"weight": torch.ones(4)}, ValueError, r"weight: expected shape \(3,\) .* got \(4,\)"),
        ({"bias": torch.ones(3, 1)}, ValueError, r"bias: expected shape \(3,\) .* got \(3, 1\)"),
        ({"running_mean": torch.zeros(2)}, ValueError, r"running_mean: expected shape \(3,\)"),
        ({"running_var": torch.ones(3, dtype=torch.long)}, TypeError, "running_var: expected a floating-point"),
        ({"running_var": torch.ones(3)}, ValueError, "running_mean and running_var: expected both or neither, got "
                                                     "only running_var"),
        ({"weight": torch.ones(3, device="meta")}, ValueError, "weight: expected a tensor on cpu"),
        ({"slope": torch.ones(2)}, ValueError, r"slope: expected shape \(1,\) or \(3,\) .* got \(2,\)"),
        ({"slope": torch.ones(1, 3)}, ValueError, r"slope: expected shape \(1,\) or \(3,\)"),
        ({"weight": "ones"}, TypeError, "weight: expected a torch.Tensor or None, got str"),
        ({"training": False}, ValueError, "running_mean and running_var are required when training=False"),
        ({"training": "False"}, TypeError, "training: expected a bool, got str"),
        ({"training": 1}, TypeError, "training: expected a bool, got int"),
        ({"memory_efficient": "yes"}, TypeError, "memory_efficient: expected a bool, got str"),
        ({"eps": -1.0}, ValueError, "eps: expected a non-negative number"),
        ({"momentum": float("nan")}, ValueError, "momentum: expected a finite number"),
        ({"backend": "cuda-ish"}, ValueError,
         r"backend: expected one of \('auto', 'cpp', 'triton', 'cuda', 'reference'\)"),
    ],
)
def test_functional_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        call(**kwargs)


def test_bn_prelu_requires_a_slope():
    with pytest.raises(TypeError, match="slope: bn_prelu needs a tensor"):
        fusedrect.bn_prelu(torch.randn(4, 3), None, None, training=True)


def test_environment_backend_is_validated(monkeypatch):
    monkeypatch.setenv("FUSEDRECT_BACKEND", "fast")
    with pytest.raises(ValueError, match="FUSEDRECT_BACKEND: expected one of"):
        call()


def test_unavailable_explicit_backend_raises():
    with pytest.raises(RuntimeError, match="backend 'cpp' cannot run: it runs on CPU tensors only"):
        call(x=torch.randn(4, 3, device="meta"), slope=torch.ones(3, device="meta"), backend="cpp")


@pytest.mark.parametrize("module", [fusedrect.FusedBNPReLU(3), fusedrect.FusedBNReLU(3, affine=False,
                                                                                  track_running_stats=False)])
def test_module_checks_channels(module):
    with pytest.raises(ValueError, match=r"input: expected shape \(N, 3, \.\.\.\) .* got \(2, 4, 5\)"):
        module(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match=r"got \(3,\)"):
        module(torch.randn(3))


def test_module_rejects_bad_num_parameters():
    with pytest.raises(ValueError, match="num_parameters: expected None, 1 or 8, got 4"):
        fusedrect.FusedBNPReLU(8, num_parameters=4)


def test_from_modules_rejects_wrong_types():
    with pytest.raises(TypeError, match="act: expected an nn.PReLU module, got ReLU"):
        fusedrect.FusedBNPReLU.from_modules(torch.nn.BatchNorm2d(3), torch.nn.ReLU())
    with pytest.raises(TypeError, match="bn: expected an nn.BatchNorm1d/2d/3d module, got LayerNorm"):
        fusedrect.FusedBNReLU.from_modules(torch.nn.LayerNorm(3), torch.nn.ReLU())
    with pytest.raises(ValueError, match="act: expected num_parameters 1 or 3, got 2"):
        fusedrect.FusedBNPReLU.from_modules(torch.nn.BatchNorm2d(3), torch.nn.PReLU(2))


def test_ops_reject_unsupported_strides():
    x = torch.randn(4, 3, 6, 6)[:, :, ::2]
    with pytest.raises(RuntimeError, match="input: expected a contiguous or channels-last tensor"):
        torch.ops.fusedrect.bn_act_fwd_train(x, None, None, None, 1e-5)


def _layouts():
    """Tensors whose strides test the ops' layout check: dims of size 1 with any stride, empty, 2-D, 3-D and 5-D
    channels-last, expanded, transposed spatial dims, a sliced channel dim."""
    base = torch.randn(2, 3, 4, 5)
    yield pytest.param(base, id="contiguous")
    yield pytest.param(base.contiguous(memory_format=torch.channels_last), id="channels_last")
    yield pytest.param(torch.randn(2, 3, 2, 3, 4).contiguous(memory_format=torch.channels_last_3d),
                       id="channels_last_3d")
    yield pytest.param(torch.randn(2, 7, 3).transpose(1, 2), id="nlc")
    yield pytest.param(torch.randn(5, 3), id="2d")
    yield pytest.param(torch.randn(3, 5).t(), id="2d_transposed")
    yield pytest.param(torch.randn(3, 4, 5).unsqueeze(0).as_strided((1, 3, 4, 5), (999, 1, 15, 3)),
                       id="n1_odd_stride")
    yield pytest.param(torch.randn(2, 3).as_strided((2, 3, 1, 1), (3, 1, 7, 11)), id="s1_odd_stride")
    yield pytest.param(torch.randn(2, 20).as_strided((2, 1, 4, 5), (20, 77, 5, 1)), id="c1_odd_stride")
    yield pytest.param(torch.randn(0, 3, 4, 5).contiguous(memory_format=torch.channels_last), id="empty_batch")
    yield pytest.param(torch.randn(1, 3, 1, 1).expand(2, 3, 4, 5), id="expanded")
    yield pytest.param(base.transpose(2, 3), id="hw_transposed")
    yield pytest.param(torch.randn(2, 6, 4, 5)[:, ::2], id="channel_slice")
    yield pytest.param(torch.randn(2, 6, 4, 5).contiguous(memory_format=torch.channels_last)[:, :3],
                       id="cl_channel_slice")


@pytest.mark.parametrize("x", list(_layouts()))
def test_ops_accept_exactly_the_native_layouts(x):
    """The compiled ops walk a tensor's memory where it is contiguous or a dense (N*S, C) matrix, whatever the
    strides of its size-1 dims, and reject the rest; the output keeps the input's strides."""
    if native_layout(x) is not x:
        with pytest.raises(RuntimeError, match="input: expected a contiguous or channels-last tensor"):
            torch.ops.fusedrect.bn_act_fwd_train(x, None, None, None, 1e-5)
        return
    y, _, _ = torch.ops.fusedrect.bn_act_fwd_train(x, None, None, None, 1e-5)
    want, _, _ = reference.bn_act_train(x.double(), None, None, None, 1e-5)
    assert y.stride() == torch.empty_like(x).stride()
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)


def test_functional_accepts_any_strides():
    x = torch.randn(4, 3, 6, 6)[:, :, ::2]
    y = fusedrect.bn_relu(x, None, None, training=True)
    torch.testing.assert_close(y, fusedrect.bn_relu(x.contiguous(), None, None, training=True))


def test_zero_eps_is_rejected_in_training():
    with pytest.raises(ValueError, match="eps: must be positive during training"):
        call(eps=0.0)


def test_from_modules_takes_dtype_from_the_activation_when_batchnorm_holds_no_tensor():
    bn = torch.nn.BatchNorm2d(3, affine=False, track_running_stats=False)
    act = torch.nn.PReLU(3).double()
    assert fusedrect.FusedBNPReLU.from_modules(bn, act).slope.dtype == torch.float64
