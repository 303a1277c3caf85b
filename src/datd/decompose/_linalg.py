"""Shared numerics of the Σ-norm decompositions (float64, but for the products in ``SOLVE_DTYPE`` that only shape a
solve).

Notation: a weight W of shape (T, S, kh, kw) is matricized as W₁ = W.reshape(T, S·P), P = kh·kw, in the
column order of ``F.unfold`` (input channel major, then kernel row, then kernel column). Σ is (S·P, S·P)
in the same order. The Σ-norm of a (m, S·P) matrix X is ‖X Σ^{1/2}‖_F, i.e. sqrt(tr(X Σ Xᵀ)).
``sigma=None`` stands for Σ = I (the Frobenius norm) and takes the same code path.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable

import torch
from torch import Tensor

DTYPE = torch.float64
# The dtype of the products through Σ in the conjugate-gradient applies of the input factor (``InputFactorSolver``),
# the largest cost of the iterative fits, and in CP's vertical spatial step: CG's answer is approximate by design (it
# stops at a residual of 1e-3), and float32 rounding (~1e-7 of ‖Σ‖ per product) lies far below that while the fit's
# error does, at about half the time of float64 on CPUs (fits of 256- and 512-channel 3×3 convs to the same error in
# the same sweeps: Tucker-2 1.3–1.4× faster, CP 1.2–1.4×). Everything that decides a fit's error and its
# monotonicity, and every closed-form step, stays float64.
SOLVE_DTYPE = torch.float32
# Below this relative Σ-error, and for a sweep whose float32 step did not lower the error, the applies are float64:
# float32 rounding stalls a fit near 1e-6 (exact recoveries of planted tensors go on to 1e-8 and below).
SOLVE_FLOOR = 1e-3


def as_matrix(weight: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
    """(T, S, kh, kw) or (T, S) weight -> (W₁ float64 (T, S·kh·kw), 4-d shape (T, S, kh, kw))."""
    if weight.dim() == 2:
        shape4 = (weight.shape[0], weight.shape[1], 1, 1)
    elif weight.dim() == 4:
        shape4 = tuple(weight.shape)
    else:
        raise ValueError(f"weight must be (T, S) or (T, S, kh, kw), got shape {tuple(weight.shape)}")
    w1 = weight.detach().to(DTYPE).reshape(shape4[0], -1)
    if not torch.isfinite(w1).all():
        raise ValueError("weight contains NaN or Inf")
    return w1, shape4  # type: ignore[return-value]


# The latest ``prepare_sigma`` call: (a weak reference to its input, the input's version and dtype and the
# regularization, the result). The fits of one layer (its planning candidates of every method and rank) share one Σ,
# which a D = 4608 layer takes ~0.4 s to symmetrize and regularize; one entry keeps the memory it holds to one Σ.
_LATEST: list[tuple[weakref.ref, tuple, Tensor]] = []


def prepare_sigma(sigma: Tensor | None, dim: int, reg: float) -> Tensor | None:
    """Validate Σ (dim, dim), symmetrize it and add ``reg``·(tr Σ / dim)·I (regularization relative
    to Σ's scale, so singular Σ — zero padding, dead channels — stays positive definite). The result is shared with
    the next call on the same, unmodified Σ: callers do not modify it in place."""
    if sigma is None:
        return None
    if sigma.shape != (dim, dim):
        raise ValueError(f"sigma must be ({dim}, {dim}) for this weight, got {tuple(sigma.shape)}")
    key = (sigma._version, sigma.dtype, sigma.device, float(reg))
    if _LATEST and _LATEST[0][0]() is sigma and _LATEST[0][1] == key:
        return _LATEST[0][2]
    s = sigma.detach().to(DTYPE)
    if not torch.isfinite(s.sum()):  # a NaN or an Inf anywhere makes the sum NaN or infinite
        raise ValueError("sigma contains NaN or Inf")
    s = (s + s.T).mul_(0.5)
    scale = torch.trace(s) / dim
    if scale <= 0:
        raise ValueError("sigma has a non-positive trace: no input energy was recorded for this layer")
    s.diagonal().add_(reg * scale)
    _LATEST[:] = [(weakref.ref(sigma), key, s)]
    return s


def sigma_matmul(x: Tensor, sigma: Tensor | None) -> Tensor:
    """X Σ for X (m, S·P); X itself when Σ = I. With Σ in another dtype (``SOLVE_DTYPE``) the product is formed in
    Σ's dtype and returned in X's."""
    if sigma is None:
        return x
    return x @ sigma if x.dtype == sigma.dtype else (x.to(sigma.dtype) @ sigma).to(x.dtype)


def sq_sigma_norm(x: Tensor, sigma: Tensor | None) -> Tensor:
    """‖X Σ^{1/2}‖_F² = tr(X Σ Xᵀ) for X (m, S·P)."""
    return (sigma_matmul(x, sigma) * x).sum()


def relative_error(w1: Tensor, approx1: Tensor, sigma: Tensor | None) -> float:
    """‖(W₁ − W̃₁) Σ^{1/2}‖_F / ‖W₁ Σ^{1/2}‖_F (both (T, S·P))."""
    return float(torch.sqrt(sq_sigma_norm(w1 - approx1, sigma) / sq_sigma_norm(w1, sigma)))


# Below this relative error the expanded form loses digits to cancellation (its squared error is a difference of
# terms ~1/EXPANDED_FLOOR² larger: 1e-10 relative here); the error is then computed from the reconstruction.
EXPANDED_FLOOR = 1e-3


def expanded_relative_error(norm_sq: Tensor, cross: Tensor, model_sq: Tensor, exact: Callable[[], float]) -> float:
    """‖(W₁ − W̃₁) Σ^{1/2}‖_F / ‖W₁ Σ^{1/2}‖_F from ``norm_sq`` = ‖W₁‖²_Σ, ``cross`` = tr(W̃₁ Σ W₁ᵀ) and ``model_sq`` =
    ‖W̃₁‖²_Σ, which the ALS steps have at hand (no T·D² product through Σ); ``exact()`` where the result is
    below ``EXPANDED_FLOOR``."""
    return error_from_difference(float((norm_sq - 2 * cross + model_sq) / norm_sq), exact)


def error_from_difference(rel_sq: float, exact: Callable[[], float]) -> float:
    """sqrt(``rel_sq``), a relative squared error obtained as a difference of larger terms, or ``exact()`` where it
    is below ``EXPANDED_FLOOR`` and the difference has lost its digits."""
    return math.sqrt(rel_sq) if rel_sq >= EXPANDED_FLOOR**2 else exact()


def top_eigh(m: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k eigenpairs of a symmetric matrix, eigenvalues descending, eigenvector signs fixed
    (largest-magnitude entry positive) so that results are deterministic."""
    vals, vecs = torch.linalg.eigh(0.5 * (m + m.T))
    return vals.flip(0)[:k], _fixed_signs(vecs.flip(1)[:, :k])


def _fixed_signs(vecs: Tensor) -> Tensor:
    """Columns with their largest-magnitude entry made positive."""
    idx = vecs.abs().argmax(dim=0)
    signs = torch.sign(vecs[idx, torch.arange(vecs.shape[1])])
    signs[signs == 0] = 1
    return vecs * signs


def gram_top_eigh(w1: Tensor, sigma: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """Top-k eigenpairs of G = W₁ Σ W₁ᵀ (T, T) for W₁ (T, D), as ``top_eigh`` (Σ = I for None; k ≤ min(T, D)).

    Where T > D (expanding 1×1 convs: a 512 → 2048 projection) G has rank ≤ D: with W₁ = Q R (thin QR, Q (T, D)
    orthonormal) G = Q (R Σ Rᵀ) Qᵀ, so its eigenvectors are Q times those of the D×D matrix R Σ Rᵀ and the
    eigendecomposition costs D³ instead of T³ (2048 × 512: 0.73 s → 0.02 s on two cores)."""
    t, d = w1.shape
    if k > min(t, d):
        raise ValueError(f"k must be <= min(T, D) = {min(t, d)}, got {k}")
    if t <= d:
        return top_eigh(sigma_matmul(w1, sigma) @ w1.T, k)
    q, r = torch.linalg.qr(w1)
    vals, v = top_eigh(sigma_matmul(r, sigma) @ r.T, k)
    return vals, _fixed_signs(q @ v)


def cholesky_jittered(matrix: Tensor) -> Tensor:
    """The lower Cholesky factor of the symmetric positive (semi-)definite ``matrix``; where round-off leaves it
    numerically indefinite (a Σ regularized only slightly, far more dimensions than calibration samples), of
    ``matrix`` + ε·mean(diag)·I with the least ε of 1e-12, 1e-10, …, 1e-4 that factorizes. Unchanged, bit for bit,
    wherever the plain factorization succeeds."""
    chol, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return chol
    scale = float(matrix.diagonal().abs().mean()) or 1.0
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    for exponent in range(-12, -3, 2):
        chol, info = torch.linalg.cholesky_ex(matrix + 10.0 ** exponent * scale * eye)
        if int(info) == 0:
            return chol
    raise torch.linalg.LinAlgError(f"matrix of size {matrix.shape[0]} is not positive definite even with a jitter "
                                   "of 1e-4 of its diagonal: non-finite or indefinite input")


def orthonormal_columns(x: Tensor) -> Tensor:
    """Q of the thin QR of x with a positive diagonal of R (unique, deterministic)."""
    q, r = torch.linalg.qr(x)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1
    return q * d


def conjugate_gradient(
    apply: Callable[[Tensor], Tensor],
    rhs: Tensor,
    x0: Tensor,
    precondition: Callable[[Tensor], Tensor],
    tol: float,
    max_iter: int,
) -> Tensor:
    """Preconditioned CG for the SPD system apply(x) = rhs (tensors of any shape, Frobenius inner
    product), stopped when the residual has shrunk by ``tol`` from the warm start x0 (or reached round-off)
    or after ``max_iter`` steps. Every iterate minimizes the quadratic ½⟨x, Ax⟩ − ⟨b, x⟩ over x0 + a
    Krylov space that contains x0, so it never increases from x0: the property that keeps ALS monotone."""
    x = x0.clone()
    r = rhs - apply(x)
    rhs_norm = torch.linalg.vector_norm(rhs)
    if rhs_norm == 0:
        return torch.zeros_like(x0)
    stop = max(tol * float(torch.linalg.vector_norm(r)), 1e-15 * float(rhs_norm))
    z = precondition(r)
    p = z.clone()
    rz = (r * z).sum()
    for _ in range(max_iter):
        if torch.linalg.vector_norm(r) <= stop:
            break
        ap = apply(p)
        curvature = (p * ap).sum()
        if curvature <= 0:
            break
        alpha = rz / curvature
        x += alpha * p
        r -= alpha * ap
        z = precondition(r)
        rz_new = (r * z).sum()
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


class InputFactorSolver:
    """Least squares for the input-channel factor U (S, R) shared by Tucker-2 and CP.

    The model is X(U)[m, (s, p)] = Σ_b U[s, b] F[m, b, p] with F (m, R, P) fixed, fitted to a target Y
    given through YΣ (m, S·P): minimize ‖(Y − X(U)) Σ^{1/2}‖² (+ damping·‖U − U₀‖²). The normal equations
    A(U) = B are SPD with S·R unknowns, A(U) = Fᵀ-contraction of X(U) Σ. They are solved by CG,
    warm-started at U₀, preconditioned by the Kronecker approximation A(U) ≈ Σ̄ U K̄ with
    Σ̄ = mean_p Σ[(·,p),(·,p)] (S, S) and K̄ = Σ_{m,p} F[m,:,p]ᵀ F[m,:,p] (R, R); exact when Σ = I.
    The applies go through Σ in ``SOLVE_DTYPE`` unless ``solve(precise=True)``; the caller checks CG's step by its
    float64 error (``attempts``).
    """

    def __init__(self, sigma: Tensor | None, n_in: int, n_pos: int):
        self.sigma = sigma
        self.sigma_fast = None if sigma is None else sigma.to(SOLVE_DTYPE)
        self.n_in, self.n_pos = n_in, n_pos
        if sigma is None:
            self.sigma_bar_chol, self.sigma_scale = None, 1.0
        else:
            blocks = sigma.reshape(n_in, n_pos, n_in, n_pos).diagonal(dim1=1, dim2=3)  # (S, S, P)
            sigma_bar = blocks.mean(dim=2)
            self.sigma_bar_chol = torch.linalg.cholesky(sigma_bar)
            self.sigma_scale = float(torch.trace(sigma_bar)) / n_in

    @staticmethod
    def attempts(history: list[float]) -> tuple[bool, ...]:
        """The ``precise`` settings to try the next sweep of a fit with this error ``history`` with, in order, until
        one lowers the error: float64 alone once the error is below ``SOLVE_FLOOR``, else float32 and, where that did
        not help, float64 (a function of the fit's state, so that a continued fit repeats a fresh one bit for bit)."""
        return (True,) if SOLVE_DTYPE == DTYPE or history[-1] < SOLVE_FLOOR else (False, True)

    def solve(
        self, f: Tensor, y_sigma: Tensor, u0: Tensor, damping: float, tol: float, max_iter: int, precise: bool = True
    ) -> Tensor:
        """Return U (S, R) for F (m, R, P), YΣ (m, S·P), warm start U₀ (S, R); the applies through Σ in float64 where
        ``precise``, else in ``SOLVE_DTYPE``."""
        sigma = self.sigma if precise else self.sigma_fast
        m, rank, n_pos = f.shape
        n_in = self.n_in

        def model(u: Tensor) -> Tensor:
            return torch.einsum("sb,mbp->msp", u, f).reshape(m, n_in * n_pos)

        def contract(x_sigma: Tensor) -> Tensor:
            return torch.einsum("msp,mbp->sb", x_sigma.reshape(m, n_in, n_pos), f)

        k_bar = torch.einsum("mbp,mcp->bc", f, f)
        k_scale = float(torch.trace(k_bar)) / rank
        mu = damping * k_scale * self.sigma_scale

        def apply(u: Tensor) -> Tensor:
            return contract(sigma_matmul(model(u), sigma)) + mu * u

        # Preconditioner Σ̄ ⊗ (K̄ + μ/scale(Σ)): the exact inverse of the operator when Σ is a multiple of I.
        shift = (damping + 1e-12) * k_scale
        k_chol = torch.linalg.cholesky(k_bar + shift * torch.eye(rank, dtype=f.dtype, device=f.device))

        def precondition(r: Tensor) -> Tensor:
            z = r if self.sigma_bar_chol is None else torch.cholesky_solve(r, self.sigma_bar_chol)
            return torch.cholesky_solve(z.T, k_chol).T

        rhs = contract(y_sigma) + mu * u0
        return conjugate_gradient(apply, rhs, u0, precondition, tol, max_iter)

