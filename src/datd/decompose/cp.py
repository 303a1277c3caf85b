"""CP (canonical polyadic) decomposition in the Σ-norm by damped alternating least squares.

W̃[t, s, i, j] = Σ_r A[t, r] B[s, r] C[i, r] D[j, r] with A (T, R) output, B (S, R) input, C (kh, R)
vertical and D (kw, R) horizontal factors; W̃₁ = A Kᵀ with K = B ⊙ C ⊙ D (Khatri-Rao, (S·P, R)).
One sweep updates, each by an exact minimization:

- B: SPD system with S·R unknowns, solved by CG (shared with Tucker-2, ``InputFactorSolver``);
- C, D: small dense SPD systems with kh·R and kw·R unknowns;
- A: closed form, A = W₁ Σ K (Kᵀ Σ K)⁻¹ (R×R solve).

Degeneracy guard: every update is proximal (minimizes error² + μ‖X − X_prev‖², μ relative to the
system's scale), which keeps the systems well conditioned and the error monotone; B, C, D are
normalized to unit columns after their updates (the scale moves to A); a sweep that produces a
non-finite or larger error is discarded and the best iterate is returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._linalg import (
    DTYPE, InputFactorSolver, as_matrix, expanded_relative_error, prepare_sigma, relative_error, sigma_matmul,
)
from .base import Decomposition, khatri_rao
from .svd import DEFAULT_SIGMA_REG


@dataclass
class CP(Decomposition):
    """W̃ = Σ_r out_factor[:, r] ∘ in_factor[:, r] ∘ vertical[:, r] ∘ horizontal[:, r] with
    ``out_factor`` (T, R), ``in_factor`` (S, R), ``vertical`` (kh, R), ``horizontal`` (kw, R); for a
    matrix weight vertical and horizontal are (1, R) ones."""

    out_factor: Tensor
    in_factor: Tensor
    vertical: Tensor
    horizontal: Tensor
    method = "cp"

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.out_factor.shape[1],)

    def reconstruct(self) -> Tensor:
        k = khatri_rao(self.in_factor, self.vertical, self.horizontal)
        return (self.out_factor @ k.T).reshape(self.shape)


def _damped_solve(gram: Tensor, rhs: Tensor, previous: Tensor, damping: float) -> Tensor:
    """argmin_X tr(X gram Xᵀ) − 2 tr(X rhsᵀ) + μ‖X − previous‖², μ = damping · mean diag(gram);
    X, rhs, previous (m, n), gram (n, n) SPD."""
    n = gram.shape[0]
    mu = damping * float(torch.trace(gram)) / n
    chol, info = torch.linalg.cholesky_ex(gram + mu * torch.eye(n, dtype=gram.dtype, device=gram.device))
    if info != 0:
        return torch.linalg.lstsq(gram + mu * torch.eye(n, dtype=gram.dtype), (rhs + mu * previous).T).solution.T
    return torch.cholesky_solve((rhs + mu * previous).T, chol).T


def cp(
    weight: Tensor,
    sigma: Tensor | None = None,
    rank: int = 1,
    *,
    max_iter: int = 100,
    tol: float = 1e-5,
    damping: float = 1e-6,
    init: str = "svd",
    seed: int = 0,
    cg_iter: int = 5,
    cg_tol: float = 1e-3,
    sigma_reg: float = DEFAULT_SIGMA_REG,
) -> CP:
    """Rank-``rank`` CP fit of ``weight`` ((T, S, kh, kw) or (T, S)) in the Σ-norm (Frobenius if
    sigma=None). Stops when a sweep lowers the relative error by less than ``tol`` (relative) or after
    ``max_iter`` sweeps. ``init``: 'svd' (leading singular vectors of each unfolding, seeded random
    columns beyond the mode size) or 'random' (seeded)."""
    w1, (n_out, n_in, kh, kw) = as_matrix(weight)
    n_pos = kh * kw
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    s = prepare_sigma(sigma, w1.shape[1], sigma_reg)
    w_sigma = sigma_matmul(w1, s)
    norm_sq = (w_sigma * w1).sum()  # ‖W₁‖²_Σ
    solver = InputFactorSolver(s, n_in, n_pos)
    w4 = w1.reshape(n_out, n_in, kh, kw)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def initial(mode: int) -> Tensor:
        size = w4.shape[mode]
        factor = torch.randn(size, rank, generator=gen, dtype=DTYPE).to(w1.device)
        if init == "svd":
            unfolding = w4.movedim(mode, 0).reshape(size, -1)
            u, _, _ = torch.linalg.svd(unfolding, full_matrices=False)
            k = min(rank, u.shape[1])
            factor[:, :k] = u[:, :k]
        elif init != "random":
            raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
        return factor / torch.linalg.vector_norm(factor, dim=0)

    def out_step(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> tuple[Tensor, float]:
        """The new A and the relative error with it (expanded through the normal equations' K Σ Kᵀ and W Σ Kᵀ)."""
        k = khatri_rao(b, c, d)
        k_sigma = sigma_matmul(k.T, s)  # (R, S·P)
        gram, rhs = k_sigma @ k, w1 @ k_sigma.T
        a = _damped_solve(gram, rhs, a, damping)
        err = expanded_relative_error(norm_sq, (a * rhs).sum(), ((a @ gram) * a).sum(),
                                      lambda: relative_error(w1, a @ k.T, s))
        return a, err

    def in_step(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
        # Replace A by its triangular factor (A = Q R_A) when T > R: same normal equations, smaller m.
        q, r_a = torch.linalg.qr(a) if n_out > rank else (None, a)
        y_sigma = w_sigma if q is None else q.T @ w_sigma
        f = r_a[:, :, None] * khatri_rao(c, d).T[None, :, :]  # (m, R, P)
        return solver.solve(f, y_sigma, b, damping=damping, tol=cg_tol, max_iter=cg_iter)

    # The spatial steps see the kernel axis they solve for as axis "k" of rows (s, k, j): the vertical step
    # uses W and Σ as they are, the horizontal one their kernel-transposed views.
    transposed = (
        w4.transpose(2, 3).reshape(n_out, -1),
        None if s is None else s.reshape(n_in, kh, kw, n_in, kh, kw).permute(0, 2, 1, 3, 5, 4).reshape(s.shape),
    )

    def spatial_step(a: Tensor, b: Tensor, unknown: Tensor, other: Tensor, w_rows: Tensor, sigma: Tensor | None) -> Tensor:
        """New spatial factor (n_k, R) of the model W̃[t, s, k, j] = Σ_r a[t,r] b[s,r] unknown[k,r] other[j,r]."""
        n_k, n_j = unknown.shape[0], other.shape[0]
        # N = Σ Z with Z[(s, k, j), (l, r)] = b[s, r] δ_kl other[j, r] (the model is Z · vec(unknown)).
        b_other = khatri_rao(b, other)  # (S·n_j, R)
        if sigma is None:
            eye = torch.eye(n_k, dtype=DTYPE, device=w1.device)
            n = torch.einsum("sjr,kl->skjlr", b_other.reshape(n_in, n_j, rank), eye).reshape(-1, n_k, rank)
        else:
            sig4 = sigma.reshape(-1, n_in, n_k, n_j)
            n = torch.stack([sig4[:, :, k, :].reshape(sig4.shape[0], -1) @ b_other for k in range(n_k)], dim=1)
        # Zᵀ Σ Z, contracting b first (a matmul), then other; times AᵀA per rank pair.
        tmp = (b.T @ n.reshape(n_in, -1)).reshape(rank, n_k, n_j, n_k, rank)
        gram = torch.einsum("jr,rkjlq->krlq", other, tmp) * (a.T @ a)[None, :, None, :]
        rhs = torch.einsum("rx,xkr->kr", a.T @ w_rows, n)
        flat = gram.reshape(n_k * rank, n_k * rank)
        return _damped_solve(flat, rhs.reshape(1, -1), unknown.reshape(1, -1), damping).reshape(n_k, rank)

    def normalized(x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        norms = torch.linalg.vector_norm(x, dim=0).clamp_min(torch.finfo(DTYPE).tiny)
        return x / norms, a * norms

    b, c, d = initial(1), initial(2), initial(3)
    a, err = out_step(torch.zeros(n_out, rank, dtype=DTYPE, device=w1.device), b, c, d)
    history = [err]
    best = (a, b, c, d)
    for _ in range(max_iter):
        if history[-1] < 1e-13:
            break
        b, a = normalized(in_step(a, b, c, d), a)
        c, a = normalized(spatial_step(a, b, c, d, w1, s), a)
        d, a = normalized(spatial_step(a, b, d, c, *transposed), a)
        a, err = out_step(a, b, c, d)
        if not err <= history[-1]:  # NaN or an increase from round-off: keep the best iterate
            break
        history.append(err)
        best = (a, b, c, d)
        if history[-2] - history[-1] <= tol * history[-2]:
            break
    a, b, c, d = best
    return CP(tuple(weight.shape), out_factor=a, in_factor=b, vertical=c, horizontal=d, history=history)


def sweep_macs(shape: tuple[int, ...], rank: int, cg_iter: int = 5) -> float:
    """Multiply-adds of one sweep of ``cp`` for a weight of ``shape`` (T, S, kh, kw) at ``rank`` (leading terms:
    the input factor's CG applies through Σ, the two spatial systems, the output step, which also gives the error)."""
    n_out, n_in = shape[0], shape[1]
    kh, kw = (shape[2], shape[3]) if len(shape) == 4 else (1, 1)
    dim, m = n_in * kh * kw, min(n_out, rank)
    inputs = (cg_iter + 1) * (m * dim * dim + 2 * m * n_in * rank * kh * kw) + m * rank**2 * kh * kw
    spatial = sum(dim * dim * rank + rank**2 * dim * k + (k * rank) ** 3 / 3 for k in (kh, kw))
    return inputs + spatial + rank * dim * dim + rank**2 * dim + rank**3 / 3 + n_out * dim * rank

