""""PReLU improves model fitting with nearly zero extra computational cost" (He et al. 2015): the extra time of
BatchNorm + PReLU over BatchNorm + ReLU, training forward + backward, for eager PyTorch, torch.compile and
fusedrect, at the ResNet stage shapes. Measured with the benchmark harness (benchmarks/bench_bn_prelu.py)."""
import os
import sys

from shared import ROOT, parse_args, pyplot, save

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_bn_prelu  # noqa: E402


def main():
    args = parse_args(__doc__)
    bench_args = ["--device", "cpu", "--modes", "train_fwd_bwd", "--activations", "prelu,relu"]
    if args.smoke:
        bench_args += ["--shapes", "4x8x8x8", "--providers", "eager,fusedrect", "--iters", "2", "--warmup", "1"]
    else:  # a difference of two noisy timings: more iterations than the benchmark's default
        bench_args += ["--iters", "40", "--warmup", "5"]
    records = bench_bn_prelu.run(bench_bn_prelu.parse_args(bench_args))
    times = {}
    for r in records:
        provider = r["provider"] + (f":{r['backend']}" if r["provider"] == "fusedrect" else "")
        case = f"{'x'.join(map(str, r['shape']))} {r['memory_format']}"
        times.setdefault(provider, {}).setdefault(case, {})[r["activation"]] = r["median_ms"]
    overhead = {p: {case: t["prelu"] / t["relu"] - 1 for case, t in cases.items()} for p, cases in times.items()}
    for provider, cases in overhead.items():
        print(provider, " ".join(f"{case}: {100 * v:+.0f}%" for case, v in cases.items()))

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 5))
    providers = list(overhead)
    cases = list(next(iter(overhead.values())))
    width = 0.8 / len(providers)
    for i, provider in enumerate(providers):
        ax.bar([j + i * width for j in range(len(cases))], [100 * overhead[provider][c] for c in cases], width,
               label=provider)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(cases))])
    ax.set_xticklabels(cases, fontsize=7, rotation=15)
    ax.set_ylabel("extra time of PReLU over ReLU (%)")
    ax.set_title("BatchNorm + PReLU vs BatchNorm + ReLU, training forward + backward (CPU, fp32)")
    ax.legend()
    fig.tight_layout()
    save(args, "prelu_cost", {"times_ms": times, "prelu_overhead": overhead}, fig)


if __name__ == "__main__":
    main()
