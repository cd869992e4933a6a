"""fusedrect.init.kaiming_normal_: the He et al. 2015 standard deviation for (P)ReLU layers."""
import math

import pytest
import torch

from fusedrect import init


@pytest.mark.parametrize("slope", [0.0, 0.25])
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
def test_standard_deviation(slope, mode):
    weight = torch.empty(256, 128, 3, 3)
    init.kaiming_normal_(weight, slope=slope, mode=mode)
    fan = (128 if mode == "fan_in" else 256) * 9
    expected = math.sqrt(2 / ((1 + slope**2) * fan))
    assert abs(weight.std().item() / expected - 1) < 0.01
    assert abs(weight.mean().item()) < 3 * expected / math.sqrt(weight.numel())


def test_matches_pytorch_leaky_relu_gain():
    a, b = torch.empty(64, 32, 3, 3), torch.empty(64, 32, 3, 3)
    init.kaiming_normal_(a, slope=0.25, generator=torch.Generator().manual_seed(1))
    torch.nn.init.kaiming_normal_(b, a=0.25, nonlinearity="leaky_relu", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="weight: expected a tensor of at least 2 dims"):
        init.kaiming_normal_(torch.empty(5))
    with pytest.raises(ValueError, match="mode: expected 'fan_in' or 'fan_out'"):
        init.kaiming_normal_(torch.empty(5, 5), mode="avg")
    with pytest.raises(ValueError, match="cannot initialise a tensor with a zero fan"):
        init.kaiming_normal_(torch.empty(4, 0))
