"""He initialisation versus Xavier in deep plain (no shortcut, no BatchNorm) conv nets, with ReLU and PReLU.

(a) At initialisation: the standard deviation of the activations and of the gradients per layer, against
    theory: with a (P)ReLU of slope a, each layer multiplies the activation variance by
    n * Var[w] * (1 + a^2) / 2, so Xavier (Var[w] = 1 / n here, fan_in = fan_out) shrinks it by
    (1 + a^2) / 2 per layer (1/2 for ReLU) and He (Var[w] = 2 / ((1 + a^2) n)) keeps it constant.
(b) Training loss over the first epochs on scikit-learn's digits for 22- and 30-layer nets, each init and
    activation (He et al. 2015, Figure 3: the 30-layer ReLU net stalls under Xavier, converges under He), and
    the 22-layer net under Xavier with auxiliary classifiers on intermediate layers (the scheme "Going Deeper
    with Convolutions" used to keep gradients flowing) against the same net under He with no auxiliary heads.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

import fusedrect
from shared import accuracy, digits, parse_args, pyplot, save, smooth, train

WIDTH = 16
PRELU_INIT = 0.25


class PlainNet(nn.Module):
    """`depth` layers: depth - 1 convs (3x3, WIDTH channels, each followed by the rectifier) and a linear
    classifier on the flattened 8x8 maps; optional auxiliary classifiers after layers depth/3 and 2*depth/3."""

    def __init__(self, depth, activation, init, aux=False):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(1 if i == 0 else WIDTH, WIDTH, 3, padding=1) for i in range(depth - 1))
        self.acts = nn.ModuleList(nn.PReLU(WIDTH, PRELU_INIT) if activation == "prelu" else nn.ReLU()
                                  for _ in range(depth - 1))
        self.fc = nn.Linear(WIDTH * 64, 10)
        self.aux_at = {depth // 3: nn.Linear(WIDTH * 64, 10), 2 * depth // 3: nn.Linear(WIDTH * 64, 10)} if aux else {}
        self.aux_heads = nn.ModuleList(self.aux_at.values())
        slope = PRELU_INIT if activation == "prelu" else 0.0
        for conv in self.convs:
            if init == "he":
                fusedrect.init.kaiming_normal_(conv.weight, slope=slope)
            else:
                nn.init.xavier_normal_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x, taps=None):
        aux_logits = []
        for i, (conv, act) in enumerate(zip(self.convs, self.acts), start=1):
            x = act(conv(x))
            if taps is not None:
                x.retain_grad()
                taps.append(x)
            if i in self.aux_at:
                aux_logits.append(self.aux_at[i](x.flatten(1)))
        logits = self.fc(x.flatten(1))
        return (logits, aux_logits) if self.training and self.aux_at else logits


def loss_with_aux(model, x, y):
    """GoogLeNet's training loss: the main loss plus 0.3 times each auxiliary classifier's."""
    out = model(x)
    if isinstance(out, tuple):
        logits, aux = out
        return F.cross_entropy(logits, y) + 0.3 * sum(F.cross_entropy(a, y) for a in aux)
    return F.cross_entropy(out, y)


def std_per_layer(model, x, y):
    taps = []
    F.cross_entropy(model(x, taps), y).backward()
    return [t.std().item() for t in taps], [t.grad.std().item() for t in taps]


def main():
    args = parse_args(__doc__)
    train_data, test_data = digits(args.seed)
    depths = (6, 8) if args.smoke else (22, 30)
    steps = 5 if args.smoke else 300
    results = {"depths": depths, "steps": steps, "width": WIDTH, "init_std": {}, "runs": {}}
    probe = train_data[0][:256], train_data[1][:256]
    for depth in depths:
        for activation in ("relu", "prelu"):
            for init in ("xavier", "he"):
                name = f"{depth}-{activation}-{init}"
                torch.manual_seed(args.seed)
                acts, grads = std_per_layer(PlainNet(depth, activation, init), *probe)
                a = PRELU_INIT if activation == "prelu" else 0.0
                per_layer = (1 + a * a) / 2 if init == "xavier" else 1.0  # theory: variance ratio per layer
                results["init_std"][name] = {"activations": acts, "gradients": grads,
                                             "theory_std_ratio_per_layer": math.sqrt(per_layer)}
                torch.manual_seed(args.seed)
                model = PlainNet(depth, activation, init)
                losses = train(model, train_data, steps, lr=0.01, seed=args.seed)
                test_accuracy = accuracy(model, test_data)
                results["runs"][name] = {"loss": losses, "test_accuracy": test_accuracy}
                print(f"{name}: final loss {smooth(losses)[-1]:.3f}, test accuracy {test_accuracy:.3f}")
    depth = depths[0]
    torch.manual_seed(args.seed)
    model = PlainNet(depth, "relu", "xavier", aux=True)
    losses = train(model, train_data, steps, lr=0.01, seed=args.seed, loss_fn=loss_with_aux)
    results["runs"][f"{depth}-relu-xavier-aux"] = {"loss": losses, "test_accuracy": accuracy(model, test_data)}

    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for name, stats in results["init_std"].items():
        if name.startswith(f"{depths[-1]}-"):
            layers = range(1, len(stats["activations"]) + 1)
            axes[0, 0].semilogy(layers, stats["activations"], label=name)
            axes[0, 1].semilogy(layers, stats["gradients"], label=name)
    axes[0, 0].set_title(f"std of activations at init, {depths[-1]} layers")
    axes[0, 1].set_title(f"std of gradients at init, {depths[-1]} layers")
    for ax, depth in zip(axes[1], depths):
        for name, run in results["runs"].items():
            if name.startswith(f"{depth}-"):
                ax.plot(smooth(run["loss"]), label=f"{name} (acc {run['test_accuracy']:.2f})")
        ax.set_title(f"training loss, {depth}-layer plain nets (digits)")
        ax.set_xlabel("step")
    for ax in axes.flat:
        ax.legend(fontsize=7)
    fig.tight_layout()
    save(args, "he_init_depth", results, fig)


if __name__ == "__main__":
    main()
