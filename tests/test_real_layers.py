"""Decompositions on real layers of the shipped ResNet-56 with Σ from 1024 CIFAR-10 training images."""

import pytest
import torch

from datd.data import calibration_loader
from datd.decompose import cp, svd, tucker2
from datd.decompose import _linalg
from datd.decompose._linalg import prepare_sigma, relative_error
from datd.models import load_model
from datd.stats import collect_stats

LAYERS = ["layer1.4.conv2", "layer2.0.conv1", "layer3.6.conv1"]


@pytest.fixture(scope="module")
def real():
    loaded = load_model("cifar_resnet56")
    loader = calibration_loader("cifar10", loaded.preprocessing, 1024, seed=0)
    stats = collect_stats(loaded.model, loader, LAYERS, progress=False)
    return {name: (loaded.model.get_submodule(name).weight.detach(), stats[name].sigma) for name in LAYERS}


@pytest.mark.parametrize("name", LAYERS)
def test_sigma_fit_beats_frobenius_fit_at_equal_ranks(real, name):
    weight, sigma = real[name]
    t, s = weight.shape[:2]
    fits = {
        "svd": lambda sig: svd(weight, sig, t // 3),
        "tucker2": lambda sig: tucker2(weight, sig, (t // 3, s // 3)),
        "cp": lambda sig: cp(weight, sig, t, max_iter=40),
    }
    s_reg = prepare_sigma(sigma, sigma.shape[0], 1e-6)
    w1 = weight.double().reshape(t, -1)
    for method, run in fits.items():
        aware = relative_error(w1, run(sigma).reconstruct().reshape(t, -1), s_reg)
        plain = relative_error(w1, run(None).reconstruct().reshape(t, -1), s_reg)
        assert aware < plain, (method, aware, plain)


@pytest.mark.parametrize("name", LAYERS)
def test_sigma_error_is_monotone_on_real_layers(real, name):
    weight, sigma = real[name]
    t, s = weight.shape[:2]
    for result in (tucker2(weight, sigma, (t // 4, s // 4), tol=0, max_iter=25), cp(weight, sigma, t // 2, tol=0, max_iter=25)):
        h = torch.tensor(result.history, dtype=torch.float64)
        assert (h[1:] <= h[:-1] * (1 + 1e-12)).all(), h
        assert h[-1] < h[0]


@pytest.mark.parametrize("name", LAYERS)
def test_float32_applies_reach_the_float64_error(real, name, monkeypatch):
    """The input factor's CG and CP's vertical step apply Σ in float32 (``SOLVE_DTYPE``): the fits reach the error of
    float64 applies (to
    1e-4 relative; CP over the 10 sweeps of a planning fit, after which its trajectories may part as any two
    starts of a non-convex fit do)."""
    weight, sigma = real[name]
    t, s = weight.shape[:2]
    runs = {"tucker2": lambda: tucker2(weight, sigma, (t // 3, s // 3)), "cp": lambda: cp(weight, sigma, t // 2, max_iter=10)}
    for method, run in runs.items():
        fast = run()
        monkeypatch.setattr(_linalg, "SOLVE_DTYPE", torch.float64)
        exact = run()
        monkeypatch.undo()
        assert fast.error == pytest.approx(exact.error, rel=1e-4), method
        assert len(fast.history) == len(exact.history), method


def test_sigma_is_singular_but_regularized_fits_work(real):
    # Zero padding and ReLU make the second moment of a real layer rank-deficient or badly conditioned:
    # the relative regularization must keep the fits finite.
    weight, sigma = real["layer1.4.conv2"]
    eig = torch.linalg.eigvalsh(sigma)
    assert eig[0] < 1e-6 * eig[-1]
    result = cp(weight, sigma, 16, max_iter=10)
    assert torch.isfinite(result.reconstruct()).all() and 0 < result.error < 1
