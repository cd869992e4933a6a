"""Benchmark of fused pre-activation convolutions and pre-activation ResNet training against eager PyTorch
and torch.compile.

Two parts, in one run:
  units    BN -> act -> conv (1x1 and 3x3, C -> C, "same" padding) at the ResNet stage shapes, training
           forward + backward. Providers: ``eager`` (nn.BatchNorm2d, nn.ReLU/nn.PReLU, nn.Conv2d), ``compile``
           (torch.compile of it), ``split`` (fusedrect's BN + act kernel, then the framework's convolution) and
           ``fusedrect`` (FusedPreActConv2d).
  network  whole training steps (forward, cross-entropy, backward, SGD step) of preact_resnet(depth): ``eager``
           (the plain-module network), ``compile`` (torch.compile of it) and ``fusedrect`` (the fused network
           with the same weights). Throughput, step time, and memory: bytes saved for backward (every device)
           and peak allocated memory of a step (CUDA).

    python benchmarks/bench_preact.py --json benchmarks/results/preact_cpu.json --plot benchmarks/results/preact_cpu.png
    python benchmarks/bench_preact.py --device cuda --dtype bf16
"""
import argparse
import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

import fusedrect
from fusedrect.resnet import DEPTHS, preact_resnet

from common import (DTYPES, Progress, check_common_args, finish, format_table, geometric_mean, median_ms,
                    parse_shapes, pyplot, saved_bytes, speedup_bars, synchronize)

DEFAULTS = {  # per device: unit shapes, network depth, batch and image size
    "cpu": {"units": "8x64x56x56,8x128x28x28,8x256x14x14,8x512x7x7", "depth": 20, "batch": 32, "image": 32},
    "cuda": {"units": "32x64x56x56,32x128x28x28,32x256x14x14,32x512x7x7", "depth": 50, "batch": 64, "image": 224},
}
UNIT_PROVIDERS = ("eager", "compile", "split", "fusedrect")
NETWORK_PROVIDERS = ("eager", "compile", "fusedrect")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--activation", choices=("relu", "prelu"), default="relu")
    p.add_argument("--layout", choices=("nchw", "channels_last"), default="channels_last")
    p.add_argument("--units", help="comma-separated NxCxHxW of the single units (default: ResNet stages)")
    p.add_argument("--kernels", default="1,3", help="kernel sizes of the single units")
    p.add_argument("--depth", type=int, help="preact_resnet depth of the network part (0: skip it)")
    p.add_argument("--batch", type=int, help="batch size of the network part")
    p.add_argument("--image-size", type=int, help="input height and width of the network part")
    p.add_argument("--providers", default=",".join(UNIT_PROVIDERS))
    p.add_argument("--iters", type=int, default=10, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", help="write one record per measurement to this path")
    p.add_argument("--plot", help="write a PNG bar chart of the speedups to this path")
    args = p.parse_args(argv)
    check_common_args(p, args)
    defaults = DEFAULTS["cuda" if args.device.type == "cuda" else "cpu"]
    units = args.units if args.units is not None else defaults["units"]
    args.units = parse_shapes(p, "--units", units, ranks=(4,)) if units else []
    try:
        args.kernels = [int(k) for k in args.kernels.split(",")]
    except ValueError:
        p.error(f"--kernels: expected comma-separated ints, got {args.kernels!r}")
    if any(k < 1 or k % 2 == 0 for k in args.kernels):
        p.error(f"--kernels: expected odd sizes (the units pad k // 2 to keep the size), got {args.kernels}")
    args.depth = defaults["depth"] if args.depth is None else args.depth
    if args.depth and args.depth not in DEPTHS:
        p.error(f"--depth: expected 0 (no network part) or one of {DEPTHS}, got {args.depth}")
    for name in ("batch", "image_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')}: expected at least 1, got {value}")
    args.batch = args.batch or defaults["batch"]
    args.image_size = args.image_size or defaults["image"]
    args.providers = args.providers.split(",")
    unknown = set(args.providers) - set(UNIT_PROVIDERS)
    if unknown:
        p.error(f"--providers: unknown {sorted(unknown)}; expected some of {UNIT_PROVIDERS}")
    return args


def to_layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def module_to(module, args, dtype):
    """``module`` on the benchmark's device and dtype, its 4-D weights in the benchmark's layout."""
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    return module.to(args.device, dtype, memory_format=fmt)


def unit_providers(args, channels, kernel, dtype):
    """(provider, module) for the unit BN -> act -> conv(channels -> channels, kernel)."""
    fused = fusedrect.FusedPreActConv2d(channels, channels, kernel, padding=kernel // 2, activation=args.activation)
    fused = module_to(fused, args, dtype)
    eager = fused.to_modules()
    found = {"eager": eager, "fusedrect": fused}
    if "compile" in args.providers:
        torch._dynamo.reset()  # one compiled graph per configuration, never a recompile limit
        found["compile"] = torch.compile(copy.deepcopy(eager))
    if "split" in args.providers:
        bn_act = fusedrect.FusedBNPReLU if args.activation == "prelu" else fusedrect.FusedBNReLU
        found["split"] = nn.Sequential(bn_act.from_modules(eager[0], eager[1]), copy.deepcopy(eager[2]))
    return [(p, found[p]) for p in UNIT_PROVIDERS if p in args.providers]


def run_units(args, dtype, progress):
    records = []
    for shape in args.units:
        for kernel in args.kernels:
            progress.step(f"unit {kernel}x{kernel} {'x'.join(map(str, shape))}")
            x = to_layout(torch.randn(shape, device=args.device, dtype=dtype), args.layout).requires_grad_()
            grad = to_layout(torch.randn(shape, device=args.device, dtype=dtype), args.layout)
            providers = unit_providers(args, shape[1], kernel, dtype)

            def step(module):
                module.train()

                def run():
                    x.grad = None
                    module(x).backward(grad)
                return run

            ms = median_ms({p: step(m) for p, m in providers}, args.device, args.warmup, args.iters)
            for provider, module in providers:
                records.append({
                    "part": "unit", "provider": provider, "kernel": kernel, "shape": list(shape),
                    "activation": args.activation, "memory_format": args.layout, "dtype": args.dtype,
                    "device": str(args.device), "median_ms": ms[provider],
                    "saved_bytes": saved_bytes(functools.partial(module, x)),
                })
    return records


def network_providers(args, dtype):
    fused = module_to(preact_resnet(args.depth, activation=args.activation, fused=True), args, dtype)
    eager = fusedrect.revert_model(copy.deepcopy(fused))
    found = {"eager": eager, "fusedrect": fused}
    if "compile" in args.providers:
        torch._dynamo.reset()
        found["compile"] = torch.compile(copy.deepcopy(eager))
    return [(p, found[p]) for p in NETWORK_PROVIDERS if p in args.providers]


def peak_step_bytes(step, device):
    """Peak allocated memory of one step on CUDA (above what was allocated before it); None elsewhere."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def run_network(args, dtype, progress):
    records = []
    shape = (args.batch, 3, args.image_size, args.image_size)
    x = to_layout(torch.randn(shape, device=args.device, dtype=dtype), args.layout)
    num_classes = 10 if args.depth in (20, 32, 44, 56, 110, 164, 1001) else 1000
    target = torch.randint(0, num_classes, (args.batch,), device=args.device)
    progress.step(f"network preact_resnet{args.depth}, providers in turns")
    steps = {}
    for provider, model in network_providers(args, dtype):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), target).backward()
            optimizer.step()

        steps[provider] = (model, step)
    ms = median_ms({p: step for p, (_, step) in steps.items()}, args.device, args.warmup, args.iters)
    for provider, (model, step) in steps.items():
        records.append({
            "part": "network", "provider": provider, "depth": args.depth, "shape": list(shape),
            "activation": args.activation, "memory_format": args.layout, "dtype": args.dtype,
            "device": str(args.device), "median_ms": ms[provider], "images_per_s": args.batch / ms[provider] * 1e3,
            "saved_bytes": saved_bytes(functools.partial(model, x)) if provider != "compile" else None,
            "peak_bytes": peak_step_bytes(step, args.device),
        })
    return records


def run(args):
    dtype = DTYPES[args.dtype]
    progress = Progress(len(args.units) * len(args.kernels) + (1 if args.depth else 0))
    records = run_units(args, dtype, progress)
    if args.depth:
        records += run_network(args, dtype, progress)
    return records


def ratio(a, b):
    return a / b if a and b else float("nan")


def report(records):
    lines = []
    units = {}
    for r in records:
        if r["part"] == "unit":
            units.setdefault((r["kernel"], tuple(r["shape"])), {})[r["provider"]] = r
    if units:
        rows, speedups = [], {"eager": [], "compile": [], "split": []}
        for (kernel, shape), res in units.items():
            ours = res.get("fusedrect")
            row = [f"{kernel}x{kernel}", "x".join(map(str, shape))]
            for p in UNIT_PROVIDERS:
                row.append(f"{res[p]['median_ms']:.3f}" if p in res else "-")
            for other in speedups:
                if other not in res or not ours:  # a provider left out of the run
                    row.append("-")
                    continue
                s = ratio(res[other]["median_ms"], ours["median_ms"])
                speedups[other].append(s)
                row.append(f"{s:.2f}x")
            row.append(f"{ratio(ours['saved_bytes'], res['eager']['saved_bytes']):.2f}" if ours and "eager" in res
                       else "-")
            rows.append(row)
        rows.append(["geomean", "", "", "", "", "",
                     *(f"{geometric_mean(v):.2f}x" if v else "-" for v in speedups.values()), ""])
        lines += ["Pre-activation units, training forward + backward (ms; fusedrect speedup over each provider; "
                  "saved bytes as a fraction of eager's)",
                  format_table(["kernel", "shape", *(f"{p} ms" for p in UNIT_PROVIDERS), "vs eager", "vs compile",
                                "vs split", "saved/eager"], rows), ""]
    network = {r["provider"]: r for r in records if r["part"] == "network"}
    if network:
        eager = network.get("eager")
        rows = []
        for provider, r in network.items():
            rows.append([
                provider, f"{r['median_ms']:.1f}", f"{r['images_per_s']:.1f}",
                f"{ratio(r['images_per_s'], eager['images_per_s']):.2f}x" if eager else "-",
                f"{r['saved_bytes'] / 2**20:.1f}" if r["saved_bytes"] else "-",
                f"{ratio(r['saved_bytes'], eager['saved_bytes']):.2f}" if eager and r["saved_bytes"] else "-",
                f"{r['peak_bytes'] / 2**20:.1f}" if r["peak_bytes"] else "-",
            ])
        r0 = next(iter(network.values()))
        lines += [f"preact_resnet{r0['depth']} training step, input {'x'.join(map(str, r0['shape']))} "
                  f"({r0['activation']}, {r0['memory_format']}, {r0['dtype']}, {r0['device']})",
                  format_table(["provider", "step ms", "images/s", "vs eager", "saved MiB", "saved/eager",
                                "peak MiB"], rows)]
    return "\n".join(lines)


def plot(path, records):
    plt = pyplot()

    units = {}
    for r in records:
        key = (f"{r['kernel']}x{r['kernel']}\n{'x'.join(map(str, r['shape'][1:]))}" if r["part"] == "unit"
               else f"preact_resnet{r['depth']}\nstep")
        units.setdefault(key, {})[r["provider"]] = r["median_ms"]
    others = [p for p in ("eager", "compile", "split") if any(p in v for v in units.values())]
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(units)), 4))
    series = [(f"fusedrect vs {other}", [res[other] / res["fusedrect"] if other in res and "fusedrect" in res
                                         else 0 for res in units.values()]) for other in others]
    speedup_bars(ax, list(units), series,
                 f"Pre-activation units and network ({records[0]['device']}, {records[0]['dtype']})",
                 "speedup (training)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    args = parse_args(argv)
    finish(args, run(args), report, plot)


if __name__ == "__main__":
    main()
