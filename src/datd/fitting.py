"""Fitting one layer: which norm, which decomposition, and what its error costs the model.

A ``LayerProblem`` holds a layer's weight and input statistics. The fit norm is Σ (the paper's
distribution-aware norm), I (Frobenius, the classical baseline) or, with bias correction, the input
covariance C = Σ − μμᵀ: a constant output shift (W − W̃)μ added to the bias removes the mean of the
output error exactly, leaving E‖(W − W̃)(x − μ)‖², so C is then the norm to fit.

The *damage* of an approximation is the predicted loss it causes, ½ Σ_c f_c [(W − W̃) M (W − W̃)ᵀ]_cc,
with M the moment of the output error actually incurred (Σ, or C with bias correction) and f the
per-channel sensitivities of ``datd.sensitivity`` (all ones: the plain squared output error).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .decompose import DEFAULT_SIGMA_REG, Decomposition, cp, svd, tucker2
from .decompose._linalg import prepare_sigma, sigma_matmul, top_eigh
from .layers import Geometry

NORMS = ("sigma", "frobenius")


@dataclass
class LayerProblem:
    """One layer to compress: ``weight`` (T, S, kh, kw) or (T, S); ``sigma`` (D, D) and ``mean`` (D,) of its
    input patches; ``geometry`` for costs; ``bias`` (T,) or None."""

    name: str
    weight: Tensor
    sigma: Tensor
    mean: Tensor
    geometry: Geometry
    bias: Tensor | None

    @property
    def matrix(self) -> Tensor:
        """W₁ (T, D) float64."""
        return self.weight.detach().double().reshape(self.weight.shape[0], -1)

    @functools.cached_property
    def covariance(self) -> Tensor:
        """C = Σ − μμᵀ (D, D)."""
        return self.sigma - torch.outer(self.mean, self.mean)

    def error_moment(self, bias_correction: bool) -> Tensor:
        """The moment M with E‖output error‖² = tr((W − W̃) M (W − W̃)ᵀ): C with bias correction, else Σ."""
        return self.covariance if bias_correction else self.sigma

    def fit_moment(self, norm: str, bias_correction: bool) -> Tensor | None:
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        return None if norm == "frobenius" else self.error_moment(bias_correction)

    def corrected_bias(self, approx: Tensor, bias_correction: bool) -> Tensor | None:
        """The bias of the factorized layer: the original one, plus (W − W̃)μ with bias correction (which makes
        the mean output error zero)."""
        if not bias_correction:
            return self.bias
        shift = (self.matrix - approx.reshape(self.matrix.shape)) @ self.mean
        return shift if self.bias is None else self.bias.double() + shift


@dataclass(frozen=True)
class FitSettings:
    norm: str = "sigma"
    bias_correction: bool = True
    sigma_reg: float = DEFAULT_SIGMA_REG
    max_iter: int = 100
    tol: float = 1e-5
    seed: int = 0


def fit(problem: LayerProblem, method: str, ranks: tuple[int, ...], settings: FitSettings) -> Decomposition:
    """Decompose ``problem.weight`` with ``method`` at ``ranks`` in the configured norm."""
    sigma = problem.fit_moment(settings.norm, settings.bias_correction)
    w, reg = problem.weight.detach(), settings.sigma_reg
    if method == "svd":
        return svd(w, sigma, ranks[0], sigma_reg=reg)
    if method == "tucker2":
        return tucker2(w, sigma, tuple(ranks), max_iter=settings.max_iter, tol=settings.tol, sigma_reg=reg)
    if method == "cp":
        return cp(w, sigma, ranks[0], max_iter=settings.max_iter, tol=settings.tol, seed=settings.seed, sigma_reg=reg)
    raise ValueError(f"unknown method {method!r}")


def output_errors(problem: LayerProblem, approx: Tensor, bias_correction: bool) -> Tensor:
    """Per-output-channel mean squared output error (T,) of the approximation ``approx`` (weight shape)."""
    e = problem.matrix - approx.reshape(problem.matrix.shape)
    return ((e @ problem.error_moment(bias_correction)) * e).sum(dim=1)


def damage(problem: LayerProblem, approx: Tensor, sensitivity: Tensor, bias_correction: bool) -> float:
    """Predicted loss ½ Σ_c f_c E_cc of replacing the weight by ``approx``."""
    return 0.5 * float(sensitivity @ output_errors(problem, approx, bias_correction))


def relative_sigma_error(problem: LayerProblem, approx: Tensor) -> float:
    """‖(W − W̃) Σ^{1/2}‖ / ‖W Σ^{1/2}‖ with the raw Σ (the paper's per-layer error)."""
    w = problem.matrix
    e = w - approx.reshape(w.shape)
    return float(torch.sqrt(((e @ problem.sigma) * e).sum() / ((w @ problem.sigma) * w).sum()))


def svd_damage_curve(problem: LayerProblem, sensitivity: Tensor, settings: FitSettings) -> Tensor:
    """Damage of the rank-R fit of ``svd`` for every R = 0 … T (T+1,), from one eigendecomposition.

    The rank-R fit keeps the top-R eigenvectors u_k of W₁ S W₁ᵀ (S the fit norm): W − W̃ = Σ_{k>R} u_k v_k with
    v_k = u_kᵀ W₁. Its damage is ½ Σ_{k,l>R} (v_k M v_lᵀ)(Σ_c f_c u_k[c] u_l[c]): a trailing-block sum of a
    T×T matrix, for all R at once."""
    w = problem.matrix
    s = prepare_sigma(problem.fit_moment(settings.norm, settings.bias_correction), w.shape[1], settings.sigma_reg)
    _, u = top_eigh(sigma_matmul(w, s) @ w.T, w.shape[0])
    v = u.T @ w
    h = (v @ problem.error_moment(settings.bias_correction) @ v.T) * (u.T @ (sensitivity[:, None] * u))
    trailing = h.flip(0, 1).cumsum(0).cumsum(1).diagonal().flip(0)  # trailing[R] = Σ_{k,l>=R} h_kl
    return 0.5 * torch.cat([trailing, trailing.new_zeros(1)])
