"""Tucker-2 in the Σ-norm by alternating least squares.

W̃ = G ×₁ U_T ×₂ U_S with U_T (T, R_T), G (R_T, R_S, kh, kw), U_S (S, R_S): the kernel modes are kept.
With Q = U_S ⊗ I_P (S·P, R_S·P) the model is W̃₁ = U_T G₁ Qᵀ. One sweep:

1. U_S step: with (U_T, G) fixed, minimize over U_S. Its normal equations are SPD with S·R_S unknowns;
   they are solved by preconditioned CG warm-started at the current U_S (``InputFactorSolver``), then
   U_S is re-orthonormalized (the next step absorbs the change of basis exactly).
2. (U_T, G) step, jointly closed form for fixed U_S (reduced-rank regression): with C = W₁ Σ Q and
   Qᵀ Σ Q = K Kᵀ, U_T = top-R_T left singular vectors of C K⁻ᵀ and G₁ = U_Tᵀ C (Qᵀ Σ Q)⁻¹.

Both steps minimize exactly or monotonically, so the Σ-error never increases across sweeps (the CG applies are in
float32 while the error is above ``SOLVE_FLOOR``; a sweep whose float64 error does not fall is redone in float64, and
if it still does not fall, the fit ends with the factors before it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._linalg import (
    DTYPE, InputFactorSolver, as_matrix, cholesky_jittered, expanded_relative_error, orthonormal_columns, prepare_sigma,
    relative_error, sigma_matmul, top_eigh,
)
from .base import Decomposition, check_start, converged
from .svd import DEFAULT_SIGMA_REG


@dataclass
class Tucker2(Decomposition):
    """W̃ = core ×₁ out_factor ×₂ in_factor: ``out_factor`` U_T (T, R_T), ``core`` G (R_T, R_S, kh, kw)
    (or (R_T, R_S) for a matrix), ``in_factor`` U_S (S, R_S) with orthonormal columns."""

    out_factor: Tensor
    core: Tensor
    in_factor: Tensor
    method = "tucker2"

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.out_factor.shape[1], self.in_factor.shape[1])

    def reconstruct(self) -> Tensor:
        r_out, r_in = self.ranks
        core = self.core.reshape(r_out, r_in, -1)
        return torch.einsum("ta,abp,sb->tsp", self.out_factor, core, self.in_factor).reshape(self.shape)

    def matrix_factors(self) -> tuple[Tensor, Tensor]:
        r_out, r_in = self.ranks
        core = self.core.reshape(r_out, r_in, -1)
        return self.out_factor, torch.einsum("abp,sb->asp", core, self.in_factor).reshape(r_out, -1)


def tucker2(
    weight: Tensor,
    sigma: Tensor | None = None,
    ranks: tuple[int, int] = (1, 1),
    *,
    max_iter: int = 50,
    tol: float = 1e-5,
    init: str = "hosvd",
    seed: int = 0,
    cg_iter: int = 5,
    cg_tol: float = 1e-3,
    sigma_reg: float = DEFAULT_SIGMA_REG,
    start: Tucker2 | None = None,
) -> Tucker2:
    """Tucker-2 fit of ``weight`` ((T, S, kh, kw) or (T, S)) with ``ranks`` = (R_T, R_S) in the Σ-norm
    (Frobenius if sigma=None). Stops when a sweep lowers the relative error by less than ``tol``
    (relative) or after ``max_iter`` sweeps. ``init``: 'hosvd' (top singular vectors of the mode-2
    unfolding; deterministic) or 'random' (seeded). ``start``: a fit to continue, as for ``cp``."""
    w1, (n_out, n_in, kh, kw) = as_matrix(weight)
    r_out, r_in = ranks
    n_pos = kh * kw
    if not (1 <= r_out <= n_out and 1 <= r_in <= n_in):
        raise ValueError(f"ranks must satisfy 1 <= R_T <= {n_out} and 1 <= R_S <= {n_in}, got {ranks}")
    s = prepare_sigma(sigma, w1.shape[1], sigma_reg)
    w_sigma = sigma_matmul(w1, s)
    solver = InputFactorSolver(s, n_in, n_pos)

    norm_sq = (w_sigma * w1).sum()  # ‖W₁‖²_Σ
    # WΣ and Σ with the kernel position moved next to the row ((t, p), s) / ((x, p), s), once per fit, so that the
    # core step contracts the input channel s with U_S in one plain matrix product each.
    wsigma_by_pos = w_sigma.reshape(n_out, n_in, n_pos).transpose(1, 2).reshape(-1, n_in)
    sigma_by_pos = None if s is None else s.reshape(-1, n_in, n_pos).transpose(1, 2).reshape(-1, n_in)

    def core_step(u_s: Tensor) -> tuple[Tensor, Tensor, float]:
        """The new (U_T, G) and the relative error with them: with W̃₁ = U_T G₁ Qᵀ (U_T orthonormal, Q = U_S ⊗ I_P),
        tr(W̃₁ Σ W₁ᵀ) = ⟨U_T G₁, W₁ Σ Q⟩ and ‖W̃₁‖²_Σ = ‖G₁ K‖² for Qᵀ Σ Q = K Kᵀ."""
        c = (wsigma_by_pos @ u_s).reshape(n_out, n_pos, r_in).transpose(1, 2).reshape(n_out, -1)  # W Σ Q: [t, (b, p)]
        if sigma_by_pos is None:
            chol = torch.eye(r_in * n_pos, dtype=DTYPE, device=w1.device)
        else:
            sq = (sigma_by_pos @ u_s).reshape(n_in, -1)  # Σ Q: [s, (q, p, b)] for rows x = (s, q)
            gram = (u_s.T @ sq).reshape(r_in, n_pos, n_pos, r_in).transpose(2, 3)  # Qᵀ Σ Q: [a, q, b, p]
            chol = cholesky_jittered(gram.reshape(r_in * n_pos, r_in * n_pos))
        z = torch.linalg.solve_triangular(chol, c.T, upper=False).T
        _, u_t = top_eigh(z @ z.T, r_out)
        g = torch.linalg.solve_triangular(chol.T, (u_t.T @ z).T, upper=True).T
        err = expanded_relative_error(norm_sq, ((u_t @ g) * c).sum(), ((g @ chol) ** 2).sum(),
                                      lambda: error(u_t, g.reshape(r_out, r_in, n_pos), u_s))
        return u_t, g.reshape(r_out, r_in, n_pos), err

    def error(u_t: Tensor, g: Tensor, u_s: Tensor) -> float:
        return relative_error(w1, torch.einsum("ta,abp,sb->tsp", u_t, g, u_s).reshape(n_out, -1), s)

    def initial_in_factor() -> Tensor:
        if init == "hosvd":
            mode2 = w1.reshape(n_out, n_in, n_pos).permute(1, 0, 2).reshape(n_in, -1)
            return top_eigh(mode2 @ mode2.T, r_in)[1]
        if init == "random":
            gen = torch.Generator(device="cpu").manual_seed(seed)
            return orthonormal_columns(torch.randn(n_in, r_in, generator=gen, dtype=DTYPE).to(w1.device))
        raise ValueError(f"init must be 'hosvd' or 'random', got {init!r}")

    if start is not None:
        check_start(start, weight.shape, tuple(ranks))
        u_t, g, u_s = start.out_factor, start.core.reshape(r_out, r_in, n_pos), start.in_factor
        history = list(start.history)
    else:
        u_s = initial_in_factor()
        u_t, g, err = core_step(u_s)
        history = [err]
    while len(history) - 1 < max_iter and not converged(history, tol):
        for precise in solver.attempts(history):
            trial = orthonormal_columns(solver.solve(g, u_t.T @ w_sigma, u_s, damping=0.0, tol=cg_tol, max_iter=cg_iter,
                                                     precise=precise))
            u_t_trial, g_trial, err = core_step(trial)
            if err <= history[-1]:
                break
        if not err <= history[-1]:  # NaN, or no step lowers the error even in float64 (round-off): keep the last
            break
        u_s, u_t, g = trial, u_t_trial, g_trial
        history.append(err)
    core_shape = (r_out, r_in) + tuple(weight.shape[2:])
    return Tucker2(tuple(weight.shape), out_factor=u_t, core=g.reshape(core_shape), in_factor=u_s, history=history)


def sweep_macs(shape: tuple[int, ...], ranks: tuple[int, int], cg_iter: int = 5) -> float:
    """Multiply-adds of one sweep of ``tucker2`` for a weight of ``shape`` (T, S, kh, kw) at ``ranks`` (leading
    terms: the CG applies through Σ, the projected Σ of the core step, its factorization; the error comes from the
    core step's products)."""
    n_out, n_in = shape[0], shape[1]
    n_pos = shape[2] * shape[3] if len(shape) == 4 else 1
    r_out, r_in = ranks
    dim, core = n_in * n_pos, r_in * n_pos
    return ((cg_iter + 1) * (r_out * dim * dim + 2 * r_out * dim * r_in) + dim * dim * r_in + dim * n_pos * r_in**2
            + core**3 / 3 + n_out * dim * r_in + n_out * core**2)

