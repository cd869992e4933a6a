"""Gradient flow in the original and the full pre-activation residual unit (He et al. 2016, "Identity Mappings
in Deep Residual Networks").

With x_{l+1} = x_l + F(x_l) (pre-activation: BN and ReLU inside F, nothing after the addition) the gradient
dE/dx_l = dE/dx_L * (1 + d/dx_l sum_{i=l}^{L-1} F(x_i)): the shortcut carries dE/dx_L to every unit directly,
so the gradient per unit stays close to that of the last unit. The original unit, x_{l+1} = ReLU(x_l + F(x_l)),
puts a ReLU on that path. This script builds CIFAR-style nets of depth 110 (basic units) and 164 (bottleneck
units) in both forms, from fusedrect.FusedBNReLU and nn.Conv2d, measures ||dE/dx_l|| between the units of
each stage relative to the stage output x_L, at initialisation and after training, and the training loss of
both on scikit-learn's digits (8x8 inputs; stages of 16/32/64 channels at 8x8, 4x4, 2x2) for the same budget.
"""
import torch
import torch.nn.functional as F
from torch import nn

import fusedrect
from shared import accuracy, digits, parse_args, pyplot, save, smooth, train


def conv(cin, cout, k, stride=1):
    layer = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
    fusedrect.init.kaiming_normal_(layer.weight, slope=0.0)
    return layer


class Unit(nn.Module):
    """One residual unit, original (conv-BN-ReLU..., ReLU after the addition) or full pre-activation
    (BN-ReLU-conv..., nothing after the addition); basic (two 3x3) or bottleneck (1x1, 3x3, 1x1)."""

    def __init__(self, cin, width, stride, bottleneck, preact):
        super().__init__()
        cout = width * 4 if bottleneck else width
        shapes = [(cin, width, 1, 1), (width, width, 3, stride), (width, cout, 1, 1)] if bottleneck else [
            (cin, width, 3, stride), (width, cout, 3, 1)]
        self.preact = preact
        self.convs = nn.ModuleList(conv(*s) for s in shapes)
        widths_in = [s[0] for s in shapes]
        if preact:  # BN-ReLU before every conv
            self.norms = nn.ModuleList(fusedrect.FusedBNReLU(c) for c in widths_in)
        else:  # BN(-ReLU) after every conv, the last BN without ReLU (it comes after the addition)
            self.norms = nn.ModuleList([*(fusedrect.FusedBNReLU(s[1]) for s in shapes[:-1]), nn.BatchNorm2d(cout)])
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = conv(cin, cout, 1, stride)
            self.shortcut_bn = None if preact else nn.BatchNorm2d(cout)

    def forward(self, x):
        if self.preact:
            out = self.norms[0](x)
            shortcut = x if self.shortcut is None else self.shortcut(out)  # projection of the pre-activated x
            out = self.convs[0](out)
            for norm, layer in zip(self.norms[1:], self.convs[1:]):
                out = layer(norm(out))
            return shortcut + out
        out = x
        for layer, norm in zip(self.convs, self.norms):
            out = norm(layer(out))
        shortcut = x if self.shortcut is None else self.shortcut_bn(self.shortcut(x))
        return F.relu(shortcut + out)


class ResNet(nn.Module):
    def __init__(self, depth, preact):
        super().__init__()
        bottleneck = depth >= 164 or (depth - 2) % 6 != 0
        n = (depth - 2) // (9 if bottleneck else 6)
        self.stem = conv(1, 16, 3)
        self.stem_norm = None if preact else fusedrect.FusedBNReLU(16)
        stages, cin = [], 16
        for stage, width in enumerate((16, 32, 64)):
            units = []
            for i in range(n):
                units.append(Unit(cin, width, 2 if stage and i == 0 else 1, bottleneck, preact))
                cin = width * 4 if bottleneck else width
            stages.append(nn.ModuleList(units))
        self.stages = nn.ModuleList(stages)
        self.final_norm = fusedrect.FusedBNReLU(cin) if preact else None
        self.fc = nn.Linear(cin, 10)

    def forward(self, x, taps=None):
        """``taps``, a list, receives per stage the unit inputs x_l after the first unit and the stage output
        x_L: the tensors of one shape that the shortcut equation relates."""
        x = self.stem(x)
        if self.stem_norm is not None:
            x = self.stem_norm(x)
        for units in self.stages:
            stage_taps = []
            for unit in units:
                x = unit(x)
                if taps is not None:
                    x.retain_grad()
                    stage_taps.append(x)
            if taps is not None:
                taps.append(stage_taps)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.fc(x.mean((2, 3)))


def gradient_profile(model, data):
    """||dE/dx_l|| / ||dE/dx_L|| for every unit input x_l of every stage (x_L: the stage's output), stages
    concatenated (the first unit of a stage changes the shape, so the ratios start after it)."""
    model.train()
    taps = []
    F.cross_entropy(model(data[0], taps), data[1]).backward()
    ratios = []
    for stage_taps in taps:
        norms = [t.grad.norm().item() for t in stage_taps]
        ratios += [n / norms[-1] for n in norms[:-1]]
    model.zero_grad()
    return ratios


def main():
    args = parse_args(__doc__)
    train_data, test_data = digits(args.seed)
    depths = (20, 29) if args.smoke else (110, 164)
    steps = 3 if args.smoke else 150
    probe = train_data[0][:128], train_data[1][:128]
    results = {"depths": depths, "steps": steps, "nets": {}}
    for depth in depths:
        for preact in (False, True):
            name = f"{depth}-{'preact' if preact else 'original'}"
            torch.manual_seed(args.seed)
            model = ResNet(depth, preact)
            at_init = gradient_profile(model, probe)
            losses = train(model, train_data, steps, lr=0.05, batch_size=64, seed=args.seed)
            results["nets"][name] = {"grad_ratio_init": at_init, "grad_ratio_trained": gradient_profile(model, probe),
                                     "loss": losses, "test_accuracy": accuracy(model, test_data)}
            r = results["nets"][name]
            print(f"{name}: grad ratio at unit 1 {at_init[0]:.2f} (init) {r['grad_ratio_trained'][0]:.2f} "
                  f"(trained); final loss {smooth(losses)[-1]:.3f}; test accuracy {r['test_accuracy']:.3f}")

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for name, r in results["nets"].items():
        style = "-" if "preact" in name else "--"
        axes[0].semilogy(range(1, len(r["grad_ratio_init"]) + 1), r["grad_ratio_init"], style, label=name)
        axes[1].semilogy(range(1, len(r["grad_ratio_trained"]) + 1), r["grad_ratio_trained"], style, label=name)
        axes[2].plot(smooth(r["loss"]), style, label=f"{name} (acc {r['test_accuracy']:.2f})")
    axes[0].set_title("||dE/dx_l|| / ||dE/dx_L|| per stage, at initialisation")
    axes[1].set_title(f"... after {steps} training steps")
    axes[2].set_title("training loss (digits)")
    for ax in axes[:2]:
        ax.set_xlabel("unit l")
        ax.axhline(1.0, color="gray", linewidth=0.8)
    axes[2].set_xlabel("step")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save(args, "preact_gradient_flow", results, fig)


if __name__ == "__main__":
    main()
