"""The CUDA C++ kernels of csrc/cuda on CPU tensors, without a GPU: a copy of their sources compiled as C++ with
host stand-ins for the CUDA built-ins (tests/cuda_emulation/emu.h; kernel launches and CUDA runtime calls
rewritten), against the CPU ops on awkward shapes, both layouts, every dtype and activation, misaligned memory
(the scalar paths), the SyncBN ops, and bitwise determinism. This checks the kernels' arithmetic, indexing and
merges; the GPU tests (test_gpu.py) check the rest."""
import re
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from conftest import (ACTIVATIONS, LAYOUTS, RANGE_SHAPES, check_frozen_backward_of_non_finite_input,
                      check_statistics_beyond_range, make_input, make_params)
from fusedrect import reference
from fusedrect.ops import _backend

ROOT = Path(__file__).resolve().parents[1]
EMU_H = Path(__file__).resolve().parent / "cuda_emulation" / "emu.h"

# (pattern, replacement) applied to every source of the copy; each must match somewhere.
REWRITES = [
    (r"([A-Za-z_][\w:]*<[^;{}]*?>)<<<(.+?),\s*(.+?),\s*0,\s*(.+?)>>>\(", r"::emu::launch(\2, \3, \1, "),
    (r"C10_CUDA_KERNEL_LAUNCH_CHECK\(\);", ""),
    (r"c10::cuda::getCurrentCUDAStream\(\)", "cudaStream_t(nullptr)"),
    (r"const c10::cuda::CUDAGuard guard\(\w+\.device\(\)\);", ""),
    (r"\n  check_cuda\(input, name\);", ""),  # the emulated ops take CPU tensors
    (r"C10_CUDA_CHECK\(cudaDeviceGetAttribute\(&count.*?\);", "count = 1;"),  # one multiprocessor
    (r"TORCH_LIBRARY_IMPL\(fusedrect, CUDA, m\) \{.*?\n\}", ""),  # the real extension registered it already
]
OPS = ("bn_act_fwd_train", "bn_act_fwd_eval", "bn_act_bwd", "bn_act_bwd_from_output", "bn_stats",
       "bn_act_bwd_reduce", "bn_act_bwd_elemt")
BINDING = """#include <torch/csrc/utils/pybind.h>
#include "csrc/cuda/bn_act.h"
#include "csrc/cuda/running_stats.h"
PYBIND11_MODULE(fusedrect_cuda_emulated, m) {
%s
}
""" % "\n".join(f'  m.def("{op}", &fusedrect::cuda::{op});' for op in (*OPS, "bn_update_running_stats", "bn_invstd"))


def write_if_changed(path, text):
    """Keeps the file's time stamp where its text is the same, so that ninja rebuilds only what changed."""
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture(scope="module")
def emulated():
    home = cpp_extension.CUDA_HOME
    if _backend.cuda_module() is None or not home or not (Path(home) / "include" / "cuda_runtime.h").exists():
        pytest.skip("needs the CUDA toolkit's headers (and a build with the CUDA part)")
    build = ROOT / "build" / "cuda_emulation"
    matched = [0] * len(REWRITES)
    sources = []
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix not in (".h", ".cuh", ".cu", ".cpp") or path.parent.name == "cpu":
            continue
        text = path.read_text()
        for i, (pattern, replacement) in enumerate(REWRITES):
            text, count = re.subn(pattern, replacement, text, flags=re.S)
            matched[i] += count
        target = build / path.relative_to(ROOT)
        if path.suffix == ".cu":
            target = target.with_suffix(".cu.cpp")
        write_if_changed(target, text)
        if path.parent.name == "cuda" and path.suffix in (".cu", ".cpp"):
            sources.append(str(target))
    stale = [REWRITES[i][0] for i, m in enumerate(matched) if not m]
    assert not stale, f"rewrites that no longer match csrc: {stale}"
    write_if_changed(build / "binding.cpp", BINDING)
    write_if_changed(build / "emu.h", EMU_H.read_text())
    return cpp_extension.load(
        name="fusedrect_cuda_emulated", sources=[str(build / "binding.cpp"), *sources],
        extra_cflags=["-O1", "-include", str(build / "emu.h"), f"-I{home}/include", "-w"],
        build_directory=str(build), with_cuda=False)


def misaligned(x):
    """x's values and strides in memory that starts one element past a 16-byte boundary."""
    y = torch.empty(x.numel() + 1, dtype=x.dtype)[1:].as_strided(x.shape, x.stride())
    return y.copy_(x)


def assert_near(got, want, tol):
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.numel():
        scale = max(1.0, want.double().abs().max().item())
        torch.testing.assert_close(got.double(), want.double(), atol=tol * scale, rtol=0)


TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
SHAPES = [(3, 3, 7, 7), (2, 33, 9, 9), (17, 33, 1, 1), (3, 5, 3), (2, 3, 40, 40)]
# (dtype, activation, aligned): misaligned memory takes the scalar paths, the same code for every dtype.
CASES = [(torch.float32, "relu", True), (torch.float32, "prelu", True), (torch.float32, "prelu_shared", True),
         (torch.float64, "prelu", True), (torch.bfloat16, "prelu", True), (torch.float16, "relu", True),
         (torch.float32, "prelu", False)]


@pytest.mark.parametrize("dtype, activation, aligned", CASES,
                         ids=lambda v: v if isinstance(v, str) else str(v).replace("torch.", ""))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_emulated_cuda_kernels_match_the_cpu_ops(emulated, shape, layout, dtype, activation, aligned):
    ops = torch.ops.fusedrect
    x = make_input(shape, layout, dtype, scale=2.0, shift=1.0)
    grad = torch.empty_like(x).copy_(torch.randn(shape, dtype=torch.float64))
    if not aligned:
        x, grad = misaligned(x), misaligned(grad)
    stats = reference.stats_dtype(x)
    weight, bias, slope = (p.to(stats) if p is not None else None for p in make_params(shape[1], activation))
    tol = TOLERANCE[dtype]

    y, mean, invstd = emulated.bn_act_fwd_train(x, weight, bias, slope, 1e-5)
    want_y, want_mean, want_invstd = ops.bn_act_fwd_train(x.clone(), weight, bias, slope, 1e-5)
    assert y.stride() == x.stride()
    assert_near(y, want_y, tol)
    exact_mean, exact_invstd = reference.batch_stats(x.double(), 1e-5)  # closer than the CPU ops' fp32 tiles
    assert_near(mean, exact_mean.to(stats), 2e-7 if stats == torch.float32 else 1e-12)
    assert_near(invstd, exact_invstd.to(stats), 1e-6 if stats == torch.float32 else 1e-12)
    # Eval computes each channel's coefficients in its pass, as the training forward's merge wrote them: the same y.
    assert torch.equal(emulated.bn_act_fwd_eval(x, mean, invstd, weight, bias, slope), y)
    args = (want_mean, want_invstd, weight, bias, slope)
    assert_near(emulated.bn_act_fwd_eval(x, *args), ops.bn_act_fwd_eval(x.clone(), *args), tol)
    for batch_stats in (True, False):
        grads = emulated.bn_act_bwd(grad, x, *args, batch_stats)
        for got, want in zip(grads, ops.bn_act_bwd(grad.clone(), x.clone(), *args, batch_stats)):
            assert_near(got, want, 5 * tol)
        assert all(torch.equal(a, b) for a, b in zip(grads, emulated.bn_act_bwd(grad, x, *args, batch_stats)))
    if slope is not None:
        positive = slope.abs() + 0.05
        out, _, out_invstd = ops.bn_act_fwd_train(x.clone(), weight, bias, positive, 1e-5)
        got = emulated.bn_act_bwd_from_output(grad, out if aligned else misaligned(out), out_invstd, weight, bias,
                                              positive)
        for g, w in zip(got, ops.bn_act_bwd_from_output(grad.clone(), out, out_invstd, weight, bias, positive)):
            assert_near(g, w, 20 * tol)

    mean, var = emulated.bn_stats(x)
    dims = [0, *range(2, x.dim())]
    assert_near(mean, x.double().mean(dims).to(stats), 1e-6 if stats == torch.float32 else 1e-12)
    assert_near(var, x.double().var(dims, unbiased=False).to(stats), 1e-5 if stats == torch.float32 else 1e-12)
    sums = emulated.bn_act_bwd_reduce(grad, x, *args)
    dx, dweight, dbias, dslope = emulated.bn_act_bwd(grad, x, *args, True)
    assert all(torch.equal(a, b) for a, b in zip(sums, (dbias, dweight, dslope)))
    for got, want in zip(sums, ops.bn_act_bwd_reduce(grad.clone(), x.clone(), *args)):
        assert_near(got, want, 5 * tol)
    count = x.numel() // x.shape[1]
    elemt = emulated.bn_act_bwd_elemt(grad, x, *args, sums[0], sums[1], count)
    assert torch.equal(elemt, dx)
    assert_near(elemt, ops.bn_act_bwd_elemt(grad.clone(), x.clone(), *args, sums[0], sums[1], count), 5 * tol)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_emulated_frozen_backward_of_non_finite_input(emulated, layout, activation):
    check_frozen_backward_of_non_finite_input(emulated, layout, activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", RANGE_SHAPES, ids=str)
def test_emulated_statistics_beyond_range(emulated, shape, layout, dtype):
    check_statistics_beyond_range(emulated, layout, shape, dtype)


@pytest.mark.parametrize("stats, running", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                            (torch.float32, torch.float16), (torch.float64, torch.float64)],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("momentum", [0.1, 0.7, "tensor"])
@pytest.mark.parametrize("buffers", ["both", "mean", "var"])
def test_emulated_running_stats_update_matches_the_reference(emulated, stats, running, momentum, buffers):
    """The one-kernel update against reference.update_running_stats (the composite's ATen ops), to a rounding
    of the lerp (the GPU fuses its multiply-add as ATen's CUDA lerp does; the host compiler here does not)."""
    C = 37
    mean, invstd = torch.randn(C, dtype=stats), (torch.rand(C, dtype=stats) + 0.2)
    invstd[3] = 1e3  # 1 / invstd^2 < eps: the clamp
    weight = torch.tensor(0.3, dtype=torch.float32) if momentum == "tensor" else momentum
    buffers = {"both": (True, True), "mean": (True, False), "var": (False, True)}[buffers]
    start = [torch.randn(C).abs().to(running) if keep else None for keep in buffers]
    ours, want = ([t.clone() if t is not None else None for t in start] for _ in range(2))
    emulated.bn_update_running_stats(*ours, mean, invstd, 1e-5, 9, 0.0 if momentum == "tensor" else momentum,
                                     weight if momentum == "tensor" else None)
    reference.update_running_stats(*want, mean, invstd, 1e-5, 9, weight)
    for got, expected, first in zip(ours, want, start):
        if first is not None:
            assert not torch.equal(expected, first)
            eps = torch.finfo(running).eps  # values of order 1: a rounding of the lerp's terms, not of its result
            torch.testing.assert_close(got, expected, rtol=2 * eps, atol=4 * eps)


@pytest.mark.parametrize("stats", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("var_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_emulated_invstd_is_the_cpu_ops_bit_for_bit(emulated, var_dtype, stats):
    var = (torch.rand(300, dtype=torch.float64) * 10.0 ** torch.randint(-9, 5, (300,))).to(var_dtype)
    var[:3] = torch.tensor([0.0, float("inf"), float("nan")])
    torch.testing.assert_close(emulated.bn_invstd(var, 1e-5, stats), torch.ops.fusedrect.bn_invstd(var, 1e-5, stats),
                               rtol=0, atol=0, equal_nan=True)
