"""Host-side cost of a BatchNorm + PReLU/ReLU layer on a GPU: the time the CPU takes to issue one step of each
provider (launches, dispatch, Python), next to the device time of bench_bn_prelu.py. A layer whose host time
exceeds its device time leaves the GPU waiting, however fast its kernels are. Then torch.profiler's table of
the host time per op of one fused training step, by backend. On CUDA with the CUDA C++ backend, first the host
time per call at each level of the call stack (the extension's function called directly, the op through the
dispatcher, the module), each called back to back. Example:

    python benchmarks/profile_host.py --shape 32x128x28x28 --layout channels_last
"""
import argparse
import statistics
import time

import torch

from bench_bn_prelu import eager_module, fused_module, make_input, step
from common import DTYPES, check_common_args, format_table, median_ms, parse_shapes, synchronize
from fusedrect.ops import _backend


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--shape", default="32x128x28x28", help="NxC, NxCxL, NxCxHxW or NxCxDxHxW")
    p.add_argument("--layout", choices=["nchw", "channels_last"], default="nchw")
    p.add_argument("--activation", choices=["prelu", "relu"], default="prelu")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--profile-rows", type=int, default=20, help="rows of each profiler table (0: none)")
    args = p.parse_args(argv)
    (args.shape,) = parse_shapes(p, "--shape", args.shape, ranks=(2, 3, 4, 5))
    check_common_args(p, args)
    return args


def host_ms(run, device, iters):
    """Median time for the host to return from ``run()`` with an idle device queue (no wait for the kernels)."""
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    synchronize(device)
    return statistics.median(times)


def back_to_back_us(run, iters):
    """Host microseconds per call of ``run()`` called ``iters`` times in a row (the device queue never drains:
    the host's rate of issuing is what is measured)."""
    for _ in range(10):
        run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / iters * 1e6


def call_stack_rows(x, grad, eager, fused, iters):
    """Host time per call of the CUDA C++ backend's ops at each level, and of the modules, with eager's."""
    cuda = _backend.cuda_module()
    x0, C = x.detach(), x.shape[1]
    w, b, s = (torch.full((C,), v, device=x.device) for v in (1.0, 0.0, 0.25))
    mean, invstd = cuda.bn_stats(x0)
    rm, rv = torch.zeros(C, device=x.device), torch.ones(C, device=x.device)
    one = torch.zeros(1, device=x.device)
    ops = torch.ops.fusedrect
    calls = [
        ("one ATen op on a single element (a launch)", lambda: one.add_(0)),
        ("_C.cuda.bn_act_fwd_train (direct)", lambda: cuda.bn_act_fwd_train(x0, w, b, s, 1e-5)),
        ("torch.ops.fusedrect.bn_act_fwd_train", lambda: ops.bn_act_fwd_train(x0, w, b, s, 1e-5)),
        ("_C.cuda.bn_act_fwd_eval (direct)", lambda: cuda.bn_act_fwd_eval(x0, mean, invstd, w, b, s)),
        ("torch.ops.fusedrect.bn_act_fwd_eval", lambda: ops.bn_act_fwd_eval(x0, mean, invstd, w, b, s)),
        ("_C.cuda.bn_act_bwd (direct)", lambda: cuda.bn_act_bwd(grad, x0, mean, invstd, w, b, s, True)),
        ("torch.ops.fusedrect.bn_act_bwd", lambda: ops.bn_act_bwd(grad, x0, mean, invstd, w, b, s, True)),
        ("torch.ops.fusedrect.bn_update_running_stats",
         lambda: ops.bn_update_running_stats(rm, rv, mean, invstd, 1e-5, x0.numel() // C, 0.1, None)),
        ("torch.batch_norm, training (eager's op)", lambda: torch.batch_norm(x0, w, b, rm, rv, True, 0.1, 1e-5, True)),
    ]
    with torch.no_grad():
        rows = [[name, f"{back_to_back_us(run, iters):.1f}"] for name, run in calls]
    for mode in ("train_fwd", "train_fwd_bwd", "eval_fwd"):
        for name, module in (("eager", eager), ("fusedrect:cuda", fused)):
            rows.append([f"{name} module, {mode}", f"{back_to_back_us(step(module, mode, x, grad)[0], iters):.1f}"])
    return rows


def profile_table(run, device, rows):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for _ in range(3):
        run()
    synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        run()
        synchronize(device)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv=None):
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    x = make_input(args.shape, args.layout, args.device, dtype)
    grad = torch.randn_like(x)
    eager = eager_module(args.shape, args.activation, args.device, dtype)
    providers = [("eager", eager)] + [(f"fusedrect:{b}", fused_module(eager, args.activation, b))
                                      for b in _backend.available(args.device)]
    if args.device.type == "cuda" and "cuda" in _backend.available(args.device):
        fused = dict(providers)["fusedrect:cuda"]
        print(f"host us per call, back to back ({'x'.join(map(str, args.shape))} {args.layout} {args.dtype}, "
              f"no_grad for the ops)")
        print(format_table(["call", "host us"], call_stack_rows(x, grad, eager, fused, 10 * args.iters)))
        print()
    rows = []
    for mode in ("train_fwd", "train_fwd_bwd", "eval_fwd"):
        runs = {name: step(module, mode, x, grad)[0] for name, module in providers}
        device = median_ms(runs, args.device, iters=args.iters)
        for name, run in runs.items():
            rows.append([mode, name, f"{host_ms(run, args.device, args.iters):.3f}", f"{device[name]:.3f}"])
    print(f"{'x'.join(map(str, args.shape))} {args.layout} {args.dtype} {args.activation} on {args.device}")
    print(format_table(["mode", "provider", "host ms", "device ms"], rows))
    if args.profile_rows:
        for name, module in providers:
            print(f"\n{name}, train_fwd_bwd: host time per op")
            print(profile_table(step(module, "train_fwd_bwd", x, grad)[0], args.device, args.profile_rows))


if __name__ == "__main__":
    main()
