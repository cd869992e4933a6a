"""The slopes a PReLU net learns, per layer (He et al. 2015, Table 1: the first layers learn large slopes,
deeper layers smaller ones). Trains the same small conv net on scikit-learn's digits with channel-wise and
with channel-shared slopes (fusedrect.FusedBNPReLU, num_parameters=None / 1) and plots the slopes per layer."""
import torch
from torch import nn

import fusedrect
from shared import accuracy, digits, parse_args, pyplot, save, train

WIDTHS = (32, 32, 64, 64, 128, 128)


def net(shared):
    layers, cin = [], 1
    for i, width in enumerate(WIDTHS):
        conv = nn.Conv2d(cin, width, 3, padding=1, bias=False)
        fusedrect.init.kaiming_normal_(conv.weight, slope=0.25)
        layers += [conv, fusedrect.FusedBNPReLU(width, num_parameters=1 if shared else None)]
        if i % 2 == 1 and i < len(WIDTHS) - 1:
            layers.append(nn.MaxPool2d(2))
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


def main():
    args = parse_args(__doc__)
    train_data, test_data = digits(args.seed)
    steps = 5 if args.smoke else 1500
    results = {"steps": steps, "widths": WIDTHS, "init": 0.25}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for shared in (False, True):
        torch.manual_seed(args.seed)
        model = net(shared)
        losses = train(model, train_data, steps, lr=0.05, seed=args.seed)
        slopes = [m.slope.detach().tolist() for m in model.modules() if isinstance(m, fusedrect.FusedBNPReLU)]
        key = "channel_shared" if shared else "channel_wise"
        results[key] = {
            "slopes": slopes,
            "mean_slope_per_layer": [sum(s) / len(s) for s in slopes],
            "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "test_accuracy": accuracy(model, test_data),
        }
        layers = range(1, len(slopes) + 1)
        ax.plot(layers, results[key]["mean_slope_per_layer"], marker="o", label=f"{key} (mean over channels)")
        if not shared:
            ax.fill_between(layers, [min(s) for s in slopes], [max(s) for s in slopes], alpha=0.2,
                            label="channel-wise: min to max")
        print(key, ["%.3f" % v for v in results[key]["mean_slope_per_layer"]],
              f"test accuracy {results[key]['test_accuracy']:.3f}")
    ax.axhline(0.25, color="gray", linestyle="--", label="initial slope 0.25")
    ax.set_xlabel("layer")
    ax.set_ylabel("learned PReLU slope")
    ax.set_title(f"learned slopes after {steps} steps on digits")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(args, "learned_slopes", results, fig)


if __name__ == "__main__":
    main()
