"""The cache of recycled output buffers of the CPU ops.

PyTorch's CPU allocator does not cache: an output of more than glibc's mmap threshold (128 KiB to 32 MiB) is
mapped afresh on every call and each of its 4 KiB pages faults on first touch, which on small VMs costs more than
the fused pass that fills it. So the C++ CPU kernels take their input-sized outputs (y, dx) of 128 KiB or more
from a cache: a freed output is kept, up to a limit of idle bytes (the oldest freed first beyond it), and reused
by the next output of the same size rounded up to 4 KiB, as a training loop's next step asks for. Smaller
outputs, and every other backend, allocate as PyTorch does.

The limit is 512 MiB, or ``$FUSEDRECT_BUFFER_CACHE_MB`` MiB where set when fusedrect is imported (``0`` turns
the cache off); :func:`set_buffer_cache_limit` changes it, :func:`empty_buffer_cache` frees every idle buffer.
"""
import numbers
import os

from fusedrect.ops import _backend

ENV_VAR = "FUSEDRECT_BUFFER_CACHE_MB"


def buffer_cache_info():
    """``dict(limit_bytes, idle_bytes, idle_buffers, hits, misses)``: the limit, the idle buffers held now, and
    the requests of 128 KiB or more (a recycled output's growth by ``resize_`` included) served from the cache or
    by the allocator since the process started. All zero where the extension is not built (nothing is cached).
    Idle buffers count as allocated for PyTorch's CPU memory profiler, and a request served from the cache shows
    no allocation there."""
    cache = _backend.buffer_cache_module()
    if cache is None:
        return {"limit_bytes": 0, "idle_bytes": 0, "idle_buffers": 0, "hits": 0, "misses": 0}
    return cache.stats()


def set_buffer_cache_limit(nbytes):
    """Keep at most ``nbytes`` idle bytes (0: none), freeing the oldest idle buffers beyond it now."""
    if not isinstance(nbytes, numbers.Integral) or isinstance(nbytes, bool):
        raise TypeError(f"nbytes: expected an int, got {type(nbytes).__name__}")
    if not 0 <= nbytes < 2**63:
        raise ValueError(f"nbytes: expected a number of bytes from 0 to 2**63 - 1, got {nbytes}")
    cache = _backend.buffer_cache_module()
    if cache is not None:
        cache.set_limit(int(nbytes))


def empty_buffer_cache():
    """Free every idle buffer (outputs still in use are freed when they die; the limit stays)."""
    cache = _backend.buffer_cache_module()
    if cache is not None:
        cache.empty()


def _limit_from_environment():
    value = os.environ.get(ENV_VAR)
    if value is None:
        return
    try:
        mib = int(value)
    except ValueError:
        mib = -1
    if not 0 <= mib < 2**43:
        raise ValueError(f"{ENV_VAR}: expected a whole number of MiB from 0 to 2**43 - 1, got {value!r}")
    set_buffer_cache_limit(mib << 20)


_limit_from_environment()
