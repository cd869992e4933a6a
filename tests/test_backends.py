"""Which implementation runs, without a GPU: the environment variable, the backend= argument, the errors for a
backend that cannot run, the CUDA router's choice between Triton and the CUDA C++ kernels, and when a call
leaves the dispatcher for the direct path. CUDA tensors are stood in for by objects with a CUDA device (the
choice reads only the device, layout and dtype)."""
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedrect
from fusedrect.ops import _backend, bn_act

pytestmark = pytest.mark.skipif(not _backend.compiled(), reason="needs the compiled extension")


class CudaTensor:
    """What the backend choice reads of a CUDA tensor."""

    def __init__(self, dtype=torch.float32):
        self.device = torch.device("cuda", 0)
        self.dtype = dtype


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)


def stub_extension(monkeypatch, cuda_part):
    """fusedrect._C as if built with its CUDA part, or with FUSEDRECT_FORCE_CPU=1 (no ``cuda`` attribute)."""
    stub = types.SimpleNamespace(cpu_capability=_backend._C.cpu_capability, cuda_runtime_version=int(cuda_part))
    if cuda_part:
        stub.cuda = object()
    monkeypatch.setattr(_backend, "_C", stub)


@pytest.fixture
def without_cuda_part(monkeypatch):
    stub_extension(monkeypatch, cuda_part=False)


def test_cuda_is_a_backend():
    assert "cuda" in fusedrect.BACKENDS and set(_backend.CUDA_BACKENDS) == {"triton", "cuda"}


@pytest.mark.parametrize("env", ["triton", "cuda"])
def test_environment_variable_picks_the_cuda_implementation(monkeypatch, env):
    monkeypatch.setenv(_backend.ENV_VAR, env)
    assert _backend.cuda_implementation(CudaTensor()) == env


@pytest.fixture(params=[True, False], ids=["with_cuda_part", "without_cuda_part"])
def cuda_part(request, monkeypatch):
    stub_extension(monkeypatch, request.param)
    return request.param


@pytest.mark.parametrize("env", [None, "auto", "cpp", "reference"])
def test_auto_prefers_the_cuda_part_where_built(monkeypatch, env, cuda_part):
    if env is None:
        monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(_backend.ENV_VAR, env)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert _backend.cuda_implementation(CudaTensor(dtype)) == ("cuda" if cuda_part else "triton")


def test_auto_resolves_cuda_tensors_to_the_routers_choice(monkeypatch, no_env, cuda_part):
    monkeypatch.setattr(_backend, "triton_importable", lambda: True)
    assert _backend.resolve(None, CudaTensor()) == ("cuda" if cuda_part else "triton")
    assert _backend.resolve(None, torch.empty(2, 3)) == "cpp"


def test_auto_without_triton_or_the_cuda_part_runs_the_reference(without_cuda_part, monkeypatch, no_env):
    monkeypatch.setattr(_backend, "triton_importable", lambda: False)
    monkeypatch.setattr(_backend, "_warned_devices", set())
    with pytest.warns(RuntimeWarning, match="no fused kernels for cuda tensors"):
        assert _backend.resolve(None, CudaTensor()) == "reference"


def test_argument_wins_over_environment(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    assert _backend.resolve("reference", CudaTensor()) == "reference"
    if _backend.cuda_module() is not None:
        assert _backend.resolve("cuda", CudaTensor()) == "cuda"


def test_cuda_backend_on_a_cpu_tensor_raises(no_env):
    # Without the CUDA part (a CPU-only torch, FUSEDRECT_FORCE_CPU=1) the reason is that part's absence.
    reason = ("it runs on CUDA tensors only, got a cpu" if _backend.cuda_module() is not None
              else "fusedrect._C was built without CUDA")
    with pytest.raises(RuntimeError, match=f"backend 'cuda' cannot run: {reason}"):
        fusedrect.bn_relu(torch.randn(4, 3, 2, 2), None, None, training=True, backend="cuda")


def test_cuda_backend_without_the_cuda_part_raises(without_cuda_part, monkeypatch):
    assert _backend.why_unavailable("cuda", torch.device("cuda")).startswith("fusedrect._C was built without CUDA")
    assert "cuda" not in _backend.available(torch.device("cuda"))
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run: fusedrect._C was built without CUDA"):
        _backend.resolve(None, CudaTensor())


def test_router_runs_the_chosen_implementation(monkeypatch):
    calls = []
    fake = {backend: {name: (lambda *args, backend=backend, name=name: calls.append((backend, name)))
                      for name in bn_act._ROUTED} for backend in _backend.CUDA_BACKENDS}
    monkeypatch.setattr(bn_act, "_IMPLS", fake)
    monkeypatch.setattr(_backend, "why_unavailable", lambda backend, device: None)
    x = CudaTensor()
    for env in _backend.CUDA_BACKENDS:
        monkeypatch.setenv(_backend.ENV_VAR, env)
        bn_act._router("bn_act_fwd_train")(x, None, None, None, 1e-5)
        bn_act._router("bn_act_bwd")(x, x, None, None, None, None, None, True)
        bn_act._router("bn_act_bwd_elemt")(x, x, None, None, None, None, None, None, None, 4)
    assert calls == [(env, name) for env in _backend.CUDA_BACKENDS
                     for name in ("bn_act_fwd_train", "bn_act_bwd", "bn_act_bwd_elemt")]


def test_router_raises_when_its_choice_cannot_run(without_cuda_part, monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run: fusedrect._C was built without CUDA"):
        bn_act._router("bn_act_fwd_eval")(CudaTensor(), None, None, None, None, None)


def test_every_routed_op_has_one_cuda_kernel():
    for name in bn_act._ROUTED:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedrect::{name}", "CUDA"), name


def cuda_kernel(name, *args):
    """The dispatcher's CUDA kernel of op ``name`` called on (CPU) tensors: the router, as a CUDA tensor gets it."""
    return getattr(torch.ops.fusedrect, name).default.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)


@pytest.mark.skipif(_backend.cuda_module() is None, reason="the C++ router is the CUDA part's")
def test_the_cuda_kernels_are_the_cpp_router_in_a_cuda_build():
    for name in bn_act._ROUTED:
        assert "csrc/cuda/router.cpp" in torch._C._dispatch_dump(f"fusedrect::{name}"), name


@pytest.mark.skipif(_backend.cuda_module() is None, reason="the C++ router is the CUDA part's")
@pytest.mark.parametrize("env", [None, "cuda", "auto", "triton"])
def test_the_cpp_router_runs_cuda_cpp_unless_triton_is_named(monkeypatch, env):
    """The CUDA C++ implementation rejects a CPU tensor itself; a Triton call reaches the Python router, which
    rejects it (no interpreter in this process: tests/interpret runs the Triton path through it)."""
    if env is None:
        monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(_backend.ENV_VAR, env)
    x = torch.randn(4, 3, 2, 2)
    error = ("backend 'triton' cannot run: it runs on CPU tensors only under TRITON_INTERPRET=1" if env == "triton"
             else "input: expected a CUDA tensor")
    with pytest.raises(RuntimeError, match=error):
        cuda_kernel("bn_act_fwd_train", x, None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match=error):
        cuda_kernel("bn_act_bwd_elemt", x, x, *[torch.zeros(3)] * 2, None, None, None, *[torch.zeros(3)] * 2, 48)


@pytest.mark.parametrize("env", ["triton", "cuda"])
def test_a_backend_other_than_the_routers_goes_direct(monkeypatch, env):
    monkeypatch.setenv(_backend.ENV_VAR, env)
    other = "cuda" if env == "triton" else "triton"
    assert bn_act._through_dispatcher(env, CudaTensor())
    assert not bn_act._through_dispatcher(other, CudaTensor())
    assert bn_act._ops_for(other, CudaTensor()) is bn_act._IMPLS[other]
    assert bn_act._through_dispatcher("cpp", torch.empty(2, 3))
    assert not bn_act._through_dispatcher("triton", torch.empty(2, 3))  # the interpreter


@pytest.mark.parametrize("backend", fusedrect.BACKENDS)
def test_backend_checks_trace_under_torch_compile(backend):
    """torch.compile(fullgraph=True) traces the availability checks of every backend (an import lookup would
    break the graph: seen with torch 2.11 and backend="triton")."""
    torch._dynamo.reset()
    check = torch.compile(lambda x: x + (_backend.why_unavailable(backend, x.device) is None), fullgraph=True,
                          backend="eager")
    assert check(torch.zeros(1)).item() == (_backend.why_unavailable(backend, torch.device("cpu")) is None)


class _OpNames(TorchDispatchMode):
    """Records the name of every op that runs below it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def test_reference_backend_runs_no_extension_op():
    """backend="reference", the tests' oracle, is pure PyTorch all the way: the running statistics' update and
    eval's inverse standard deviation included, not the extension's ops (whatever bits those give)."""
    x, slope = torch.randn(4, 3, 5, 5), torch.full((3,), 0.25)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    with _OpNames() as ops:
        for training in (True, False):
            fusedrect.bn_prelu(x, running_mean, running_var, None, None, slope, training, backend="reference")
            fusedrect.preact_conv2d(x, running_mean, running_var, None, None, slope, torch.randn(2, 3, 3, 3),
                                    training=training, backend="reference")
    assert ops.names and not [name for name in ops.names if name.startswith("fusedrect::")]
