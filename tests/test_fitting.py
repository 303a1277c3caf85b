"""Damage predictions: the closed-form Σ-SVD curve agrees with fitted layers, and the pooled/spread split."""

import dataclasses

import pytest
import torch

from datd.fitting import FitSettings, LayerProblem, damage, damages, fit, svd_damage_curve
from datd.layers import Geometry
from datd.sensitivity import Sensitivity


def problem(pooled: bool, seed: int = 0, t: int = 6, s: int = 4, k: int = 3) -> LayerProblem:
    gen = torch.Generator().manual_seed(seed)
    d = s * k * k
    a = torch.randn(d, 2 * d, generator=gen, dtype=torch.float64)
    sigma = a @ a.T / (2 * d)
    mean = 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)
    sigma = sigma + torch.outer(mean, mean)
    b = torch.randn(d, d, generator=gen, dtype=torch.float64) / d
    sigma_pooled = torch.outer(mean, mean) + 0.5 * b @ sigma @ b.T if pooled else None  # a part of Σ
    weight = torch.randn(t, s, k, k, generator=gen, dtype=torch.float64)
    return LayerProblem("l", weight, sigma, mean, Geometry((t, s, k, k), 1, False, (8, 8), (8, 8)), None, sigma_pooled)


def sensitivity(seed: int = 1, t: int = 6) -> Sensitivity:
    gen = torch.Generator().manual_seed(seed)
    total = torch.rand(t, generator=gen, dtype=torch.float64) + 0.1
    pooled = 64 * total * torch.rand(t, generator=gen, dtype=torch.float64)
    return Sensitivity.measured(total, pooled, 64)


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("shape", [(6, 4, 3), (9, 5, 1)])  # T < D, and an expanding 1×1 conv (T > D)
def test_svd_damage_curve_matches_the_fitted_layers(pooled, bias_correction, shape):
    t, d = shape[0], shape[1] * shape[2] ** 2
    p, sens = problem(pooled, t=t, s=shape[1], k=shape[2]), sensitivity(t=t)
    settings = FitSettings(bias_correction=bias_correction)
    curve = svd_damage_curve(p, sens, settings)
    assert curve.shape == (t + 1,) and curve[-1] == 0
    assert (curve[min(t, d):] == 0).all()  # rank D reproduces the layer exactly
    for rank in range(1, min(t, d) + 1):
        approx = fit(p, "svd", (rank,), settings).reconstruct()
        assert curve[rank] == pytest.approx(damage(p, approx, sens, bias_correction), rel=1e-6, abs=1e-12)
    assert curve[0] == pytest.approx(damage(p, torch.zeros_like(p.weight), sens, bias_correction), rel=1e-9)


def test_without_pooled_statistics_the_damage_is_the_position_independent_form():
    p, sens = problem(pooled=False), sensitivity()
    approx = fit(p, "svd", (2,), FitSettings()).reconstruct()
    e = p.matrix - approx.reshape(p.matrix.shape)
    expected = 0.5 * float(sens.total @ ((e @ p.covariance) * e).sum(dim=1))
    assert damage(p, approx, sens, True) == pytest.approx(expected, rel=1e-12)


def test_pooled_and_spread_parts_add_up_for_uniform_weights():
    # with all weights one, the split damage is the plain squared error, whatever Σ̄ is
    with_split, plain = problem(pooled=True), problem(pooled=False)
    ones = Sensitivity.uniform(6)
    approx = fit(plain, "svd", (3,), FitSettings()).reconstruct()
    for bias_correction in (False, True):
        assert damage(with_split, approx, ones, bias_correction) == pytest.approx(
            damage(plain, approx, ones, bias_correction), rel=1e-10)


def test_relative_output_error_of_a_grouped_conv_matches_its_real_outputs():
    import torch.nn.functional as F
    from torch import nn

    from datd.fitting import relative_output_error
    from datd.stats import collect_stats

    torch.manual_seed(7)
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=2).double().eval()
    images = torch.randn(6, 8, 10, 10, dtype=torch.float64) + 0.3
    s = collect_stats(nn.Sequential(conv), [images], progress=False, precision="float64")["0"]
    problem = LayerProblem("0", conv.weight.detach(), s.sigma, s.mean, Geometry.of(conv, s.input_hw, s.output_hw),
                           conv.bias.detach())
    approx = fit(problem, "svd", (3,), FitSettings()).reconstruct()
    for correction in (False, True):
        bias = problem.corrected_bias(approx, correction)
        with torch.no_grad():
            error = F.conv2d(images, approx, bias, padding=1, groups=2) - conv(images)
            energy = F.conv2d(images, conv.weight, None, padding=1, groups=2)
        expected = float(((error ** 2).sum(1).mean() / (energy ** 2).sum(1).mean()) ** 0.5)
        assert relative_output_error(problem, approx, correction) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("method,ranks", [("svd", (2,)), ("tucker2", (3, 2)), ("cp", (4,))])
def test_factored_damages_equal_the_dense_form(pooled, method, ranks):
    # T = 12 rows, D = 36: ranks well below T take the factored form; W̃₁ = L·Rt must reproduce W̃ exactly
    p, sens = problem(pooled, t=12, s=4, k=3), sensitivity(t=12)
    settings = FitSettings(max_iter=5)
    fitted = [fit(p, method, ranks, settings), fit(p, "svd", (12,), settings)]  # and an exact one (dense form)
    left, right = fitted[0].matrix_factors()
    assert torch.allclose(left @ right, fitted[0].reconstruct().reshape(12, -1), rtol=1e-12, atol=1e-12)
    for bias_correction in (False, True):
        factored = damages(p, iter(fitted), sens, bias_correction)
        dense = [damage(p, d.reconstruct(), sens, bias_correction) for d in fitted]
        assert factored[0] > 0 and factored[0] == pytest.approx(dense[0], rel=1e-9)
        assert factored[1] == dense[1] == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("bias_correction", [False, True])
def test_pruned_damages_read_only_the_kept_columns(bias_correction):
    p, sens = problem(True, t=12, s=6, k=3), sensitivity(t=12)
    p.geometry = dataclasses.replace(p.geometry, input_channels=6)  # its 6 input channels can be pruned
    fitted = [fit(p, "prune", (k,), FitSettings()) for k in (1, 2, 4)]
    left, cols = fitted[1].matrix_factors()
    assert cols.dtype == torch.int64 and cols.numel() == 2 * 9
    dense = torch.zeros(12, 54, dtype=torch.float64)
    dense[:, cols] = left
    assert torch.equal(dense, fitted[1].reconstruct().reshape(12, -1))
    factored = damages(p, iter(fitted), sens, bias_correction)
    for value, d in zip(factored, fitted):
        assert value > 0 and value == pytest.approx(damage(p, d.reconstruct(), sens, bias_correction), rel=1e-9)
