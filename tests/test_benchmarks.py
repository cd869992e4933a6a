"""The benchmark harnesses on a tiny configuration: they run every mode, and each record they write holds a
positive time and copy time and the saved-for-backward bytes (none where no graph is built)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run_benchmark(script, *args, tmp_path):
    out = tmp_path / "records.json"
    subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--iters", "2", "--warmup", "1",
                    "--json", str(out)], check=True, capture_output=True, text=True, timeout=300)
    return json.loads(out.read_text())


def test_bn_prelu_benchmark_every_mode(tmp_path):
    modes = ["train_fwd", "train_fwd_bwd", "eval_fwd", "frozen_fwd_bwd"]
    result = run_benchmark("bench_bn_prelu.py", "--shapes", "4x8x5x5", "--providers", "eager,fusedrect",
                           "--modes", ",".join(modes), tmp_path=tmp_path)
    records = result["records"]
    assert {(r["provider"], r["mode"], r["activation"], r["memory_format"]) for r in records} == {
        (p, m, a, f) for p in ("eager", "fusedrect") for m in modes for a in ("prelu", "relu")
        for f in ("nchw", "channels_last")}
    for r in records:
        assert r["median_ms"] > 0 and r["copy_ms"] > 0
        assert (r["saved_bytes"] == 0) == (r["mode"] == "eval_fwd")
    fused = {(r["mode"], r["activation"], r["memory_format"]): r["saved_bytes"] for r in records
             if r["provider"] == "fusedrect"}
    assert fused[("train_fwd_bwd", "prelu", "nchw")] < 2 * 4 * 4 * 8 * 5 * 5  # one input-sized tensor + O(C)


def test_bn_prelu_benchmark_takes_every_batchnorm_rank(tmp_path):
    """BatchNorm1d (N, C) and (N, C, L) inputs and BatchNorm3d ones, each in both layouts (channels innermost for
    channels_last: what fusedrect walks as rows of channels)."""
    shapes = ["6x5", "4x3x7", "2x4x3x2x5"]
    result = run_benchmark("bench_bn_prelu.py", "--shapes", ",".join(shapes), "--providers", "eager,fusedrect",
                           "--modes", "train_fwd_bwd", "--activations", "prelu", tmp_path=tmp_path)
    got = {("x".join(map(str, r["shape"])), r["memory_format"], r["provider"]) for r in result["records"]}
    assert got == {(s, f, p) for s in shapes for f in ("nchw", "channels_last") for p in ("eager", "fusedrect")}
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_bn_prelu import make_input
    finally:
        sys.path.remove(str(BENCHMARKS))
    x = make_input((2, 4, 3, 2, 5), "channels_last", torch.device("cpu"), torch.float32)
    assert x.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("script, args, message", [
    ("bench_bn_prelu.py", ["--shapes", "4x0x3"], "--shapes: 4x0x3: expected 2 or 3 or 4 or 5 sizes, each at least 1"),
    ("bench_bn_prelu.py", ["--shapes", "4xa"], "--shapes: expected comma-separated sizes joined by x"),
    ("bench_bn_prelu.py", ["--iters", "0"], "--iters/--warmup: expected at least 1 timed"),
    ("bench_preact.py", ["--kernels", "2"], "--kernels: expected odd sizes"),
    ("bench_preact.py", ["--batch", "0"], "--batch: expected at least 1"),
    ("bench_preact.py", ["--device", "foo"], "--device:"),
    ("bench_buffer_cache.py", ["--layouts", "nhwc"], "--layouts: unknown ['nhwc']"),
], ids=lambda v: v if isinstance(v, str) and v.endswith(".py") else None)
def test_benchmarks_reject_bad_options(script, args, message):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and message in result.stderr


def test_preact_benchmark_units_and_network(tmp_path):
    result = run_benchmark("bench_preact.py", "--units", "2x8x6x6", "--kernels", "1,3", "--depth", "20", "--batch",
                           "2", "--image-size", "8", "--providers", "eager,split,fusedrect", tmp_path=tmp_path)
    records = result["records"]
    assert {(r["part"], r["provider"], r.get("kernel")) for r in records} == {
        *(("unit", p, k) for p in ("eager", "split", "fusedrect") for k in (1, 3)),
        ("network", "eager", None), ("network", "fusedrect", None)}
    assert all(r["median_ms"] > 0 and r["saved_bytes"] > 0 for r in records)
    saved = {(r["part"], r["provider"], r.get("kernel")): r["saved_bytes"] for r in records}
    assert saved[("network", "fusedrect", None)] < saved[("network", "eager", None)]


def test_buffer_cache_benchmark_runs_each_loop_in_every_setting(tmp_path):
    result = run_benchmark("bench_buffer_cache.py", "--shapes", "4x64x32x32", "--depth", "20", "--batch", "2",
                           tmp_path=tmp_path)
    records = result["records"]
    assert sorted((r["part"], r["provider"], r.get("memory_format"), r["buffer_cache"]) for r in records) == sorted(
        [("layer", "fusedrect", f, s) for f in ("nchw", "channels_last") for s in ("on", "off", "on+glibc")]
        + [("network", p, None, s) for p in ("eager", "fusedrect") for s in ("on", "off", "on+glibc")])
    for r in records:
        assert r["median_ms"] > 0 and r["faults_per_step"] >= 0
        if r["part"] == "layer":  # a 1 MiB layer: its outputs come from the cache where it is on
            on = r["buffer_cache"] != "off"
            assert (r["cache"]["limit_bytes"] > 0) == on and (r["cache"]["hits"] > 0) == on


def test_profile_host_reports_every_mode_and_provider():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "profile_host.py"), "--shape", "4x8x5x5", "--iters",
                             "3", "--profile-rows", "3"], check=True, capture_output=True, text=True, timeout=300)
    modes = ("train_fwd", "train_fwd_bwd", "eval_fwd")
    rows = [r for r in (line.split() for line in result.stdout.splitlines()) if len(r) == 4 and r[0] in modes]
    assert {(r[0], r[1]) for r in rows} == {(m, p) for m in modes for p in ("eager", "fusedrect:cpp")}
    assert len(rows) == 6 and all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)  # host ms, device ms
    assert result.stdout.count("train_fwd_bwd: host time per op") == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bn_prelu_benchmark_in_cuda_graphs(tmp_path):
    modes = ["train_fwd", "train_fwd_bwd", "eval_fwd"]
    result = run_benchmark("bench_bn_prelu.py", "--device", "cuda", "--cuda-graphs", "--shapes", "4x8x5x5",
                           "--modes", ",".join(modes), tmp_path=tmp_path)
    records = result["records"]
    assert {(r["provider"], r["mode"]) for r in records} >= {(p, m) for p in ("eager", "compile", "fusedrect")
                                                              for m in modes}
    assert all(r["cuda_graphs"] and r["median_ms"] > 0 for r in records)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_profile_host_reports_the_call_stack_on_cuda():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "profile_host.py"), "--shape", "4x8x5x5", "--iters",
                             "3", "--profile-rows", "0"], check=True, capture_output=True, text=True, timeout=300)
    assert "torch.ops.fusedrect.bn_act_bwd" in result.stdout and "fusedrect:cuda module, eval_fwd" in result.stdout
