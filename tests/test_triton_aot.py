"""Ahead-of-time compilation of every Triton kernel, every config and every input dtype for sm_80 and sm_90,
without a GPU, asserting that ptxas reports zero register spills."""
import importlib
import itertools
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed (it ships with CUDA builds of torch)")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16", "fp64")
# In the input dtype; the rest in the statistics dtype (fp32 for the convolutions' folded parameters/partials).
DATA_POINTERS = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr", "w_ptr", "out_ptr", "dout_ptr", "bias_ptr"}
FLOAT_SCALARS = {"eps"}  # Python floats: Triton passes them as fp32


def variants():
    """(module, kernel name, constexprs, options, input dtype) for every kernel, config and dtype."""
    for name, constexprs, num_warps, dtype in bn_act_variants():
        yield "bn_act", name, constexprs, {"num_warps": num_warps}, dtype
    yield from preact_conv_variants()


def preact_conv_variants():
    """Every config of each element size in its dtypes at one geometry; every geometry, activation and index
    width at each list's first config."""
    from fusedrect.kernels import preact_conv as K

    prelu, relu = K.PRELU.value, K.RELU.value
    for kernel, config_lists in (("_fwd_kernel", K.FWD_CONFIGS), ("_wgrad_kernel", K.WGRAD_CONFIGS)):
        bias = {"HAS_BIAS": True} if kernel == "_fwd_kernel" else {}
        for bits, dtypes in (("16", ("fp16", "bf16")), ("32", ("fp32",))):
            for dtype, (i, config) in itertools.product(dtypes, enumerate(config_lists[bits])):
                options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
                geometries = [(3, 1, 1, prelu, False)]
                if i == 0:
                    geometries += [(1, 1, 0, relu, False), (1, 2, 0, prelu, True), (3, 2, 1, relu, True),
                                   (3, 2, 1, prelu, True)]
                for ksize, stride, pad, act, index_64 in geometries:
                    constexprs = dict(KSIZE=ksize, STRIDE=stride, PAD=pad, ACT=act, INDEX_64=index_64, **bias,
                                      **config.kwargs)
                    yield "preact_conv", kernel, constexprs, options, dtype


def bn_act_variants():
    """(kernel name, constexprs, num_warps, input dtype) for every kernel, config and dtype of bn_act."""
    from fusedrect.kernels import bn_act as K

    def acc(dtype):
        import triton.language as tl

        return tl.float64 if dtype == "fp64" else tl.float32

    prelu, relu = K.PRELU.value, K.RELU.value
    for dtype in DTYPES:
        for index_64, act in ((False, prelu), (True, prelu), (False, relu)):
            common = dict(ACC=acc(dtype), INDEX_64=index_64)
            warps = K.REDUCE_WARPS
            yield "_stats_nchw_kernel", dict(common, BLOCK=K.REDUCE_BLOCK), warps, dtype
            yield "_stats_cl_kernel", dict(common, BLOCK_R=K.REDUCE_BLOCK_R, BLOCK_C=K.REDUCE_BLOCK_C), warps, dtype
            for from_output in (False, True) if act == prelu else (False,):
                reduce = dict(common, ACT=act, AFFINE=True, FROM_OUTPUT=from_output)
                yield "_bwd_reduce_nchw_kernel", dict(reduce, BLOCK=K.REDUCE_BLOCK), warps, dtype
                cl = dict(reduce, BLOCK_R=K.REDUCE_BLOCK_R, BLOCK_C=K.REDUCE_BLOCK_C)
                yield "_bwd_reduce_cl_kernel", cl, warps, dtype
        if dtype in ("fp32", "fp64"):  # these read only statistics-dtype buffers
            merge = dict(BLOCK_G=K.MERGE_BLOCK_G, BLOCK_C=K.MERGE_BLOCK_C)
            yield "_stats_merge_kernel", merge, K.MERGE_WARPS, dtype
            for act in (prelu, relu):
                yield "_bwd_finalize_kernel", dict(merge, ACT=act), K.MERGE_WARPS, dtype
        for i, config in enumerate(K.ELEMENTWISE_CONFIGS):
            for act, index_64 in ((prelu, False),) + (((relu, True),) if i == 0 else ()):
                layout = dict(ACT=act, AFFINE=True, CHANNELS_LAST=bool(i % 2), ACC=acc(dtype), INDEX_64=index_64)
                yield "_apply_kernel", dict(layout, **config.kwargs), config.num_warps, dtype
                dx = dict(layout, BATCH_STATS=True, FROM_OUTPUT=False, **config.kwargs)
                yield "_dx_kernel", dx, config.num_warps, dtype
        for i, config in enumerate(K.FROM_OUTPUT_CONFIGS):
            for channels_last in (False, True):
                dx = dict(ACT=prelu, AFFINE=True, CHANNELS_LAST=channels_last, ACC=acc(dtype), INDEX_64=i == 0,
                          BATCH_STATS=True, FROM_OUTPUT=True, **config.kwargs)
                yield "_dx_kernel", dx, config.num_warps, dtype


def signature(fn, constexprs, dtype):
    stats = "fp64" if dtype == "fp64" else "fp32"
    ints = "i64" if constexprs.get("INDEX_64") else "i32"
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + (dtype if name in DATA_POINTERS else stats)
        else:
            sig[name] = "fp32" if name in FLOAT_SCALARS else ints
    return sig


def compile_and_count_spills(job):
    """Compiles one variant for one arch; returns (description, spill bytes or an error message)."""
    module, name, constexprs, options, dtype, arch = job
    fn = getattr(importlib.import_module(f"fusedrect.kernels.{module}"), name)
    label = f"{module}.{name} {dtype} sm_{arch} {options} {constexprs}"
    try:
        kernel = triton.compile(ASTSource(fn, signature(fn, constexprs, dtype), constexprs),
                                target=GPUTarget("cuda", arch, 32), options=options)
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
            ptx.write(kernel.asm["ptx"])
            ptx.flush()
            log = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", ptx.name,
                                  "-o", os.devnull], capture_output=True, text=True, check=True).stderr
        spills = [int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
        assert spills, log
        return label, sum(spills)
    except Exception as error:  # reported with the variant that failed
        return label, f"{type(error).__name__}: {error}"


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    jobs = [(*v, arch) for v, arch in itertools.product(variants(), ARCHS)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(compile_and_count_spills, jobs, chunksize=4))
    failures = [f"{label}: {outcome}" for label, outcome in results if outcome != 0]
    assert not failures, "\n".join(failures[:20])
    for module in ("bn_act", "preact_conv"):
        kernels = {n for n in dir(importlib.import_module(f"fusedrect.kernels.{module}")) if n.endswith("_kernel")}
        assert {name for m, name, *_ in variants() if m == module} == kernels
