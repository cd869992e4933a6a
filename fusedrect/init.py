"""He et al. 2015 ("Delving Deep into Rectifiers") initialisation for layers followed by a (P)ReLU."""
import math

import torch


def kaiming_normal_(weight, slope=0.0, mode="fan_in", generator=None):
    """Fills ``weight`` in place from N(0, std^2) with std = sqrt(2 / ((1 + slope^2) * fan)).

    ``slope`` is the negative slope of the rectifier that follows the layer (0 for ReLU, the initial PReLU
    slope, e.g. 0.25, for PReLU). ``mode="fan_in"`` (channels in x kernel size) keeps the variance of the
    activations constant through depth in the forward pass; ``"fan_out"`` keeps that of the gradients.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise ValueError(f"weight: expected a tensor of at least 2 dims (out, in, ...), got {weight!r:.80}")
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode: expected 'fan_in' or 'fan_out', got {mode!r}")
    receptive_field = math.prod(weight.shape[2:])
    fan = weight.shape[1 if mode == "fan_in" else 0] * receptive_field
    if fan == 0:
        raise ValueError(f"weight: cannot initialise a tensor with a zero fan ({tuple(weight.shape)})")
    std = math.sqrt(2.0 / ((1.0 + slope**2) * fan))
    with torch.no_grad():
        return weight.normal_(0.0, std, generator=generator)
