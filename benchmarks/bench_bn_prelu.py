"""Benchmark of fused BatchNorm + PReLU/ReLU against eager PyTorch and torch.compile.

For every activation, shape, memory layout and mode, in one run: the time of one copy of the input (the
bandwidth yardstick), each provider's median time, its multiple of that copy, the speedups of fusedrect over
eager and over compile, and the bytes each provider saves for backward. On a GPU, ``--cuda-graphs`` times every
provider's step (and the copy) replayed from a CUDA graph: the device's work alone, without the host's time
to issue it, which decides a single layer's time at these sizes otherwise. Example:

    python benchmarks/bench_bn_prelu.py --json benchmarks/results/bn_prelu_cpu.json \
        --plot benchmarks/results/bn_prelu_cpu.png
"""
import argparse
import copy
import functools

import torch
from torch import nn

import fusedrect
from fusedrect.ops import _backend

from common import (DTYPES, Progress, check_common_args, copy_step, cuda_graphed, finish, format_table,
                    geometric_mean, median_ms, parse_shapes, pyplot, saved_bytes, speedup_bars)

RESNET_STAGES = ["32x64x56x56", "32x128x28x28", "32x256x14x14", "32x512x7x7"]
# frozen_fwd_bwd (opt-in): eval-mode forward + backward with every parameter frozen, as when fine-tuning a
# pretrained network around its BatchNorm layers.
MODES = ("train_fwd", "train_fwd_bwd", "eval_fwd", "frozen_fwd_bwd")
DEFAULT_MODES = MODES[:3]
ACTIVATIONS = ("prelu", "relu")
LAYOUTS = ("nchw", "channels_last")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--shapes", default=",".join(RESNET_STAGES), help="comma-separated NxC, NxCxL, NxCxHxW or NxCxDxHxW")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"some of {','.join(MODES)}")
    p.add_argument("--activations", default=",".join(ACTIVATIONS))
    p.add_argument("--providers", default="eager,compile,fusedrect", help="eager, compile, fusedrect")
    p.add_argument("--iters", type=int, default=10, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cuda-graphs", action="store_true",
                   help="time each step replayed from a CUDA graph (CUDA only): device time without host overhead")
    p.add_argument("--json", help="write one record per measurement to this path")
    p.add_argument("--plot", help="write a PNG bar chart of the speedups to this path")
    args = p.parse_args(argv)
    args.shapes = parse_shapes(p, "--shapes", args.shapes, ranks=(2, 3, 4, 5))  # BatchNorm1d, 2d or 3d inputs
    for name, allowed in (("layouts", LAYOUTS), ("modes", MODES), ("activations", ACTIVATIONS),
                          ("providers", ("eager", "compile", "fusedrect"))):
        values = getattr(args, name).split(",")
        unknown = set(values) - set(allowed)
        if unknown:
            p.error(f"--{name}: unknown {sorted(unknown)}; expected some of {allowed}")
        setattr(args, name, values)
    check_common_args(p, args)
    if args.cuda_graphs and args.device.type != "cuda":
        p.error("--cuda-graphs: needs --device cuda")
    return args


_BATCHNORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}  # by input rank


def eager_module(shape, activation, device, dtype):
    channels = shape[1]
    act = nn.PReLU(channels) if activation == "prelu" else nn.ReLU()
    return nn.Sequential(_BATCHNORMS[len(shape)](channels), act).to(device=device, dtype=dtype)


def fused_module(eager, activation, backend):
    cls = fusedrect.FusedBNPReLU if activation == "prelu" else fusedrect.FusedBNReLU
    module = cls.from_modules(eager[0], eager[1])
    module.backend = backend
    return module


def providers_for(args, eager, activation):
    """(provider, backend, module) for every provider requested and available on the device."""
    found = []
    if "eager" in args.providers:
        found.append(("eager", "", eager))
    if "compile" in args.providers:
        found.append(("compile", "inductor", torch.compile(copy.deepcopy(eager))))
    if "fusedrect" in args.providers:
        for backend in _backend.available(args.device):
            found.append(("fusedrect", backend, fused_module(eager, activation, backend)))
    return found


def frozen_copy(module):
    """An eval-mode copy of ``module`` (compiled again where it was) whose parameters need no gradient."""
    inner = getattr(module, "_orig_mod", module)
    frozen = copy.deepcopy(inner).eval().requires_grad_(False)
    return torch.compile(frozen) if inner is not module else frozen


def step(module, mode, x, grad):
    """(run, forward): one timed step of ``mode``, and the forward whose saved tensors are counted (None: no
    graph)."""
    if mode == "eval_fwd":
        module.eval()

        def run():
            with torch.no_grad():
                module(x)
        return run, None
    if mode == "frozen_fwd_bwd":
        module = frozen_copy(module)
    else:
        module.train()
    if mode == "train_fwd":
        def run():
            module(x)
    else:
        def run():
            x.grad = None  # no accumulation pass into an existing gradient
            module(x).backward(grad)
    return run, functools.partial(module, x)


def make_input(shape, layout, device, dtype):
    """channels_last: the channels innermost in memory, at any rank (torch's channels_last for 4-D, its
    channels_last_3d for 5-D; an (N, C) input is both layouts at once)."""
    if layout == "channels_last":
        x = torch.randn((shape[0], *shape[2:], shape[1]), device=device, dtype=dtype).movedim(-1, 1)
    else:
        x = torch.randn(shape, device=device, dtype=dtype)
    return x.requires_grad_()


def run(args):
    """Every provider of every activation is timed in turns with the copy, per shape, layout and mode: their
    ratios (PReLU against ReLU included) come from the same moments of the machine. With --cuda-graphs all of
    it runs on a side stream: a capture may not touch the legacy default stream, on which autograd would
    otherwise synchronise the backward of inputs and parameters made there."""
    if args.cuda_graphs:
        with torch.cuda.stream(torch.cuda.Stream(args.device)):
            return measure(args)
    return measure(args)


def measure(args):
    records = []
    configs = [(shape, layout) for shape in args.shapes for layout in args.layouts]
    progress = Progress(len(configs) * len(args.modes))
    dtype = DTYPES[args.dtype]
    for shape, layout in configs:
        x = make_input(shape, layout, args.device, dtype)
        grad = torch.randn_like(x)
        torch._dynamo.reset()  # compiled graphs of this configuration only, never a recompile limit
        providers = [(activation, *p) for activation in args.activations
                     for p in providers_for(args, eager_module(shape, activation, args.device, dtype), activation)]
        for mode in args.modes:
            progress.step(f"{mode} {'x'.join(map(str, shape))} {layout}")
            steps = {(a, p, b): step(module, mode, x, grad) for a, p, b, module in providers}
            fns = {"copy": copy_step(x.detach())}
            fns.update({name: run for name, (run, _) in steps.items()})
            if args.cuda_graphs:
                fns = {name: cuda_graphed(fn) for name, fn in fns.items()}
            ms = median_ms(fns, args.device, args.warmup, args.iters)
            for activation, provider, backend, module in providers:
                forward = steps[(activation, provider, backend)][1]
                saved = 0 if forward is None else saved_bytes(forward)
                records.append({
                    "op": f"bn_{activation}", "provider": provider, "backend": backend, "mode": mode,
                    "activation": activation, "shape": list(shape), "memory_format": layout,
                    "dtype": args.dtype, "device": str(args.device), "median_ms": ms[(activation, provider, backend)],
                    "copy_ms": ms["copy"], "saved_bytes": saved, "cuda_graphs": args.cuda_graphs,
                })
    return records


def key(r):
    return (r["activation"], r["mode"], tuple(r["shape"]), r["memory_format"])


def report(records):
    """The table: one row per configuration, with every provider's time and fusedrect's speedups."""
    by_config = {}
    for r in records:
        by_config.setdefault(key(r), {})[(r["provider"], r["backend"])] = r
    names = sorted({(r["provider"], r["backend"]) for r in records}, key=lambda p: ("eager", "compile").index(
        p[0]) if p[0] in ("eager", "compile") else 2)
    fused = [n for n in names if n[0] == "fusedrect"]
    headers = ["act", "mode", "shape", "layout", "copy ms"]
    headers += [f"{p}{':' + b if p == 'fusedrect' else ''} ms (xcopy)" for p, b in names]
    headers += [f"{b} vs {other}" for _, b in fused for other in ("eager", "compile")]
    headers += [f"saved MB {p}{':' + b if p == 'fusedrect' else ''}" for p, b in names]
    rows = []
    for (act, mode, shape, layout), results in sorted(by_config.items(), key=lambda kv: ACTIVATIONS.index(kv[0][0])):
        first = next(iter(results.values()))
        row = [act, mode, "x".join(map(str, shape)), layout, f"{first['copy_ms']:.3f}"]
        for n in names:
            r = results.get(n)
            row.append(f"{r['median_ms']:.3f} ({r['median_ms'] / r['copy_ms']:.1f})" if r else "-")
        for n in fused:
            for other in ("eager", "compile"):
                base = next((r for (p, _), r in results.items() if p == other), None)
                row.append(f"{base['median_ms'] / results[n]['median_ms']:.2f}x" if base else "-")
        for n in names:
            r = results.get(n)
            row.append(f"{r['saved_bytes'] / 2**20:.1f}" if r else "-")
        rows.append(row)
    lines = [format_table(headers, rows), ""]
    for _, backend in fused:
        for act in sorted({k[0] for k in by_config}):
            for mode in MODES:
                for other in ("eager", "compile"):
                    ratios = [res[(other, "inductor" if other == "compile" else "")]["median_ms"]
                              / res[("fusedrect", backend)]["median_ms"]
                              for k, res in by_config.items() if k[0] == act and k[1] == mode
                              and (other, "inductor" if other == "compile" else "") in res]
                    if ratios:
                        lines.append(f"{backend} {act} {mode}: geometric-mean speedup over {other} "
                                     f"{geometric_mean(ratios):.2f}x (min {min(ratios):.2f}x)")
        overheads = [by_config[k][("fusedrect", backend)]["median_ms"]
                     / by_config[("relu",) + k[1:]][("fusedrect", backend)]["median_ms"] - 1
                     for k in by_config if k[0] == "prelu" and ("relu",) + k[1:] in by_config]
        if overheads:
            lines.append(f"{backend}: PReLU over ReLU, mean {100 * sum(overheads) / len(overheads):+.1f}% "
                         f"(max {100 * max(overheads):+.1f}%)")
    return "\n".join(lines)


def plot(path, records):
    plt = pyplot()

    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    fig, axes = plt.subplots(len(modes), 1, figsize=(14, 3.5 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        by_config = {}
        for r in records:
            if r["mode"] == mode:
                by_config.setdefault(key(r), {})[r["provider"] + (":" + r["backend"] if r["backend"] else "")] = r
        labels = [f"{k[0]}\n{'x'.join(map(str, k[2][1:]))}\n{'CL' if k[3] == 'channels_last' else 'NCHW'}"
                  for k in by_config]
        fused = sorted({p for res in by_config.values() for p in res if p.startswith("fusedrect")})
        series = [(f"{s} vs {other}", [res[other]["median_ms"] / res[s]["median_ms"] if other in res and s in res
                                       else 0 for res in by_config.values()])
                  for s in fused for other in ("eager", "compile:inductor")]
        speedup_bars(ax, labels, series,
                     f"{mode}: fusedrect speedup ({records[0]['device']}, {records[0]['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    args = parse_args(argv)
    finish(args, run(args), report, plot)


if __name__ == "__main__":
    main()
