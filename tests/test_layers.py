"""Factorized layers compute the reconstructed weight's function and count their cost exactly."""

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from datd.decompose import Grouped, cp, svd, tucker2
from datd.evaluate import count_macs, count_params
from datd.layers import Geometry, build, dense_cost, factorize

CONVS = {
    "plain": dict(in_channels=12, out_channels=10, kernel_size=3, padding=1),
    "stride-dilation": dict(in_channels=12, out_channels=10, kernel_size=3, stride=2, padding=2, dilation=2, bias=False),
    "rect-asym": dict(in_channels=12, out_channels=10, kernel_size=(3, 5), stride=(1, 2), padding=(1, 0)),
    "same": dict(in_channels=12, out_channels=10, kernel_size=(3, 2), padding="same"),
    "valid": dict(in_channels=12, out_channels=10, kernel_size=3, padding="valid"),
    "reflect": dict(in_channels=12, out_channels=10, kernel_size=3, padding=1, padding_mode="reflect"),
    "circular-stride": dict(in_channels=12, out_channels=10, kernel_size=3, padding=1, stride=2, padding_mode="circular"),
    "grouped": dict(in_channels=12, out_channels=10, kernel_size=3, padding=1, groups=2),
    "grouped-strided-1x3": dict(in_channels=12, out_channels=16, kernel_size=(1, 3), stride=2, padding=(0, 1), groups=2),
}
FITS = {
    "svd": lambda w: svd(w, None, 5),
    "tucker2": lambda w: tucker2(w, None, (4, 6), max_iter=3),
    "cp": lambda w: cp(w, None, 7, max_iter=3),
}


def fit_conv(fit: str, conv: nn.Conv2d):
    """The decomposition ``fit`` of ``conv``'s weight, one per group for a grouped conv."""
    w = conv.weight.detach()
    if conv.groups == 1:
        return FITS[fit](w)
    return Grouped([FITS[fit](part) for part in w.chunk(conv.groups)])


def relative_difference(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fit", FITS)
@pytest.mark.parametrize("geometry", CONVS)
def test_factorized_conv_equals_conv_with_reconstructed_weight(fit, geometry):
    torch.manual_seed(0)
    conv = nn.Conv2d(**CONVS[geometry])
    decomposition = fit_conv(fit, conv)
    module = factorize(conv, decomposition)
    x = torch.randn(2, 12, 11, 13)
    reference = nn.Conv2d(**CONVS[geometry])
    with torch.no_grad():
        reference.weight.copy_(decomposition.reconstruct())
        if conv.bias is not None:
            reference.bias.copy_(conv.bias)
        assert relative_difference(module(x), reference(x)) < 1e-5
    assert type(module).kind == fit


@pytest.mark.parametrize("fit", FITS)
@pytest.mark.parametrize("geometry", CONVS)
def test_cost_formulas_match_the_built_modules(fit, geometry):
    conv = nn.Conv2d(**CONVS[geometry])
    x = torch.randn(1, 12, 11, 13)
    out = conv(x)
    g = Geometry.of(conv, (11, 13), tuple(out.shape[2:]))
    ranks = fit_conv(fit, conv).ranks
    module = build(conv, fit, ranks)
    cost = type(module).cost(g, ranks)
    assert cost.params == count_params(module)
    assert cost.macs == count_macs(module, x)
    dense = dense_cost(g)
    assert dense.params == count_params(conv) and dense.macs == count_macs(conv, x)


def test_low_rank_linear():
    torch.manual_seed(1)
    lin = nn.Linear(20, 16)
    decomposition = svd(lin.weight.detach(), None, 6)
    module = factorize(lin, decomposition)
    x = torch.randn(3, 5, 20)
    expected = F.linear(x, decomposition.reconstruct().float(), lin.bias)
    assert relative_difference(module(x), expected) < 1e-5
    g = Geometry.of(lin, (5, 1), (5, 1))
    assert type(module).cost(g, (6,)).params == count_params(module)
    assert type(module).cost(g, (6,)).macs == count_macs(module, x)


def test_explicit_bias_and_refusals():
    conv = nn.Conv2d(8, 8, 3, bias=False)
    decomposition = svd(conv.weight.detach(), None, 3)
    shift = torch.arange(8.0)
    module = factorize(conv, decomposition, bias=shift)
    assert torch.equal(module.last.bias, shift)
    with pytest.raises(ValueError, match="depthwise"):
        build(nn.Conv2d(8, 8, 3, groups=8), "svd", (2,))
    assert build(nn.Conv2d(8, 8, 3, groups=2), "svd", (2,)).ranks == (2,)  # grouped: ranks per group
    with pytest.raises(ValueError, match="Linear layers"):
        build(nn.Linear(4, 4), "cp", (2,))
    with pytest.raises(ValueError, match="unknown method"):
        build(conv, "tt", (2,))


def test_factorized_modules_export_and_keep_dtype():
    conv = nn.Conv2d(6, 6, 3, padding=1).double()
    module = factorize(conv, cp(conv.weight.detach(), None, 4, max_iter=2))
    assert all(p.dtype == torch.float64 for p in module.parameters())
    x = torch.randn(1, 6, 7, 7, dtype=torch.float64)
    exported = torch.export.export(module, (x,))
    assert torch.allclose(exported.module()(x), module(x))
