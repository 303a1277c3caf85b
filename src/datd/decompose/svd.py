"""Σ-optimal matrix low rank (closed form).

min over rank-R W̃₁ of ‖(W₁ − W̃₁) Σ^{1/2}‖_F is attained by projecting W₁ onto the top-R eigenvectors U_R
of W₁ Σ W₁ᵀ (T, T): W̃₁ = U_R (U_Rᵀ W₁); the squared error is the sum of the discarded eigenvalues.
With Σ = I this is the truncated SVD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._linalg import as_matrix, gram_top_eigh, prepare_sigma, relative_error
from .base import Decomposition

DEFAULT_SIGMA_REG = 1e-6


@dataclass
class LowRank(Decomposition):
    """W̃ = out_factor · in_factor: ``in_factor`` (R, S, kh, kw) (a kh×kw conv S→R, or (R, S) for a
    matrix), ``out_factor`` (T, R) (a 1×1 conv / Linear R→T)."""

    out_factor: Tensor
    in_factor: Tensor
    method = "svd"

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.out_factor.shape[1],)

    def reconstruct(self) -> Tensor:
        left, right = self.matrix_factors()
        return (left @ right).reshape(self.shape)

    def matrix_factors(self) -> tuple[Tensor, Tensor]:
        return self.out_factor, self.in_factor.reshape(self.out_factor.shape[1], -1)


def spectrum(weight: Tensor, sigma: Tensor | None = None, *, sigma_reg: float = DEFAULT_SIGMA_REG) -> Tensor:
    """Eigenvalues of W₁ Σ W₁ᵀ, descending (T,): the squared Σ-error of the rank-R fit is the sum of
    entries R, R+1, …; cheap error-versus-rank curves for planning."""
    w1, _ = as_matrix(weight)
    s = prepare_sigma(sigma, w1.shape[1], sigma_reg)
    vals, _ = gram_top_eigh(w1, s, min(w1.shape))
    return torch.cat([vals.clamp_min(0), vals.new_zeros(w1.shape[0] - vals.shape[0])])  # rank ≤ D: the rest are 0


def svd(weight: Tensor, sigma: Tensor | None = None, rank: int = 1, *, sigma_reg: float = DEFAULT_SIGMA_REG) -> LowRank:
    """Rank-``rank`` fit of ``weight`` ((T, S, kh, kw) or (T, S)) in the Σ-norm (Frobenius if sigma=None)."""
    w1, _ = as_matrix(weight)
    if not 1 <= rank <= min(w1.shape):
        raise ValueError(f"rank must be in [1, {min(w1.shape)}] for a {tuple(weight.shape)} weight, got {rank}")
    s = prepare_sigma(sigma, w1.shape[1], sigma_reg)
    _, u = gram_top_eigh(w1, s, rank)
    in_factor = u.T @ w1
    approx = u @ in_factor
    in_shape = (rank,) + tuple(weight.shape[1:])
    return LowRank(
        tuple(weight.shape), out_factor=u, in_factor=in_factor.reshape(in_shape),
        history=[relative_error(w1, approx, s)],
    )
