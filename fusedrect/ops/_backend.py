"""Which implementation of the fusedrect ops runs, resolved per call, in one place.

Order of precedence: an explicit ``backend=`` argument, then the ``FUSEDRECT_BACKEND`` environment variable,
then ``"auto"``. An explicitly requested backend that cannot run raises; auto picks the fastest one that can
run on the tensor and warns once where that is the (slow) reference.

Backends:
    ``"cpp"``        the compiled C++ kernels of ``fusedrect._C`` (CPU tensors)
    ``"triton"``     the Triton kernels of ``fusedrect.kernels`` (CUDA tensors; CPU tensors under
                     ``TRITON_INTERPRET=1``, Triton's interpreter, for testing without a GPU)
    ``"cuda"``       the CUDA C++ kernels of ``fusedrect._C.cuda`` (CUDA tensors; needs a build with CUDA)
    ``"reference"``  ``fusedrect.reference``: pure PyTorch, any device, always available

CUDA tensors have two implementations behind one dispatcher kernel per op (a router: csrc/cuda/router.cpp
where the extension has its CUDA part, else that of fusedrect/ops/bn_act.py), which runs
:func:`cuda_implementation` of the op's tensor: ``FUSEDRECT_BACKEND`` where it names ``"triton"`` or ``"cuda"``,
else auto = the CUDA C++ kernels where the extension was built with them, else Triton. On an H200 (fp32, the
four ResNet stage shapes at batch 32, both layouts, the host's work included) the CUDA C++ path took
0.20-0.47x Triton's time in every case and mode, its kernels launched with less host work; it is what
``"auto"`` resolves to for CUDA tensors.
"""
import importlib.util
import os
import warnings

import torch

try:
    from fusedrect import _C
except ImportError as error:  # a pure-Python install: the package still works, slowly
    _C = None
    warnings.warn(
        f"fusedrect._C could not be imported ({error}); ops on CPU tensors fall back to the pure-PyTorch "
        "reference backend (CUDA tensors run the Triton kernels where triton is installed). Build it with "
        "`pip install --no-build-isolation .` in the fusedrect source tree.",
        RuntimeWarning,
        stacklevel=2,
    )

BACKENDS = ("cpp", "triton", "cuda", "reference")
CUDA_BACKENDS = ("triton", "cuda")  # the implementations the ops' CUDA router chooses from
ENV_VAR = "FUSEDRECT_BACKEND"

_warned_devices = set()


def compiled():
    """True when the compiled extension (and with it the ``torch.ops.fusedrect`` ops) is loaded."""
    return _C is not None


def cuda_module():
    """``fusedrect._C.cuda``, the CUDA C++ functions of the ops; None where _C is missing or built without CUDA."""
    return getattr(_C, "cuda", None)


def buffer_cache_module():
    """``fusedrect._C.buffer_cache``, the CPU ops' cache of output buffers (fusedrect.buffer_cache); None where
    _C is missing."""
    return getattr(_C, "buffer_cache", None)


_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_importable():
    """Whether triton is installed (looked up once, at import: torch.compile cannot trace the lookup itself)."""
    return _TRITON_FOUND


def triton_interpreted():
    """True when Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 before triton's import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def functorch_active():
    """Whether a torch.func transform (grad, vjp, jacrev, vmap, ...) runs the call: the ops' forward autograd is
    C++ (csrc/autograd.cpp), which those transforms refuse; the direct path's autograd.Functions serve them."""
    return torch._C._are_functorch_transforms_active()


def why_unavailable(backend, device):
    """Why ``backend`` cannot run on tensors on ``device``, or None where it can."""
    if backend == "cpp":
        if _C is None:
            return "fusedrect._C is not built"
        if device.type != "cpu":
            return f"it runs on CPU tensors only, got a {device.type} tensor"
    if backend == "triton":
        if not triton_importable():
            return "triton is not installed"
        if device.type == "cpu" and not triton_interpreted():
            return "it runs on CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"it runs on CUDA tensors, got a {device.type} tensor"
    if backend == "cuda":
        if _C is None:
            return "fusedrect._C is not built"
        if cuda_module() is None:
            return ("fusedrect._C was built without CUDA (FUSEDRECT_FORCE_CPU=1, a CPU-only torch, or no CUDA "
                    "toolkit at build time)")
        if device.type != "cuda":
            return f"it runs on CUDA tensors only, got a {device.type} tensor"
    return None


def available(device):
    """The kernel backends that can run on tensors on ``device`` (the reference always can)."""
    return [b for b in BACKENDS if b != "reference" and why_unavailable(b, device) is None]


def cuda_implementation(x):
    """The implementation that the ops' CUDA router runs for the CUDA tensor ``x``: ``"triton"`` or ``"cuda"``.

    A pure function of ``FUSEDRECT_BACKEND`` and the build, not of x (the routers pass it; every layout and dtype
    gets the same answer: the CUDA C++ path was the faster in every case measured): the variable where it names
    one of the two, else the CUDA C++ kernels where the extension has them, else Triton. Whether the pick can run
    is the router's check, not this one's.
    """
    requested = os.environ.get(ENV_VAR)
    if requested in CUDA_BACKENDS:
        return requested
    return "cuda" if cuda_module() is not None else "triton"


_REQUESTS = ("auto", *BACKENDS)


def resolve(backend, x):
    """The backend that runs for the tensor ``x``, given the ``backend=`` argument (or None)."""
    device = x.device
    requested = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if requested not in _REQUESTS:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source}: expected one of {_REQUESTS}, got {requested!r}")
    if requested != "auto":
        reason = why_unavailable(requested, device)
        if reason is not None:
            raise RuntimeError(f"fusedrect backend {requested!r} cannot run: {reason}")
        return requested
    preferred = None
    if device.type == "cpu":
        if _C is not None:
            return "cpp"  # why_unavailable's answer, without the call (this runs on every call)
    elif device.type == "cuda":
        preferred = cuda_implementation(x)
    if preferred is not None and why_unavailable(preferred, device) is None:
        return preferred
    if _C is not None and device.type not in _warned_devices:
        _warned_devices.add(device.type)
        warnings.warn(
            f"fusedrect has no fused kernels for {device.type} tensors; using the reference backend",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"


def build_info():
    """What the installed extension holds: its CPU instruction set and the CUDA runtime it was built for."""
    if _C is None:
        return {"compiled": False, "cpu_capability": None, "cuda_runtime_version": None}
    return {"compiled": True, "cpu_capability": _C.cpu_capability, "cuda_runtime_version": _C.cuda_runtime_version}
