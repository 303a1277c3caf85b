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


def _conv_bn_stats(calibration: torch.Tensor, training: torch.Tensor):
    """A conv → BatchNorm whose running statistics are those of ``training`` images, and the statistics of the
    conv's input on ``calibration`` images."""
    torch.manual_seed(4)
    conv, bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
    model = nn.Sequential(conv, bn, nn.ReLU()).train()
    bn.momentum = None  # the cumulative average: the running variance is the training data's
    with torch.no_grad():
        model(training)
    model.eval()
    return model, collect_stats(model, [calibration], progress=False)["0"]


def _blurred(x: torch.Tensor, factor: int) -> torch.Tensor:
    small = nn.functional.interpolate(x, scale_factor=1 / factor, mode="bilinear", antialias=True)
    return nn.functional.interpolate(small, size=x.shape[-2:], mode="bilinear")


def test_batchnorm_check_trusts_in_domain_images_and_shrinks_for_blurred_ones():
    from datd.shrinkage import batchnorm_alpha

    torch.manual_seed(5)
    # smooth images with some fine detail: every spatial frequency carries energy, the low ones most
    images = _blurred(torch.randn(64, 3, 16, 16), 2) + 0.3 * torch.randn(64, 3, 16, 16)
    model, same = _conv_bn_stats(images[32:], images[:32])
    conv, bn = model[0], model[1]
    assert batchnorm_alpha(same, conv.weight, bn.running_var) == 0.0  # other images of the same distribution
    _, blurred = _conv_bn_stats(_blurred(images[32:], 4), images[:32])
    alpha = batchnorm_alpha(blurred, conv.weight, bn.running_var)
    assert alpha is not None and alpha >= 0.3
    # layer_alpha takes the larger α and says which the check asked for
    choice = layer_alpha(blurred, conv.weight, True, bn.running_var)
    assert choice.alpha == max(alpha, layer_alpha(blurred, conv.weight, True).alpha) and choice.batchnorm == alpha
    # a BatchNorm without a recorded profile (fresh, or left behind by folding): no check
    assert batchnorm_alpha(blurred, conv.weight, torch.ones(16)) is None
    assert layer_alpha(blurred, conv.weight, True, torch.ones(16)).batchnorm is None


def test_conv_batchnorms_finds_foldable_pairs_only():
    from datd.graph import conv_batchnorms

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn_a = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
            self.b, self.bn_b = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)  # b's output is also read by the add
            self.c, self.bn_c = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8, track_running_stats=False)

        def forward(self, x):
            y = self.bn_a(self.a(x))
            z = self.b(y)
            return self.bn_c(self.c(self.bn_b(z) + z))

    assert conv_batchnorms(Net()) == [("a", "bn_a")]


@pytest.mark.slow
def test_compress_resists_blurred_calibration_images_through_the_batchnorm_check():
    """CIFAR ResNet-20 (91.73 %) calibrated on training images blurred by 4× down- and upsampling, at params=0.5
    (2,048 of them: 82.1 % on 2,000 test images with the cross-validated α alone, 91.45 % with the check; 91.8 %
    calibrated on the images unblurred)."""
    from datd.data import calibration_loader, eval_loader
    from datd.evaluate import accuracy
    from datd.models import load_model

    loaded = load_model("cifar_resnet20", None)
    calib = [_blurred(x, 4) for x, _ in calibration_loader("cifar10", loaded.preprocessing, 1024, seed=0)]
    test = eval_loader("cifar10", loaded.preprocessing, limit=2000)
    common = dict(target="params=0.5", progress=False, measure_latency=False)
    with pytest.warns(UserWarning, match="BatchNorm statistics"):
        compressed, report = datd.compress(loaded.model, calib, **common)
    assert accuracy(compressed, test, progress=False) >= 0.90
    # every compressed conv of this network has a BatchNorm behind it, and the check read each one
    convs = [l for l in report["layers"] if "method" in l and l["name"] != "fc"]
    values = [l["shrinkage_batchnorm"] for l in convs]
    assert convs and None not in values
    assert sorted(values)[len(values) // 2] >= 0.3
    assert all(l["shrinkage"] >= l["shrinkage_batchnorm"] for l in convs)
