"""Σ-optimal channel selection (``datd.decompose.prune``): the refit, the greedy path, planted and edge cases."""

import itertools
import sys

import pytest
import torch

from datd.decompose import prune, prune_order
from datd.decompose._linalg import prepare_sigma, relative_error
from datd.decompose.prune import PRUNE_REG

from test_decompose import D64, realistic_sigma


def _sq_error(weight, approx, sigma):
    e = (weight - approx).reshape(weight.shape[0], -1)
    return float(((e @ sigma) * e).sum())


@pytest.mark.parametrize("shape", [(6, 7, 3, 3), (9, 12)])
def test_path_errors_are_the_refitted_errors(shape):
    """One greedy pass gives the relative squared Σ-error of every kept count, each equal to the error of the fit
    ``prune`` returns; non-increasing, 1 with nothing kept, 0 with everything."""
    torch.manual_seed(0)
    weight = torch.randn(*shape, dtype=D64)
    d = weight[0].numel()
    sigma = realistic_sigma(d, 3)
    order, errors = prune_order(weight, sigma)
    h = shape[1]
    assert sorted(order.tolist()) == list(range(h)) and errors.shape == (h + 1,)
    assert errors[0] == pytest.approx(1.0) and errors[-1] == 0 and (errors[1:] <= errors[:-1] + 1e-12).all()
    for k in range(1, h + 1):
        fit = prune(weight, sigma, k, order=order)
        assert fit.ranks == (k,) and fit.weight.shape[:2] == (shape[0], k)
        assert fit.history[-1] ** 2 == pytest.approx(float(errors[k]), rel=1e-6, abs=1e-10)
        assert torch.equal(torch.sort(order[:k]).values, fit.kept)


def test_the_refit_is_the_least_squares_optimum_on_the_kept_channels():
    """Optimal in Σ as the fit regularizes it (a ridge of ``PRUNE_REG`` of its scale): any change of the kept
    channels' weights raises the error; the error reported is that one."""
    torch.manual_seed(1)
    weight = torch.randn(5, 8, 3, 3, dtype=D64)
    fit = prune(weight, realistic_sigma(72, 4), 4)
    sigma = prepare_sigma(realistic_sigma(72, 4), 72, PRUNE_REG)
    approx = fit.reconstruct()
    dropped = [c for c in range(8) if c not in fit.kept.tolist()]
    assert (approx[:, dropped] == 0).all()  # reads only the kept channels
    best = _sq_error(weight, approx, sigma)
    for _ in range(5):
        moved = approx.clone()
        moved[:, fit.kept] += 1e-3 * torch.randn(5, 4, 3, 3, dtype=D64)
        assert _sq_error(weight, moved, sigma) > best
    assert relative_error(weight.reshape(5, -1), approx.reshape(5, -1), sigma) == pytest.approx(fit.error, rel=1e-9)


def test_each_greedy_step_adds_the_best_channel():
    """Brute force on 6 channels: every step of the path adds the channel whose refitted error is least given the ones
    kept before (a wrong gain formula fails this), and the path's error is never below the best subset's."""
    torch.manual_seed(0)
    weight = torch.randn(5, 6, 2, 2, dtype=D64)
    x = torch.randn(300, 24, dtype=D64) @ torch.randn(24, 24, dtype=D64)
    sigma = x.T @ x / 300

    def error(channels):
        rest = [i for i in range(6) if i not in channels]
        return prune(weight, sigma, len(channels), order=torch.tensor(list(channels) + rest)).error ** 2

    order, errors = prune_order(weight, sigma)
    for k in range(1, 6):
        kept = order[:k - 1].tolist()
        best_step = min(error(kept + [c]) for c in range(6) if c not in kept)
        assert float(errors[k]) == pytest.approx(best_step, rel=1e-9)
        assert float(errors[k]) >= min(error(list(c)) for c in itertools.combinations(range(6), k)) * (1 - 1e-9)


def test_planted_channels_are_found_and_recovered_exactly():
    """A weight that reads only channels {1, 4} of independent inputs: kept first, exact at k = 2."""
    torch.manual_seed(2)
    weight = torch.zeros(7, 6, 3, 3, dtype=D64)
    weight[:, [1, 4]] = torch.randn(7, 2, 3, 3, dtype=D64)
    sigma = realistic_sigma(54, 5)
    order, errors = prune_order(weight, sigma)
    assert set(order[:2].tolist()) == {1, 4}
    assert errors[2] < 1e-10 and prune(weight, sigma, 2, order=order).error < 1e-6


def test_redundant_channels_are_reconstructed_from_the_others():
    """Channel 3 is a copy of channel 0 (a collinear input): dropping it costs nothing once channel 0 is kept."""
    torch.manual_seed(3)
    x = torch.randn(400, 5, dtype=D64)
    x = torch.cat([x, x[:, :1]], dim=1)  # 6 channels, the last equals the first
    sigma = x.T @ x / 400
    weight = torch.randn(4, 6, dtype=D64)
    order, errors = prune_order(weight, sigma)
    assert errors[5] < 1e-3  # five channels explain all six (up to the refit's ridge, PRUNE_REG)


def test_frobenius_selection_keeps_the_largest_columns():
    """With Σ = I the inputs are independent: the greedy keeps channel blocks by their Frobenius norm."""
    torch.manual_seed(4)
    weight = torch.randn(6, 9, 3, 3, dtype=D64) * torch.arange(1, 10, dtype=D64)[None, :, None, None]
    order, errors = prune_order(weight, None)
    norms = weight.pow(2).sum(dim=(0, 2, 3))
    assert order.tolist() == torch.argsort(norms, descending=True).tolist()
    kept_energy = norms[order].cumsum(0) / norms.sum()
    assert torch.allclose(errors[1:], 1 - kept_energy, atol=1e-12)


def test_several_channels_per_step_keep_the_path_exact(monkeypatch):
    """On wide layers several channels are added per step (``MAX_STEPS``): each prefix's error is still exact."""
    monkeypatch.setattr(sys.modules["datd.decompose.prune"], "MAX_STEPS", 4)
    torch.manual_seed(5)
    weight = torch.randn(6, 20, 3, 3, dtype=D64)
    sigma = realistic_sigma(180, 6)
    order, errors = prune_order(weight, sigma)
    for k in (1, 3, 5, 11, 19):
        assert prune(weight, sigma, k, order=order).error ** 2 == pytest.approx(float(errors[k]), rel=1e-6)


def test_the_error_read_from_the_greedy_path_is_the_refit_error():
    """Given ``prune_order``'s errors, ``prune`` reads its error from them instead of forming W̃Σ: the same value, and
    the recomputed one where it is too small to be read from a difference."""
    torch.manual_seed(9)
    weight = torch.randn(8, 12, 3, 3, dtype=D64)
    sigma = realistic_sigma(108, 7)
    order, errors = prune_order(weight, sigma)
    for k in (1, 4, 8, 11, 12):
        read = prune(weight, sigma, k, order=order, errors=errors)
        recomputed = prune(weight, sigma, k, order=order)
        assert torch.equal(read.reconstruct(), recomputed.reconstruct())
        assert read.error == pytest.approx(recomputed.error, rel=1e-6, abs=1e-9)
    assert prune(weight, sigma, 12, order=order, errors=errors).error < 1e-6  # every channel: exact, recomputed


def test_a_matrix_of_flattened_maps_is_pruned_by_channel_blocks():
    """A Linear reading 3 channels of 2×2 maps (12 columns): channels are blocks of 4 columns."""
    torch.manual_seed(6)
    weight = torch.randn(5, 12, dtype=D64)
    sigma = realistic_sigma(12, 7)
    fit = prune(weight, sigma, 2, channels=3)
    approx = fit.reconstruct().reshape(5, 3, 4)
    assert fit.weight.shape == (5, 8)
    dropped = [c for c in range(3) if c not in fit.kept.tolist()]
    assert (approx[:, dropped] == 0).all()
    with pytest.raises(ValueError, match="cannot be split into 5 channels"):
        prune_order(weight, sigma, channels=5)
    with pytest.raises(ValueError, match=r"keep must be in \[1, 3\]"):
        prune(weight, sigma, 4, channels=3)


def test_dead_inputs_are_pruned_first_and_cost_nothing():
    """Inputs that are always zero (dead channels after a ReLU) carry no energy: they go first, at no error."""
    torch.manual_seed(7)
    x = torch.relu(torch.randn(500, 8, dtype=D64))
    x[:, [2, 5]] = 0
    sigma = x.T @ x / 500
    weight = torch.randn(4, 8, dtype=D64)
    order, errors = prune_order(weight, sigma)
    assert set(order[-2:].tolist()) == {2, 5}
    assert errors[6] < 1e-3  # the refit's ridge
