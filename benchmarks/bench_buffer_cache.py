"""Benchmark of the CPU ops' recycled output buffers (fusedrect.buffer_cache): training loops alone in their
process, with the cache on (its default limit) and off (``FUSEDRECT_BUFFER_CACHE_MB=0``).

Each configuration runs in a fresh process, as a training script would: ``FusedBNPReLU``'s forward + backward
in a loop at each shape and layout, and whole training steps of preact_resnet(depth) (fused, and eager for
reference). Reported: the median step time and the page faults per step (the process's minor faults, from
getrusage), which is what the cache removes. A third setting keeps the cache on and has glibc keep freed memory
too (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``): the outputs of PyTorch's own ops (a network's
convolutions) then stop faulting as well. The bn_prelu benchmark cannot show any of this: its providers run in
turns in one process, so the allocator's state is whatever the others left.

    python benchmarks/bench_buffer_cache.py --json benchmarks/results/buffer_cache_cpu.json
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import fusedrect
from fusedrect.resnet import DEPTHS, preact_resnet

from common import Progress, check_iterations, format_table, machine_info, parse_shapes, write_json

SHAPES = "32x64x56x56,32x128x28x28,32x256x14x14,32x512x7x7"
# The environment of each setting: the cache off, on (its default limit), and on with glibc keeping freed memory.
GLIBC_KEEPS = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}
SETTINGS = {"off": {"FUSEDRECT_BUFFER_CACHE_MB": "0"}, "on": {}, "on+glibc": GLIBC_KEEPS}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=SHAPES, help="comma-separated NxCxHxW of the layer loops")
    p.add_argument("--layouts", default="nchw,channels_last")
    p.add_argument("--depth", type=int, default=20, help="preact_resnet depth of the network loops (0: none)")
    p.add_argument("--batch", type=int, default=32, help="batch size of the network loops (32x32 images)")
    p.add_argument("--iters", type=int, default=20, help="timed steps per process (median reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", help="write one record per measurement to this path")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one configuration, as JSON: run it, print the result
    args = p.parse_args(argv)
    args.shapes = parse_shapes(p, "--shapes", args.shapes, ranks=(4,)) if args.shapes else []
    args.layouts = args.layouts.split(",")
    unknown = set(args.layouts) - {"nchw", "channels_last"}
    if unknown:
        p.error(f"--layouts: unknown {sorted(unknown)}; expected some of nchw, channels_last")
    check_iterations(p, args)
    if args.batch < 1:
        p.error(f"--batch: expected at least 1, got {args.batch}")
    if args.depth and args.depth not in DEPTHS:
        p.error(f"--depth: expected 0 (no network loops) or one of {DEPTHS}, got {args.depth}")
    return args


def layer_step(shape, layout):
    layer = fusedrect.FusedBNPReLU(shape[1])
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn_like(x)

    def step():
        x.grad = None
        layer(x).backward(grad)

    return step


def network_step(depth, batch, fused):
    torch.manual_seed(0)
    model = preact_resnet(depth, num_classes=10, activation="prelu", fused=fused).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, target = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()

    return step


def measure(step, warmup, iters):
    """(median ms, page faults per step) of ``iters`` steps after ``warmup``."""
    for _ in range(warmup):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return statistics.median(times), faults / iters


def run_child(config, args):
    if config["part"] == "layer":
        step = layer_step(tuple(config["shape"]), config["memory_format"])
    else:
        step = network_step(config["depth"], config["batch"], config["provider"] == "fusedrect")
    ms, faults = measure(step, args.warmup, args.iters)
    print(json.dumps({**config, "median_ms": ms, "faults_per_step": faults, "cache": fusedrect.buffer_cache_info()}))


def configs(args):
    for shape in args.shapes:
        for layout in args.layouts:
            yield {"part": "layer", "provider": "fusedrect", "shape": list(shape), "memory_format": layout}
    if args.depth:
        for provider in ("eager", "fusedrect"):
            yield {"part": "network", "provider": provider, "depth": args.depth, "batch": args.batch}


def run(args):
    records = []
    todo = [(config, setting) for config in configs(args) for setting in SETTINGS]
    progress = Progress(len(todo))
    for config, setting in todo:
        label = " ".join(str(v) for v in config.values())
        progress.step(f"{label} cache {setting}")
        env = {k: v for k, v in os.environ.items() if k not in ("FUSEDRECT_BUFFER_CACHE_MB", *GLIBC_KEEPS)}
        env.update(SETTINGS[setting])
        child = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(config),
                 "--iters", str(args.iters), "--warmup", str(args.warmup)]
        result = subprocess.run(child, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"bench_buffer_cache: {label} (cache {setting}) failed:\n{result.stderr}")
        out = result.stdout
        records.append({**json.loads(out.splitlines()[-1]), "buffer_cache": setting, "device": "cpu",
                        "dtype": "fp32"})
    return records


def report(records):
    by_config = {}
    for r in records:
        name = ("x".join(map(str, r["shape"])) + " " + r["memory_format"] if r["part"] == "layer"
                else f"preact_resnet{r['depth']} batch {r['batch']} {r['provider']}")
        by_config.setdefault(name, {})[r["buffer_cache"]] = r
    rows = []
    for name, runs in by_config.items():
        row = [name]
        for setting in SETTINGS:
            row += [f"{runs[setting]['median_ms']:.3f}", f"{runs[setting]['faults_per_step']:.0f}"]
        rows.append(row + [f"{runs['off']['median_ms'] / runs['on']['median_ms']:.2f}x"])
    headers = ["training loop"] + [h for setting in SETTINGS for h in (f"{setting} ms", "faults/step")]
    return format_table(headers + ["on vs off"], rows)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        run_child(json.loads(args.child), args)
        return
    records = run(args)
    print(report(records))
    if args.json:
        write_json(args.json, records, machine_info(torch.device("cpu")))


if __name__ == "__main__":
    main()
