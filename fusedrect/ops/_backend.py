"""Which implementation of the fusedrect ops runs, resolved per call, in one place.

Order of precedence: an explicit ``backend=`` argument, then the ``FUSEDRECT_BACKEND`` environment variable,
then ``"auto"``. An explicitly requested backend that cannot run raises; auto picks the fastest one that can
run on the tensor's device and warns once where that is the (slow) reference.

Backends:
    ``"cpp"``        the compiled C++ kernels of ``fusedrect._C`` (CPU tensors)
    ``"triton"``     the Triton kernels of ``fusedrect.kernels`` (CUDA tensors; CPU tensors under
                     ``TRITON_INTERPRET=1``, Triton's interpreter, for testing without a GPU)
    ``"reference"``  ``fusedrect.reference``: pure PyTorch, any device, always available
"""
import importlib.util
import os
import warnings

try:
    from fusedrect import _C
except ImportError as error:  # a pure-Python install: the package still works, slowly
    _C = None
    warnings.warn(
        f"fusedrect._C could not be imported ({error}); every op falls back to the pure-PyTorch reference "
        "backend. Build it with `pip install --no-build-isolation .` in the fusedrect source tree.",
        RuntimeWarning,
        stacklevel=2,
    )

BACKENDS = ("cpp", "triton", "reference")
ENV_VAR = "FUSEDRECT_BACKEND"

_warned_devices = set()


def compiled():
    """True when the compiled extension (and with it the ``torch.ops.fusedrect`` ops) is loaded."""
    return _C is not None


def triton_interpreted():
    """True when Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 before triton's import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _why_unavailable(backend, device):
    if backend == "cpp":
        if _C is None:
            return "fusedrect._C is not built"
        if device.type != "cpu":
            return f"it runs on CPU tensors only, got a {device.type} tensor"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if device.type == "cpu" and not triton_interpreted():
            return "it runs on CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"it runs on CUDA tensors, got a {device.type} tensor"
    return None


def available(device):
    """The kernel backends that can run on tensors on ``device`` (the reference always can)."""
    return [b for b in BACKENDS if b != "reference" and _why_unavailable(b, device) is None]


def resolve(backend, device):
    """The backend that runs for a tensor on ``device``, given the ``backend=`` argument (or None)."""
    requested = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if requested not in ("auto", *BACKENDS):
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source}: expected one of {('auto', *BACKENDS)}, got {requested!r}")
    if requested != "auto":
        reason = _why_unavailable(requested, device)
        if reason is not None:
            raise RuntimeError(f"fusedrect backend {requested!r} cannot run: {reason}")
        return requested
    preferred = "cpp" if device.type == "cpu" else "triton"
    if _why_unavailable(preferred, device) is None:
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
