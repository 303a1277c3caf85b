"""Σ-optimal input-channel selection (channel pruning with least-squares reconstruction).

A weight W (T, H, kh, kw) reads H input channels, each a block of b = kh·kw columns of W₁ (T, D), D = H·b (a
matrix (T, D) whose columns are H channels of b, e.g. a Linear after flattening H×h×w maps, likewise). Keeping a
subset S of the channels and refitting the weight on them,

    W̃₁ = W₁ Σ[:, S] Σ[S, S]⁻¹  on the columns of S, 0 elsewhere,

is the least ‖(W₁ − W̃₁) Σ^{1/2}‖_F of any weight that reads only S: the regression of every output on the kept
inputs (row by row, so it is the same for any weighting of the outputs). It is an interpolative decomposition of
the *inputs*: x ≈ B x_S with B = Σ[:, S] Σ[S, S]⁻¹, and W̃₁ = W₁ B. The channels outside S are then never read, so
whatever only produces them (the layer before, its BatchNorm, a depthwise conv between) can be removed too: a
dense network with fewer channels, faster on any hardware, which no factorization of either layer gives.

Which channels to keep is chosen greedily (``prune_order``): forward selection, each step adding the channel whose
block lowers the Σ-error most given those already kept, by Schur complements of Σ (the residual moment of the
inputs not yet explained). One pass gives the order of all H channels and the error of every prefix, i.e. every
pruning level at once. With Σ = I (``sigma=None``) the error is the Frobenius norm of the dropped columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._linalg import DTYPE, as_matrix, error_from_difference, prepare_sigma, relative_error
from .base import Decomposition

# The default relative regularization of Σ for channel selection: the refit is a regression on the kept inputs, and
# where they are nearly collinear in the calibration data (few images per dimension) an unregularized one gives
# weights thousands of times the original's, which float32 inference and other images do not reproduce (a DenseNet
# on 8 images: 2000× at 1e-6, 1.9× at 1e-3).
PRUNE_REG = 1e-3
# Forward selection adds one channel per step up to this many steps, then several per step (ceil(H / MAX_STEPS)),
# which bounds the work on wide layers (each step updates a D×D Schur complement).
MAX_STEPS = 256


@dataclass
class Pruned(Decomposition):
    """W̃ reading only the input channels ``kept`` (k,) (sorted): ``weight`` (T, k, kh, kw), or (T, k·b) for a
    matrix of ``channels`` blocks of b columns; zero on the ``channels`` − k others."""

    weight: Tensor
    kept: Tensor
    channels: int
    method = "prune"

    @property
    def ranks(self) -> tuple[int, ...]:
        return (int(self.kept.numel()),)

    def reconstruct(self) -> Tensor:
        t = self.shape[0]
        block = math.prod(self.shape[1:]) // self.channels
        full = self.weight.new_zeros(t, self.channels, block)
        full[:, self.kept.to(full.device)] = self.weight.reshape(t, -1, block)
        return full.reshape(self.shape)

    def matrix_factors(self) -> tuple[Tensor, Tensor]:
        t = self.shape[0]
        block = math.prod(self.shape[1:]) // self.channels
        cols = (self.kept[:, None] * block + torch.arange(block, device=self.kept.device)).reshape(-1)
        return self.weight.reshape(t, -1), cols.to(self.weight.device)


def _channel_layout(weight: Tensor, channels: int | None) -> tuple[Tensor, int, int]:
    """(W₁ float64 (T, D), H channels, b columns per channel)."""
    w1, _ = as_matrix(weight)
    d = w1.shape[1]
    h = (weight.shape[1] if weight.dim() == 4 else d) if channels is None else channels
    if h < 1 or d % h:
        raise ValueError(f"{d} input columns cannot be split into {h} channels")
    return w1, h, d // h


def _block_solve(c_blocks: Tensor, rhs: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    """For SPD blocks (n, b, b) and right-hand sides (n, b, m): (‖L⁻¹ rhs‖² per block (n,), ok (n,)), L the Cholesky
    factor of each block raised by ``floor``·I; blocks that are not positive definite even then give 0, not ok."""
    eye = torch.eye(c_blocks.shape[-1], dtype=c_blocks.dtype, device=c_blocks.device)
    chol, info = torch.linalg.cholesky_ex(c_blocks + floor * eye)
    ok = info == 0
    chol = torch.where(ok[:, None, None], chol, eye)
    z = torch.linalg.solve_triangular(chol, rhs, upper=False)
    return torch.where(ok, (z ** 2).sum(dim=(1, 2)), torch.zeros_like(ok, dtype=z.dtype)), ok


def _solve_spd(matrix: Tensor, rhs: Tensor) -> Tensor:
    """matrix⁻¹ rhs for a symmetric positive semi-definite ``matrix``: by Cholesky, or where round-off left it
    indefinite (a covariance Σ − μμᵀ of inputs whose mean dwarfs their spread) by its eigendecomposition with the
    eigenvalues below its round-off level dropped (the least-norm solution)."""
    chol, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    values, vectors = torch.linalg.eigh(matrix)
    keep = values > values.abs().max() * matrix.shape[0] * torch.finfo(matrix.dtype).eps
    return vectors[:, keep] @ ((vectors[:, keep].T @ rhs) / values[keep, None])


def prune_order(weight: Tensor, sigma: Tensor | None = None, *, channels: int | None = None,
                sigma_reg: float = PRUNE_REG) -> tuple[Tensor, Tensor]:
    """Greedy forward selection of the input channels of ``weight`` ((T, H, kh, kw), or (T, D) with ``channels``
    blocks of columns, default D) in the Σ-norm: (order (H,) int64, the channels in the order they are kept;
    errors (H + 1,) float64, the relative squared Σ-error ‖(W − W̃)Σ^{1/2}‖² / ‖WΣ^{1/2}‖² of keeping the first k,
    k = 0 … H, each refitted optimally). Non-increasing in k; 0 at k = H. Σ is regularized by ``sigma_reg`` of its
    scale (a ridge on the refit)."""
    w1, h, b = _channel_layout(weight, channels)
    t, d = w1.shape
    s = prepare_sigma(sigma, d, sigma_reg)
    residual = torch.eye(d, dtype=DTYPE, device=w1.device) if s is None else s.clone()  # Schur complement
    explained = w1 @ residual  # W₁ · residual moment (T, D)
    total = float((explained * w1).sum())
    if total <= 0:
        return torch.arange(h), torch.zeros(h + 1, dtype=DTYPE)
    floor = 1e-12 * float(residual.diagonal().mean())
    members = torch.arange(h, device=w1.device)  # residual and explained are over these channels' columns
    alive = torch.ones(h, dtype=torch.bool, device=w1.device)  # which of them are not kept yet
    offsets = torch.arange(b, device=w1.device)
    order: list[int] = []
    errors = [total]
    per_step = max(1, math.ceil(h / MAX_STEPS))
    while len(order) < h:
        if int(alive.sum()) < 0.75 * members.numel():  # drop the kept channels' columns now and then (a copy)
            cols = (torch.nonzero(alive).reshape(-1)[:, None] * b + offsets).reshape(-1)
            residual, explained = residual[cols[:, None], cols], explained[:, cols]
            members, alive = members[alive], alive[alive]
        a = members.numel()
        # gain of adding channel j alone: tr(P_J C_JJ⁻¹ P_Jᵀ), C the residual moment, P = W₁ C
        blocks = residual.view(a, b, a, b).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (a, b, b)
        rhs = explained.view(t, a, b).permute(1, 2, 0)  # (a, b, T)
        gains, _ = _block_solve(blocks, rhs, floor)
        gains = torch.where(alive, gains, torch.full_like(gains, -1.0))
        m = min(per_step, int(alive.sum()))
        picked = torch.topk(gains, m).indices if m > 1 else gains.argmax().reshape(1)
        cols = (picked[:, None] * b + offsets).reshape(-1)
        c_jj = residual[cols][:, cols] + floor * torch.eye(cols.numel(), dtype=DTYPE, device=w1.device)
        chol, info = torch.linalg.cholesky_ex(c_jj)
        if int(info) == 0:  # residualize every input on the picked ones (Schur complement), in place
            left = torch.linalg.solve_triangular(chol, residual[cols], upper=False)  # L⁻¹ C_J:
            right = torch.linalg.solve_triangular(chol, explained[:, cols].T, upper=False)  # L⁻¹ P_Jᵀ
            # the rows of L⁻¹ P_Jᵀ in pick order: their cumulative energy is the gain of each prefix of the picks
            gains_in_order = (right ** 2).sum(dim=1).reshape(m, b).sum(dim=1).cumsum(0).tolist()
            explained.addmm_(right.T, left, alpha=-1)
            residual.addmm_(left.T, left, alpha=-1)
        else:  # the picked channels are already explained (to round-off): nothing changes
            gains_in_order = [0.0] * m
        alive[picked] = False
        order += members[picked].tolist()
        before = errors[-1]
        errors += [max(before - g, 0.0) for g in gains_in_order]
    errors[-1] = 0.0  # every channel kept: W̃ = W
    return torch.tensor(order), torch.tensor(errors, dtype=DTYPE) / total


def prune(weight: Tensor, sigma: Tensor | None = None, keep: int = 1, *, channels: int | None = None,
          order: Tensor | None = None, errors: Tensor | None = None, sigma_reg: float = PRUNE_REG) -> Pruned:
    """The Σ-optimal weight reading ``keep`` of the input channels of ``weight`` ((T, H, kh, kw), or (T, D) in
    ``channels`` blocks): the first ``keep`` of ``order`` (default: ``prune_order``'s), refitted by least squares
    in the Σ-norm (Σ regularized by ``sigma_reg`` of its scale). ``errors``: what ``prune_order`` gave with
    ``order`` (same Σ and ``sigma_reg``); the fit's error is then read from it rather than recomputed through Σ (a
    T·D² product, the largest of the fit), except where it is too small to be read from a difference
    (``EXPANDED_FLOOR``)."""
    w1, h, b = _channel_layout(weight, channels)
    if not 1 <= keep <= h:
        raise ValueError(f"keep must be in [1, {h}] for {h} input channels, got {keep}")
    if order is None:
        order, errors = prune_order(weight, sigma, channels=h, sigma_reg=sigma_reg)
    kept = torch.sort(order[:keep]).values.to(w1.device)
    cols = (kept[:, None] * b + torch.arange(b, device=w1.device)).reshape(-1)
    s = prepare_sigma(sigma, w1.shape[1], sigma_reg)
    if s is None:
        refit = w1[:, cols]
    else:
        refit = _solve_spd(s[cols][:, cols], (w1 @ s[:, cols]).T).T  # W₁ Σ[:, S] Σ[S, S]⁻¹
    shape = tuple(weight.shape)
    kept_shape = (shape[0], keep) + shape[2:] if weight.dim() == 4 else (shape[0], keep * b)
    result = Pruned(shape, weight=refit.reshape(kept_shape), kept=kept, channels=h)

    def exact() -> float:
        return relative_error(w1, result.reconstruct().reshape(w1.shape), s)

    # errors[k] = 1 − (energy the first k channels explain) / ‖W₁‖²_Σ, a difference of the greedy steps' sums
    result.history = [exact() if errors is None else error_from_difference(float(errors[keep]), exact)]
    return result
