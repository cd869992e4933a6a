"""The installed extension: what it was built with (its CUDA kernels: every one for sm_80 and sm_90, none
spilling), a CPU-only build, and the pure-Python fallback when it is missing."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fusedrect
from fusedrect.ops import _backend


def test_extension_is_built():
    info = fusedrect.build_info()
    assert info["compiled"]
    assert info["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512")


def cuda_toolkit():
    home = os.environ.get("CUDA_HOME")
    return home if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")) else None


@pytest.mark.skipif(
    torch.version.cuda is None or cuda_toolkit() is None or os.environ.get("FUSEDRECT_FORCE_CPU") == "1",
    reason="a CPU-only torch or no CUDA toolkit: the extension is built without its CUDA part",
)
def test_cuda_part_is_compiled_with_a_cuda_torch():
    version = fusedrect.build_info()["cuda_runtime_version"]
    assert version // 1000 == int(torch.version.cuda.split(".")[0])


def test_missing_extension_falls_back_to_reference_with_one_warning():
    script = textwrap.dedent(
        """
        import sys, warnings
        import torch
        sys.modules["fusedrect._C"] = None  # as if only the Python files were installed
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fusedrect
            layer = fusedrect.FusedBNPReLU(3)
            x = torch.randn(4, 3, 5, 5)
            y = layer(x)
            layer(x)
        expected = torch.nn.functional.prelu(torch.nn.functional.batch_norm(x, None, None, training=True),
                                             torch.full((3,), 0.25))
        torch.testing.assert_close(y, expected)
        torch.testing.assert_close(layer.running_mean, 0.19 * x.mean((0, 2, 3)))  # two updates, momentum 0.1
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and "reference backend" in messages[0], messages
        assert fusedrect.build_info()["compiled"] is False
        try:
            fusedrect.bn_relu(x, None, None, training=True, backend="cpp")
        except RuntimeError as error:
            assert "fusedrect._C is not built" in str(error)
        else:
            raise AssertionError("backend='cpp' ran without the extension")
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)


# Every CUDA kernel template and its number of instantiations per architecture (dtypes x index widths x
# activation modes): the test fails on a kernel gone missing and on needless instantiations added.
CUDA_KERNELS = {
    "stats_nchw_kernel": 8,  # 4 dtypes x 2 index widths
    "stats_cl_kernel": 8,
    "stats_merge_kernel": 2,  # fp32 / fp64 statistics
    "coefficients_kernel": 2,
    # (apply from the table or given statistics: ReLU, PReLU; dx: ReLU, PReLU, from output) x 4 dtypes x 2 widths
    "elementwise_nchw_kernel": 56,
    "elementwise_cl_kernel": 56,
    "bwd_reduce_nchw_kernel": 24,  # (ReLU, PReLU, from output) x 4 dtypes x 2 widths
    "bwd_reduce_cl_kernel": 24,
    "bwd_finalize_kernel": 2,
    "running_stats_kernel": 8,  # fp32 / fp64 statistics x fp64, fp32, fp16, bf16 running buffers
    "invstd_kernel": 8,  # fp32 / fp64 statistics x fp64, fp32, fp16, bf16 running variance
}


def cuobjdump():
    """The CUDA toolkit's cuobjdump, else the one bundled with triton, else None."""
    candidates = [os.path.join(cuda_toolkit() or "", "bin", "cuobjdump"), shutil.which("cuobjdump")]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def kernel_resources(library):
    """{(arch, mangled kernel name): {"REG": n, "STACK": n, "SHARED": n, "LOCAL": n}} from cuobjdump."""
    listing = subprocess.run([cuobjdump(), "--dump-resource-usage", library], capture_output=True, text=True,
                             check=True).stdout
    resources, arch, name = {}, None, None
    for line in listing.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            name = m.group(1)
        elif (m := re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)) and name is not None:
            resources[(arch, name)] = {key: int(value) for key, value in m}
            name = None
    return resources


@pytest.mark.skipif(_backend.cuda_module() is None, reason="the extension was built without its CUDA part")
def test_cuda_kernels_are_built_for_sm80_and_sm90_without_spills():
    """A register spill needs a stack frame (local memory): every kernel must have none, on both targets."""
    if cuobjdump() is None:
        pytest.skip("no cuobjdump (neither in the CUDA toolkit nor bundled with triton)")
    resources = kernel_resources(fusedrect._C.__file__)
    for arch in ("sm_80", "sm_90"):
        counts = {}
        for (kernel_arch, name), usage in resources.items():
            if kernel_arch != arch:
                continue
            base = next(k for k in CUDA_KERNELS if f"{len(k)}{k}I" in name)  # <length><name>I<template args>
            counts[base] = counts.get(base, 0) + 1
            assert usage["STACK"] == 0 and usage["LOCAL"] == 0, f"{arch} {name}: {usage}"
        assert counts == CUDA_KERNELS, arch


def test_cpu_only_build_imports_and_runs(tmp_path):
    """FUSEDRECT_FORCE_CPU=1 builds the extension without CUDA; the package imports and runs on CPU with it and
    names the missing part when the cuda backend is asked for."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FUSEDRECT_FORCE_CPU": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                    "--build-temp", str(tmp_path / "temp")], cwd=root, env=env, check=True, capture_output=True)
    package = tmp_path / "site" / "fusedrect"
    shutil.copytree(root / "fusedrect", package, ignore=shutil.ignore_patterns("*.so", "kernels", "__pycache__"))
    shutil.copytree(root / "kernels", package / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    for library in (tmp_path / "lib" / "fusedrect").glob("_C*.so"):
        shutil.copy(library, package)
    script = textwrap.dedent(
        """
        import torch
        import fusedrect
        from fusedrect.ops import _backend
        assert fusedrect.build_info()["compiled"] and fusedrect.build_info()["cuda_runtime_version"] == 0
        assert _backend.cuda_module() is None and "cuda" not in _backend.available(torch.device("cuda"))
        x = torch.randn(4, 3, 5, 5)
        torch.testing.assert_close(fusedrect.FusedBNReLU(3)(x), torch.relu(torch.nn.functional.batch_norm(
            x, None, None, training=True)))
        try:
            fusedrect.bn_relu(x, None, None, training=True, backend="cuda")
        except RuntimeError as error:
            assert "fusedrect._C was built without CUDA" in str(error), error
        else:
            raise AssertionError("backend='cuda' ran without the CUDA part")
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path,
                   env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
