"""Helpers shared by the benchmarks: timing, the copy baseline, saved-for-backward bytes, progress, output."""
import json
import os
import platform
import random
import statistics
import sys
import time

import torch

import fusedrect

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_ORDERS = random.Random(0)  # median_ms' orders of turns


def parse_shapes(parser, option, text, ranks):
    """``text``, comma-separated sizes joined by x (``NxCxHxW``), as tuples of ``ranks`` sizes, each >= 1;
    ``parser.error`` otherwise."""
    try:
        shapes = [tuple(int(d) for d in s.split("x")) for s in text.split(",")]
    except ValueError:
        parser.error(f"{option}: expected comma-separated sizes joined by x, got {text!r}")
    for shape in shapes:
        if len(shape) not in ranks or min(shape) < 1:
            parser.error(f"{option}: {'x'.join(map(str, shape))}: expected {' or '.join(map(str, ranks))} sizes, "
                         "each at least 1")
    return shapes


def check_common_args(parser, args):
    """The device (a torch.device that exists here) and the timing counts every benchmark takes."""
    check_iterations(parser, args)
    try:
        args.device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.device.type == "cuda" and (args.device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    if args.device.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu or cuda, got {args.device.type}")


def check_iterations(parser, args):
    """--iters at least 1, --warmup (where the benchmark has it) at least 0."""
    warmup = getattr(args, "warmup", 0)
    if args.iters < 1 or warmup < 0:
        parser.error(f"--iters/--warmup: expected at least 1 timed and 0 warm-up iterations, got {args.iters} and "
                     f"{warmup}")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fns, device, warmup=3, iters=10):
    """Median time in milliseconds of each ``fns[name]()`` over ``iters`` runs after ``warmup`` runs.

    The functions are timed in turns, one run each per round, so that a slow spell of a shared machine falls on
    all of them alike and their ratios stay fair; each round in a new order (shuffled by one seeded generator for
    the whole run: the same orders in every run, different ones from case to case), so that what one function
    leaves in the caches falls on a different one each time. (With the order rotated instead, each function
    always ran right after the same one: on a CPU, fusedrect's BatchNorm + ReLU always after torch.compile's,
    whose training forward takes 35-55 times a copy of the input at 32x512x7x7 channels-last on a 2-core
    machine, and there its training forward took 1.5-1.6x that of BatchNorm + PReLU.) On a CPU a run is
    wall time; on a GPU it is the device's time between two events around the call, with the L2 cache
    flushed before each run (tensors of a few tens of MB would otherwise be read from a cache that holds them
    whole, and the copy baseline with them)."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    synchronize(device)
    timed = device_timed(device) if device.type == "cuda" else wall_timed(device)
    times = {name: [] for name in names}
    for _ in range(iters):
        for name in _ORDERS.sample(names, len(names)):
            times[name].append(timed(fns[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def wall_timed(device):
    def timed(fn):
        start = time.perf_counter()
        fn()
        synchronize(device)
        return (time.perf_counter() - start) * 1e3
    return timed


def device_timed(device, flush_bytes=256 << 20):
    flush = torch.empty(flush_bytes, dtype=torch.uint8, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(fn):
        flush.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    return timed


def cuda_graphed(fn, warmup=3):
    """``fn`` captured once in a CUDA graph, as its replay: the same kernels issued with no host work (no Python,
    no dispatcher, no launches one by one), so what is timed is the device's work alone. ``fn`` runs ``warmup``
    times on a side stream first (compilation, autotuning and the allocations happen there, as capture needs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_step(x):
    """One ``dst.copy_(x)`` of the same tensor: the memory-bandwidth yardstick (1 read + 1 write)."""
    dst = torch.empty_like(x)
    return lambda: dst.copy_(x)


def saved_bytes(forward):
    """Bytes of the distinct storages that autograd saves for backward while ``forward()`` runs."""
    storages = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total, width=30):
        self.total, self.width, self.done = total, width, 0
        self.start = time.perf_counter()

    def step(self, label):
        self.done += 1
        filled = self.width * self.done // max(self.total, 1)
        elapsed = time.perf_counter() - self.start
        bar = "#" * filled + "." * (self.width - filled)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {elapsed:5.0f}s {label[:60]:<60}")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def machine_info(device):
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fusedrect": fusedrect.__version__,
        "fusedrect_build": fusedrect.build_info(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def write_json(path, records, info):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": info, "records": records}, f, indent=1)


def format_table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(str(h).rjust(w) for h, w in zip(headers, widths))
    body = ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, "-" * len(line), *body])


def geometric_mean(values):
    values = [v for v in values if v and v > 0]
    return statistics.geometric_mean(values) if values else float("nan")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or a clear exit where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as error:
        raise SystemExit(f"--plot needs matplotlib ({error}); pip install matplotlib") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def speedup_bars(ax, labels, series, title, ylabel="speedup"):
    """Grouped bars on ``ax``: one group per label, one bar per ``(name, values)`` of ``series`` (values in the
    order of the labels), and the line at 1.0."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series):
        ax.bar([j + i * width for j in range(len(labels))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + (len(series) - 1) * width / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)


def finish(args, records, report, plot):
    """The table on stdout, then the JSON and the chart where --json / --plot ask for them."""
    print(report(records))
    if args.json:
        write_json(args.json, records, machine_info(args.device))
    if args.plot:
        plot(args.plot, records)
