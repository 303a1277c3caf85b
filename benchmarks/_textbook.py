"""The textbook form of Σ-norm ALS, the baseline that datd's fits are timed against (``benchmarks/decompose.py``).

Written from the algorithms' description (Kalle et al., NeurIPS 2025, for Tucker-2; the same scheme for CP), in
the plainest way: every factor is its own least-squares update with the others fixed, and the input-channel
factor U_S (CP: B) is solved from its full normal equations by unpreconditioned MINRES (SciPy) whose matrix-vector
product is a generic einsum through the whole Σ, started from zero at every sweep. Float64 throughout; each sweep
records (seconds since start, relative Σ-error).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, minres

from datd.decompose._linalg import as_matrix, prepare_sigma, relative_error, top_eigh
from datd.decompose.base import khatri_rao
from datd.decompose.svd import DEFAULT_SIGMA_REG

MINRES_TOL = 1e-5


def _minres(apply, rhs: torch.Tensor, tol: float) -> torch.Tensor:
    """Solve apply(U) = rhs (U of rhs's shape) by unpreconditioned MINRES from zero."""
    shape = rhs.shape

    def matvec(v):
        return apply(torch.from_numpy(np.ascontiguousarray(v)).reshape(shape)).reshape(-1).numpy()

    op = LinearOperator((rhs.numel(), rhs.numel()), matvec=matvec, dtype=np.float64)
    solution, _ = minres(op, rhs.reshape(-1).numpy(), rtol=tol)
    return torch.from_numpy(solution).reshape(shape)


def tucker2(weight: torch.Tensor, sigma: torch.Tensor, ranks: tuple[int, int], sweeps: int,
            tol: float = MINRES_TOL) -> list[tuple[float, float]]:
    """Sweeps of U_T (least squares), core (least squares), U_S (MINRES) from datd's HOSVD start."""
    start = time.perf_counter()
    w1, (n_out, n_in, kh, kw) = as_matrix(weight)
    p = kh * kw
    r_out, r_in = ranks
    s = prepare_sigma(sigma, w1.shape[1], DEFAULT_SIGMA_REG)
    w_sigma = w1 @ s
    mode2 = w1.reshape(n_out, n_in, p).permute(1, 0, 2).reshape(n_in, -1)
    _, u_s = top_eigh(mode2 @ mode2.T, r_in)
    mode1 = w1.reshape(n_out, -1)
    _, u_t = top_eigh(mode1 @ mode1.T, r_out)
    g = torch.einsum("ta,tsp,sb->abp", u_t, w1.reshape(n_out, n_in, p), u_s)

    def approx() -> torch.Tensor:
        return torch.einsum("ta,abp,sb->tsp", u_t, g, u_s).reshape(n_out, -1)

    history = [(time.perf_counter() - start, relative_error(w1, approx(), s))]
    for _ in range(sweeps):
        m = torch.einsum("abp,sb->asp", g, u_s).reshape(r_out, -1)  # W̃₁ = U_T M
        u_t = torch.linalg.solve(m @ s @ m.T, m @ w_sigma.T).T
        q = torch.einsum("sb,pq->spbq", u_s, torch.eye(p, dtype=w1.dtype)).reshape(n_in * p, r_in * p)
        left, right = u_t.T @ u_t, q.T @ s @ q
        g1 = torch.linalg.solve(left, u_t.T @ w_sigma @ q)
        g = torch.linalg.solve(right, g1.T).T.reshape(r_out, r_in, p)
        f = torch.einsum("ta,abp->tbp", u_t, g)

        def normal(u: torch.Tensor) -> torch.Tensor:
            x = torch.einsum("tbp,sb->tsp", f, u).reshape(n_out, -1)
            return torch.einsum("tbp,tsp->sb", f, (x @ s).reshape(n_out, n_in, p))

        u_s = _minres(normal, torch.einsum("tbp,tsp->sb", f, w_sigma.reshape(n_out, n_in, p)), tol)
        history.append((time.perf_counter() - start, relative_error(w1, approx(), s)))
    return history


def cp(weight: torch.Tensor, sigma: torch.Tensor, rank: int, sweeps: int, tol: float = MINRES_TOL,
       seed: int = 0) -> list[tuple[float, float]]:
    """Sweeps of B (MINRES), C, D (dense normal equations) and A (least squares), from datd's SVD start."""
    start = time.perf_counter()
    w1, (n_out, n_in, kh, kw) = as_matrix(weight)
    s = prepare_sigma(sigma, w1.shape[1], DEFAULT_SIGMA_REG)
    w4 = w1.reshape(n_out, n_in, kh, kw)
    gen = torch.Generator().manual_seed(seed)

    def initial(mode: int) -> torch.Tensor:
        size = w4.shape[mode]
        factor = torch.randn(size, rank, generator=gen, dtype=w1.dtype)
        u, _, _ = torch.linalg.svd(w4.movedim(mode, 0).reshape(size, -1), full_matrices=False)
        k = min(rank, u.shape[1])
        factor[:, :k] = u[:, :k]
        return factor / factor.norm(dim=0)

    b, c, d = initial(1), initial(2), initial(3)

    def a_step() -> torch.Tensor:
        k = khatri_rao(b, c, d)
        return torch.linalg.solve(k.T @ s @ k, k.T @ s @ w1.T).T

    def model(a_, b_, c_, d_) -> torch.Tensor:
        return a_ @ khatri_rao(b_, c_, d_).T

    sigma6 = s.reshape(n_in, kh, kw, n_in, kh, kw)
    w_sigma4 = (w1 @ s).reshape(n_out, n_in, kh, kw)

    def dense_step(which: int) -> torch.Tensor:
        """C (which=2, the kernel-row factor) or D (which=3) from its normal equations, by generic einsums."""
        if which == 2:
            e = b[:, None, :] * d[None, :, :]  # (S, kw, R): the model is Σ_r A[t,r] e[s,j,r] C[i,r]
            n = torch.einsum("sijxyz,sjr->xyzir", sigma6, e)
            gram = torch.einsum("xzq,xyzir->iryq", e, n)
            rhs = torch.einsum("tr,tsij,sjr->ir", a, w_sigma4, e)
        else:
            e = b[:, None, :] * c[None, :, :]  # (S, kh, R)
            n = torch.einsum("sijxyz,sir->xyzjr", sigma6, e)
            gram = torch.einsum("xyq,xyzjr->jrzq", e, n)
            rhs = torch.einsum("tr,tsij,sir->jr", a, w_sigma4, e)
        size = gram.shape[0] * rank
        gram = (gram * (a.T @ a)[None, :, None, :]).reshape(size, size)
        return torch.linalg.solve(gram, rhs.reshape(-1)).reshape(-1, rank)

    a = a_step()
    history = [(time.perf_counter() - start, relative_error(w1, model(a, b, c, d), s))]
    for _ in range(sweeps):
        f = a[:, :, None] * khatri_rao(c, d).T[None]  # (T, R, P)

        def normal(u: torch.Tensor) -> torch.Tensor:
            x = torch.einsum("trp,sr->tsp", f, u).reshape(n_out, -1)
            return torch.einsum("trp,tsp->sr", f, (x @ s).reshape(n_out, n_in, kh * kw))

        b = _minres(normal, torch.einsum("trp,tsp->sr", f, (w1 @ s).reshape(n_out, n_in, kh * kw)), tol)
        c = dense_step(2)
        d = dense_step(3)
        a = a_step()
        history.append((time.perf_counter() - start, relative_error(w1, model(a, b, c, d), s)))
    return history
