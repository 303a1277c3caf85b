"""Σ shrinkage chosen by two-fold cross-validation over images (datd.shrinkage)."""

import pytest
import torch
from torch import nn

import datd
from datd.shrinkage import ShrinkageChoice, cross_validated_alpha, layer_alpha, shrink
from datd.stats import collect_stats

D64 = torch.float64


def test_shrink_keeps_the_mean_and_the_trace_and_reaches_the_identity():
    torch.manual_seed(0)
    x = torch.randn(50, 6, dtype=D64) @ torch.randn(6, 6, dtype=D64) + 1
    sigma, mean = x.T @ x / 50, x.mean(0)
    center = torch.outer(mean, mean)
    cov = sigma - center
    assert torch.equal(shrink(sigma, 0.0, center), sigma)
    half = shrink(sigma, 0.5, center)
    assert torch.allclose(torch.trace(half - center), torch.trace(cov))
    assert torch.allclose(shrink(sigma, 1.0, center) - center, torch.trace(cov) / 6 * torch.eye(6, dtype=D64))
    grouped = shrink(torch.stack([sigma, 2 * sigma]), 0.3, torch.stack([center, 2 * center]))  # (G, D, D) blocks
    assert torch.allclose(grouped[1], 2 * shrink(sigma, 0.3, center))


def test_cross_validation_trusts_a_well_sampled_sigma_and_distrusts_a_fold_specific_one():
    torch.manual_seed(1)
    w = torch.randn(12, 16, dtype=D64)
    mix = torch.randn(16, 16, dtype=D64) * torch.logspace(0, -2, 16, dtype=D64)  # strongly anisotropic inputs
    a, b = (torch.randn(20000, 16, dtype=D64) @ mix.T for _ in range(2))
    choice = cross_validated_alpha(w, a.T @ a / 20000, b.T @ b / 20000)
    assert choice.alpha <= 0.03 and choice.errors[0.0] < choice.errors[1.0]  # the sample Σ is the better norm
    # each fold sees a different half of the input space (too few images, or other classes): Σ misleads
    basis = torch.linalg.qr(torch.randn(16, 16, dtype=D64))[0]
    fold_a = basis[:, :8] @ basis[:, :8].T + 1e-3 * torch.eye(16, dtype=D64)
    fold_b = basis[:, 8:] @ basis[:, 8:].T + 1e-3 * torch.eye(16, dtype=D64)
    choice = cross_validated_alpha(w, fold_a, fold_b)
    assert choice.alpha >= 0.6 and choice.errors[choice.alpha] < choice.errors[0.0]


def test_cross_validated_errors_of_an_expanding_layer_match_the_full_computation():
    """T > D: the errors are computed from W's triangular factor; here against T×T eigendecompositions."""
    torch.manual_seed(3)
    w = torch.randn(40, 10, dtype=D64)
    mix = torch.randn(10, 10, dtype=D64) * torch.logspace(0, -1, 10, dtype=D64)
    a, b = (x.T @ x / 30 for x in (torch.randn(30, 10, dtype=D64) @ mix.T for _ in range(2)))
    choice = cross_validated_alpha(w, a, b)
    ranks = sorted({round(f * 40 * 10 / 50) for f in (0.6, 0.4, 0.25)})
    for alpha, error in choice.errors.items():
        total = 0.0
        for fit, test in ((a, b), (b, a)):
            moment = (1 - alpha) * fit + alpha * torch.trace(fit) / 10 * torch.eye(10, dtype=D64)
            u = torch.linalg.eigh(w @ moment @ w.T)[1].flip(1)
            g = w @ test @ w.T
            total += sum(float(1 - torch.trace(u[:, :r].T @ g @ u[:, :r]) / torch.trace(g)) for r in ranks)
        assert error == pytest.approx(total / (2 * len(ranks)), rel=1e-9, abs=1e-12)


def test_layer_alpha_uses_the_statistics_folds_and_compress_reports_it():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 10)).eval()
    # 24 images of 40 dimensions: each fold's Σ has rank 12, the rest of the space looks empty
    images = torch.randn(24, 40)
    stats = collect_stats(model, [images[:10], images[10:]], progress=False)
    choice = layer_alpha(stats["1"], model[1].weight, bias_correction=True)
    assert choice.alpha > 0 and choice.errors[choice.alpha] < choice.errors[0.0]
    legacy = stats["1"]
    legacy.sigma_half = None  # statistics files from before the folds existed: no shrinkage
    assert layer_alpha(legacy, model[1].weight, True) == ShrinkageChoice()
    common = dict(target="params=0.6", stats=stats, progress=False, measure_latency=False, min_params=100,
                  sensitivity=False, probe_images=0)
    _, report = datd.compress(model, [images], **common)
    by_name = {l["name"]: l for l in report["layers"]}
    assert report["config"]["shrinkage"] == "cv"
    _, fixed = datd.compress(model, [images], shrinkage=0.5, **common)
    assert all(l["shrinkage"] == 0.5 for l in fixed["layers"] if "method" in l)
    assert any(0 < by_name[n].get("shrinkage", 0) for n in by_name)
