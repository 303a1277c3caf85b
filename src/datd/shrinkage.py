"""How far to trust Σ: shrinkage towards the identity, chosen per layer by two-fold cross-validation.

The Σ-norm fit spends its rank where the calibration images put their energy and treats directions they leave
empty as free. Estimated from a few hundred images — or from images of a few classes, while the model must
serve a thousand — the sample Σ makes some directions look empty that other images use, and the fit's error
there lands on them (MobileNetV2's classifier, fitted in Σ from 500 ImageNet images: KL on the other 500
images 3× the KL on the calibration images; a Frobenius fit does better there). The covariance is shrunk
towards its scaled identity,

    C_α = (1 − α) C + α (tr C / D) I,   α ∈ [0, 1]   (α = 1: the Frobenius fit; α = 0: the sample C),

with α chosen per layer by two-fold cross-validation over images (``LayerStats.sigma_half``: the even-numbered
images form fold A, the rest fold B): the rank-R Σ-SVD fitted in fold A's shrunk covariance is scored by its
relative error in fold B's unshrunk one, and vice versa, averaged over a few ranks. The Σ-SVD stands in for
every method (it is the closed-form member of the family); with G = W C Wᵀ and H = W Wᵀ the whole grid costs
two products per fold and one eigendecomposition per α, of size min(T, D) (an expanding layer, T > D, is scored
through the triangular factor R of W = QR, which leaves every error unchanged).

Cross-validation only compares the calibration images with each other. Images unlike the training data (blurred,
upscaled thumbnails, another domain) agree with each other and still leave empty the directions that real inputs
use: CIFAR ResNet-20 calibrated on 2,048 training images blurred by 4× down- and upsampling kept 82.1 % at
params=0.5 with the α it chose (2,000 test images; 91.8 % calibrated on the images themselves), 91.7 % with α = 0.5
in every layer. A BatchNorm after the layer holds an independent witness: its running variances v_c,
the variance of each output channel c on the training data. The shrunk covariance predicts them up to one common
scale (augmentation, contrast), p_c(α) = w_cᵀ C_α w_c, and the **BatchNorm check** (``batchnorm_alpha``) takes the
least α that brings the spread of log(p_c(α) / v_c) over the channels near its least (``BATCHNORM_TOLERANCE``):
on in-domain images α = 0 in nearly every layer (CIFAR ResNet-20: all 19; ResNet-56: 49 of 55, the other six
0.6–0.9), on blurred ones mostly 0.45–1 (the shrinkage restores the energy of the filters that respond to what the
images lack). ``layer_alpha`` takes the larger of the two α.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .decompose._linalg import top_eigh

if TYPE_CHECKING:
    from .stats import LayerStats

# The α grid of the cross-validation.
ALPHAS = (0.0, 0.01, 0.03, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0)
# The least α whose cross-validated error is within this relative margin of the best is taken: where the grid's
# errors are flat (well-sampled Σ, e.g. 2,048 CIFAR images) the sample Σ is kept rather than a noise-picked α.
TOLERANCE = 2e-3
# The ranks scored, as fractions of the layer's break-even rank T·D/(T + D) (where a rank-R factorization
# has as many weights as the dense layer): the range planners pick from.
RANK_FRACTIONS = (0.6, 0.4, 0.25)
# The BatchNorm check takes the least α that achieves all but this share of the largest reduction of the spread of
# log(predicted / recorded output variance) over ``ALPHAS`` (spread curves of out-of-domain images fall slowly to a
# broad minimum: MobileNetV2 with Tiny-ImageNet images upscaled to 224, a projection layer: 0.33 at α = 0, 0.29 at
# 0.45, 0.38 at 1) ...
BATCHNORM_TOLERANCE = 0.25
# ... where that reduction exceeds this: a spread that shrinkage lowers by less than 0.03 (3 % between the channels'
# variance ratios) is within what sampling and the training's augmentation give on in-domain images (CIFAR
# ResNet-20, 2,048 training images: reductions of 0–0.02).
BATCHNORM_FLOOR = 0.03


def shrink(moment: Tensor, alpha: float, center: Tensor | None = None) -> Tensor:
    """(1 − α)(M − c) + α tr(M − c)/D · I + c for a (D, D) moment M (or (G, D, D)) with c = ``center`` (e.g.
    μμᵀ, so that the covariance is shrunk and the mean kept), 0 if None."""
    if alpha == 0:
        return moment
    c = torch.zeros_like(moment) if center is None else center
    inner = moment - c
    dim = inner.shape[-1]
    scale = inner.diagonal(dim1=-2, dim2=-1).sum(-1) / dim
    eye = torch.eye(dim, dtype=inner.dtype, device=inner.device)
    return (1 - alpha) * inner + alpha * scale[..., None, None] * eye + c


@dataclass(frozen=True)
class ShrinkageChoice:
    """``alpha`` and ``errors``, the cross-validated relative error of every α of the grid."""

    alpha: float = 0.0
    errors: dict[float, float] = field(default_factory=dict)
    batchnorm: float | None = None  # the α the BatchNorm check asked for (None: it did not run)


def cross_validated_alpha(matrix: Tensor, fold_a: Tensor, fold_b: Tensor,
                          alphas: tuple[float, ...] = ALPHAS) -> ShrinkageChoice:
    """The least α of ``alphas`` whose two-fold relative error of rank-R Σ-SVD fits of ``matrix`` (T, D), R over
    ``RANK_FRACTIONS``, is within ``TOLERANCE`` of the least error; the folds' fit moments (D, D) (covariances
    with bias correction)."""
    return _choose(_fold_errors(matrix, fold_a, fold_b, alphas))


def _fold_errors(matrix: Tensor, fold_a: Tensor, fold_b: Tensor, alphas: tuple[float, ...]) -> dict[float, float]:
    """Mean held-out relative squared error per α."""
    t, d = matrix.shape
    breakeven = t * d / (t + d)
    ranks = sorted({min(max(1, round(f * breakeven)), t - 1, d) for f in RANK_FRACTIONS if t > 1})
    if not ranks:
        return {}
    if t > d:  # W = Q R: every quantity below is invariant under W → R (Q orthonormal), and R is D×D
        matrix = torch.linalg.qr(matrix, mode="r")[1]
    h = matrix @ matrix.T
    grams = [matrix @ f @ matrix.T for f in (fold_a, fold_b)]
    scales = [torch.trace(f) / d for f in (fold_a, fold_b)]
    errors = {}
    for alpha in alphas:
        total = 0.0
        for fit, test in ((0, 1), (1, 0)):
            _, u = top_eigh((1 - alpha) * grams[fit] + alpha * scales[fit] * h, max(ranks))
            g = grams[test]
            energy = torch.trace(g).clamp_min(1e-300)
            kept = ((u.T @ g) * u.T).sum(dim=1).cumsum(0)  # kept[R-1] = tr(U_Rᵀ G U_R)
            total += sum(float((energy - kept[r - 1]) / energy) for r in ranks)
        errors[alpha] = total / (2 * len(ranks))
    return errors


def _choose(errors: dict[float, float]) -> ShrinkageChoice:
    if not errors:
        return ShrinkageChoice()
    best = min(errors.values())
    return ShrinkageChoice(min(a for a, e in errors.items() if e <= best * (1 + TOLERANCE)), errors)


def batchnorm_alpha(stats: "LayerStats", weight: Tensor, running_var: Tensor,
                    alphas: tuple[float, ...] = ALPHAS) -> float | None:
    """The BatchNorm check (module docstring): the least α of ``alphas`` whose shrunk input covariance predicts
    the profile of the output variances ``running_var`` (T,) recorded by the BatchNorm after the layer (weight
    (T, D/G, …), per-group statistics for a grouped conv): the spread of log(predicted / recorded) over the
    channels within ``BATCHNORM_TOLERANCE`` of its largest reduction above its least; α = alphas[0] where no α
    reduces it by more than ``BATCHNORM_FLOOR``. None where the BatchNorm records no profile: all its running variances
    equal (a fresh BatchNorm, or one left behind by folding it into the conv), or fewer than two live channels."""
    recorded = running_var.detach().double().cpu()
    if recorded.numel() < 2 or bool((recorded == recorded[0]).all()):
        return None
    covariance = stats.covariance().cpu()  # float64, as every LayerStats moment
    if covariance.dim() == 2:
        covariance = covariance[None]
    groups = covariance.shape[0]
    w = weight.detach().double().cpu().reshape(groups, weight.shape[0] // groups, -1)  # (G, T/G, D/G)
    # p_c(α) = (1 − α) w_cᵀ C w_c + α (tr C / D) ‖w_c‖² (``shrink`` is linear in α): one product for the whole grid
    sample = ((w @ covariance) * w).sum(dim=-1)  # (G, T/G)
    isotropic = covariance.diagonal(dim1=-2, dim2=-1).mean(dim=-1)[:, None] * (w * w).sum(dim=-1)
    spreads = {}
    for alpha in alphas:
        predicted = ((1 - alpha) * sample + alpha * isotropic).reshape(-1)  # (T,) in channel order
        live = (recorded > 1e-12 * float(recorded.max())) & (predicted > 0)
        if int(live.sum()) < 2:
            return None
        spreads[alpha] = float(torch.log(predicted[live] / recorded[live]).std())
    least = min(spreads.values())
    gain = spreads[alphas[0]] - least
    if gain <= BATCHNORM_FLOOR:
        return alphas[0]
    return min(a for a, v in spreads.items() if v <= least + BATCHNORM_TOLERANCE * gain)


def layer_alpha(stats: "LayerStats", weight: Tensor, bias_correction: bool,
                running_var: Tensor | None = None) -> ShrinkageChoice:
    """``cross_validated_alpha`` for one layer from its statistics' two folds (per group for a grouped conv,
    errors summed over groups; none where the statistics have no folds: files from before they existed, a single
    image), raised to ``batchnorm_alpha`` where ``running_var``, the running variances of the BatchNorm after the
    layer, are given and ask for more."""
    choice = _cross_validated(stats, weight, bias_correction)
    if running_var is None:
        return choice
    checked = batchnorm_alpha(stats, weight, running_var)
    return ShrinkageChoice(max(choice.alpha, checked or 0.0), choice.errors, checked)


def _cross_validated(stats: "LayerStats", weight: Tensor, bias_correction: bool) -> ShrinkageChoice:
    if stats.sigma_half is None or not 0 < stats.count_half < stats.count:
        return ShrinkageChoice()
    n, n_a = stats.count, stats.count_half
    sigma_b = (n * stats.sigma - n_a * stats.sigma_half) / (n - n_a)
    mean_b = (n * stats.mean - n_a * stats.mean_half) / (n - n_a)

    def fit_moment(sigma: Tensor, mean: Tensor) -> Tensor:
        return sigma - mean[..., :, None] * mean[..., None, :] if bias_correction else sigma

    a, b = fit_moment(stats.sigma_half, stats.mean_half), fit_moment(sigma_b, mean_b)
    matrix = weight.detach().double().reshape(weight.shape[0], -1).to(a.device)
    if a.dim() == 2:  # one group
        a, b = a[None], b[None]
    per_group = [_fold_errors(w, a[g], b[g], ALPHAS) for g, w in enumerate(matrix.chunk(a.shape[0], dim=0))]
    return _choose({alpha: sum(e[alpha] for e in per_group) for alpha in per_group[0]})
