"""Shared by the example scripts: arguments, the digits data, a training loop, and writing figures + JSON."""
import argparse
import json
import math
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="a tiny, seconds-long run that exercises every path")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "figures"), help="where the PNG and JSON go")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    return args


def digits(seed=0):
    """scikit-learn's 8x8 digits as ((X_train, y_train), (X_test, y_test)), X of shape (N, 1, 8, 8), standardised."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise SystemExit(f"needs scikit-learn ({error}): pip install 'fusedrect[experiments]'") from error
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    return (x[order[:split]], y[order[:split]]), (x[order[split:]], y[order[split:]])


def batches(x, y, batch_size, steps, seed=0):
    """``steps`` minibatches, reshuffling at every epoch."""
    generator = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y) - batch_size + 1, batch_size):
            if done == steps:
                return
            index = order[start:start + batch_size]
            yield x[index], y[index]
            done += 1


def train(model, data, steps, lr=0.05, batch_size=64, loss_fn=None, seed=0):
    """SGD with momentum and weight decay (none on PReLU slopes, as He et al. 2015); returns the training loss of
    every step, stopping early if it diverges (inf/nan)."""
    loss_fn = loss_fn or (lambda model, x, y: torch.nn.functional.cross_entropy(model(x), y))
    slopes = {id(m.slope) for m in model.modules() if hasattr(m, "slope")}
    slopes |= {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.PReLU)}
    groups = [{"params": [p for p in model.parameters() if id(p) not in slopes]},
              {"params": [p for p in model.parameters() if id(p) in slopes], "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    losses = []
    for x, y in batches(*data, batch_size, steps, seed):
        loss = loss_fn(model, x, y)
        if not math.isfinite(loss.item()):
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def accuracy(model, data):
    model.eval()
    with torch.no_grad():
        return (model(data[0]).argmax(1) == data[1]).float().mean().item()


def smooth(values, window=10):
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def save(args, name, numbers, figure):
    """Writes <out>/<name>.json and <out>/<name>.png; returns their paths."""
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, f"{name}.json")
    png_path = os.path.join(args.out, f"{name}.png")
    with open(json_path, "w") as f:
        json.dump({"smoke": args.smoke, **numbers}, f, indent=1)
    figure.savefig(png_path, dpi=90)
    print(f"wrote {json_path} and {png_path}")
    return json_path, png_path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
