"""Fitting one layer: which norm, which decomposition, and what its error costs the model.

A ``LayerProblem`` holds a layer's weight and input statistics. The fit norm is Σ (the paper's
distribution-aware norm), I (Frobenius, the classical baseline) or, with bias correction, the input
covariance C = Σ − μμᵀ: a constant output shift (W − W̃)μ added to the bias removes the mean of the
output error exactly, leaving E‖(W − W̃)(x − μ)‖², so C is then the norm to fit.

The *damage* of an approximation is the predicted loss it causes. With M the moment of the output error
actually incurred (Σ, or C with bias correction) split into its per-image pooled part M̄ (from Σ̄, the moment
of each image's mean patch, minus μμᵀ with bias correction) and the rest V = Σ − Σ̄, it is

    ½ Σ_c ( A_c [(W − W̃) M̄ (W − W̃)ᵀ]_cc + B_c [(W − W̃) V (W − W̃)ᵀ]_cc )

with the pooled and spread sensitivities A, B of ``datd.sensitivity`` (all ones: the plain squared output
error). Statistics without Σ̄ give the position-independent form ½ Σ_c f_c [(W − W̃) M (W − W̃)ᵀ]_cc.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from .decompose import DEFAULT_SIGMA_REG, Decomposition, Grouped, cp, prune, prune_order, svd, tucker2
from .decompose.cp import sweep_macs as cp_sweep_macs
from .decompose.tucker2 import sweep_macs as tucker2_sweep_macs
from .decompose._linalg import EXPANDED_FLOOR, gram_top_eigh, prepare_sigma
from .decompose.prune import PRUNE_REG
from .layers import Geometry
from .sensitivity import Sensitivity

NORMS = ("sigma", "frobenius")


@dataclass
class LayerProblem:
    """One layer to compress: ``weight`` (T, S, kh, kw) or (T, S); ``sigma`` (D, D), ``mean`` (D,) and
    ``sigma_pooled`` (D, D) or None of its input patches; ``geometry`` for costs; ``bias`` (T,) or None.

    A grouped convolution (G groups, weight (T, S/G, kh, kw)) has per-group statistics (G, D, D) / (G, D): it
    is G independent problems, ``group(g)``, on output channels g·T/G … (g+1)·T/G − 1; the functions below
    solve and score those separately and combine them."""

    name: str
    weight: Tensor
    sigma: Tensor
    mean: Tensor
    geometry: Geometry
    bias: Tensor | None
    sigma_pooled: Tensor | None = None
    _prune_orders: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def groups(self) -> int:
        return self.sigma.shape[0] if self.sigma.dim() == 3 else 1

    def group(self, g: int) -> "LayerProblem":
        """The sub-problem of group ``g`` (the problem itself when ungrouped)."""
        if self.groups == 1:
            return self
        rows = slice(g * self.weight.shape[0] // self.groups, (g + 1) * self.weight.shape[0] // self.groups)
        return LayerProblem(f"{self.name}[group {g}]", self.weight[rows], self.sigma[g], self.mean[g], self.geometry,
                            None if self.bias is None else self.bias[rows],
                            None if self.sigma_pooled is None else self.sigma_pooled[g])

    def split(self, x: Tensor) -> list[Tensor]:
        """Per-group blocks of a tensor over output channels (T, …)."""
        return list(x.chunk(self.groups, dim=0))

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

    def damage_terms(self, sensitivity: Sensitivity, bias_correction: bool) -> list[tuple[Tensor, Tensor]]:
        """(per-channel weights (T,), moment (D, D)) pairs whose weighted quadratic forms sum to the damage."""
        if self.sigma_pooled is None:
            return [(sensitivity.total, self.error_moment(bias_correction))]
        pooled = self.sigma_pooled - torch.outer(self.mean, self.mean) if bias_correction else self.sigma_pooled
        return [(sensitivity.pooled, pooled), (sensitivity.spread, self.sigma - self.sigma_pooled)]

    def fit_moment(self, norm: str, bias_correction: bool) -> Tensor | None:
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        return None if norm == "frobenius" else self.error_moment(bias_correction)

    def prune_moment(self, settings: "FitSettings") -> Tensor | None:
        """The fit moment of channel pruning: the fit norm's, with a ridge of ``PRUNE_REG`` of the *uncentered* Σ's
        scale. The refit is a regression on the kept inputs; the covariance Σ − μμᵀ of inputs whose mean dwarfs
        their spread (smooth, upscaled images) is known only to the float32 precision of the sums behind Σ, can
        come out indefinite, and a regression into its null space gives weights that the real inputs do not
        follow (MobileNetV2 with Σ from upscaled Tiny-ImageNet: a 'free' pruning option that measured 7.7 nats)."""
        key = ("moment", settings.norm, settings.bias_correction)
        if key not in self._prune_orders:
            moment = self.fit_moment(settings.norm, settings.bias_correction)
            if moment is not None:
                floor = PRUNE_REG * torch.trace(self.sigma) / self.sigma.shape[-1]
                moment = moment + floor * torch.eye(moment.shape[-1], dtype=moment.dtype, device=moment.device)
            self._prune_orders[key] = moment
        return self._prune_orders[key]

    def prune_order(self, settings: "FitSettings") -> tuple[Tensor, Tensor]:
        """``datd.decompose.prune_order`` of the weight's input channels in ``prune_moment``: (the channels in the
        order they are kept, the relative squared fit error of keeping the first k, k = 0 … H); one greedy pass
        serves every pruning level, so it is kept per norm."""
        key = (settings.norm, settings.bias_correction, settings.sigma_reg)
        if key not in self._prune_orders:
            self._prune_orders[key] = prune_order(self.weight, self.prune_moment(settings),
                                                  channels=self.geometry.input_channels, sigma_reg=settings.sigma_reg)
        return self._prune_orders[key]

    def corrected_bias(self, approx: Tensor, bias_correction: bool) -> Tensor | None:
        """The bias of the factorized layer: the original one, plus (W − W̃)μ with bias correction (which makes
        the mean output error zero)."""
        if not bias_correction:
            return self.bias
        if self.groups > 1:
            return torch.cat([self.group(g).corrected_bias(a, True) for g, a in enumerate(self.split(approx))])
        shift = (self.matrix - approx.reshape(self.matrix.shape)) @ self.mean
        return shift if self.bias is None else self.bias.double() + shift


@dataclass(frozen=True)
class FitSettings:
    """How a layer is fitted. ``budget``: the multiply-adds one iterative fit may spend (``sweeps``: its sweeps are
    cut to what the budget pays for; None = ``max_iter`` sweeps whatever they cost)."""

    norm: str = "sigma"
    bias_correction: bool = True
    sigma_reg: float = DEFAULT_SIGMA_REG
    max_iter: int = 100
    tol: float = 1e-5
    seed: int = 0
    budget: float | None = None

    def continues(self, earlier: "FitSettings") -> bool:
        """Whether a fit with these settings may go on from one with ``earlier``: the same problem and start, at
        most its ``tol`` (so ``earlier`` stopped no later than this fit would have; ``fit`` checks the sweeps)."""
        return dataclasses.replace(earlier, max_iter=self.max_iter, tol=self.tol, budget=self.budget) == self \
            and self.tol <= earlier.tol


def sweeps(method: str, shape: tuple[int, ...], ranks: tuple[int, ...], settings: FitSettings) -> int:
    """The sweeps a fit of ``method`` at ``ranks`` gets for a weight (one group's) of ``shape``: ``max_iter``, or
    fewer where ``settings.budget`` pays for fewer (0: not even one, besides the closed-form start)."""
    if method in ("svd", "prune") or settings.budget is None:  # closed form
        return settings.max_iter
    return min(settings.max_iter, int(settings.budget // _sweep_macs(method, shape, ranks)))


def _sweep_macs(method: str, shape: tuple[int, ...], ranks: tuple[int, ...]) -> float:
    return tucker2_sweep_macs(shape, ranks) if method == "tucker2" else cp_sweep_macs(shape, ranks[0])


def fit_macs(problem: LayerProblem, method: str, ranks: tuple[int, ...], settings: FitSettings) -> float:
    """The multiply-adds an iterative fit (all groups) may spend at most: its sweeps times their cost."""
    shape = tuple(problem.group(0).weight.shape)
    return _sweep_macs(method, shape, ranks) * problem.groups * sweeps(method, shape, ranks, settings)


def fit(problem: LayerProblem, method: str, ranks: tuple[int, ...], settings: FitSettings,
        start: Decomposition | None = None) -> Decomposition:
    """Decompose ``problem.weight`` with ``method`` at ``ranks`` (per group for a grouped conv) in the
    configured norm. ``start``: an iterative fit of the same problem, method and ranks with settings that
    ``settings`` continue (``FitSettings.continues``), to go on from instead of starting afresh: the result is
    the same, bit for bit, for less work."""
    if problem.groups > 1:
        parts = start.parts if isinstance(start, Grouped) else [None] * problem.groups
        return Grouped([fit(problem.group(g), method, ranks, settings, part) for g, part in enumerate(parts)])
    sigma = problem.fit_moment(settings.norm, settings.bias_correction)
    w, reg = problem.weight.detach(), settings.sigma_reg
    if method == "svd":
        return svd(w, sigma, ranks[0], sigma_reg=reg)
    if method == "prune":
        order, errors = problem.prune_order(settings)
        return prune(w, problem.prune_moment(settings), ranks[0], channels=problem.geometry.input_channels,
                     order=order, errors=errors, sigma_reg=reg)
    n_sweeps = sweeps(method, tuple(w.shape), tuple(ranks), settings)
    if start is not None and len(start.history) - 1 > n_sweeps:
        start = None  # it ran more sweeps than these settings pay for
    if method == "tucker2":
        return tucker2(w, sigma, tuple(ranks), max_iter=n_sweeps, tol=settings.tol, sigma_reg=reg, start=start)
    if method == "cp":
        return cp(w, sigma, ranks[0], max_iter=n_sweeps, tol=settings.tol, seed=settings.seed, sigma_reg=reg,
                  start=start)
    raise ValueError(f"unknown method {method!r}")


def _quadratic(problem: LayerProblem, approx: Tensor, weights: Tensor, moment: Tensor) -> Tensor:
    """Per-output-channel (W − W̃) M (W − W̃)ᵀ diagonals (T,) times ``weights``: one group's error quadratic."""
    e = problem.matrix - approx.reshape(problem.matrix.shape)
    return weights * ((e @ moment) * e).sum(dim=1)


def damage(problem: LayerProblem, approx: Tensor, sensitivity: Sensitivity, bias_correction: bool) -> float:
    """Predicted loss of replacing the weight by ``approx`` (see the module docstring)."""
    return damages(problem, [approx], sensitivity, bias_correction)[0]


def damages(problem: LayerProblem, approxes: Iterable[Tensor | Decomposition], sensitivity: Sensitivity,
            bias_correction: bool) -> list[float]:
    """``damage`` of each of ``approxes`` (weights of the layer's shape, or decompositions of it; taken one at a
    time from an iterator), with the moments of the damage formed once for all of them (two D×D float64
    differences per call otherwise: about a quarter of a planning fit's damage on ResNets at 224).

    A decomposition of rank R with a ``matrix_factors`` form W̃₁ = L·Rt is scored in that form (``_factored``): R
    rather than T products of a row with each D×D moment, after one T-row product per moment and call for the
    original weight's own diagonal, so several decompositions per call gain most. Equal to the dense form up to
    round-off amplified by 1 / (relative error)², below 1e-9 relative where that form is used (it falls back to the
    dense form for nearly exact fits)."""
    if problem.groups > 1:
        parts = [problem.split(_dense(a)) for a in approxes]  # each approximation's groups
        per_group = [damages(problem.group(g), [p[g] for p in parts], s, bias_correction)
                     for g, s in enumerate(sensitivity.chunk(problem.groups))]
        return [sum(values) for values in zip(*per_group)]
    terms = problem.damage_terms(sensitivity, bias_correction)
    whole: list[Tensor] = []  # diag(W M Wᵀ) per term, formed at the first factored approximation
    values = []
    for approx in approxes:
        value = _factored(problem, approx, terms, whole)
        if value is None:
            dense = _dense(approx)
            value = 0.5 * sum(float(_quadratic(problem, dense, w, m).sum()) for w, m in terms)
        # ≥ 0: the moments are PSD up to the round-off of their float32 sums, which a fit can find (a covariance of
        # inputs whose mean dwarfs their spread): a predicted gain is never real
        values.append(max(0.0, value))
    return values


def _dense(approx: Tensor | Decomposition) -> Tensor:
    return approx.reconstruct() if isinstance(approx, Decomposition) else approx


def _factored(problem: LayerProblem, approx: Tensor | Decomposition, terms: list[tuple[Tensor, Tensor]],
              whole: list[Tensor]) -> float | None:
    """The damage of ``approx`` from its ``matrix_factors`` L (T, R) and Rt (R, D) or R column indices: per term
    (weights w, moment M), Σ_c w_c (a_c − 2 b_c + e_c) / 2 with a = diag(W M Wᵀ) (``whole``: formed once per call
    and kept for the call's next approximations), b = diag(W M W̃ᵀ) and e = diag(W̃ M W̃ᵀ) through Q = Rt M (R·D²
    multiply-adds, or a gather of R rows of M). None where that costs more than the dense form (a rank near T;
    ``whole`` is not counted, so single approximations are best passed dense) or where the result, a difference of
    larger terms, is below ``EXPANDED_FLOOR``² of them."""
    factors = approx.matrix_factors() if isinstance(approx, Decomposition) else None
    if factors is None:
        return None
    left, right = factors
    w = problem.matrix
    (t, d), r = w.shape, left.shape[1]
    columns = right.dtype == torch.int64  # Rt = I[right]: W̃ reads only those columns (channel pruning)
    if (0 if columns else r * d * d + r * r * d) + 2 * t * d * r + r * r * t >= t * d * d:  # per term, vs dense
        return None
    if not whole:
        whole += [((w @ m) * w).sum(dim=1) for _, m in terms]
    total = scale = 0.0
    for (weights, m), own in zip(terms, whole):
        q = m[right] if columns else right @ m  # Rt M (R, D)
        cross = ((w @ q.T) * left).sum(dim=1)  # diag(W M W̃ᵀ)
        model = ((left @ (q[:, right] if columns else q @ right.T)) * left).sum(dim=1)  # diag(W̃ M W̃ᵀ)
        total += float((weights * (own - 2 * cross + model)).sum())
        scale += float((weights * own).sum())
    if not total >= EXPANDED_FLOOR**2 * scale:  # cancellation has eaten the digits (or a NaN): the dense form
        return None
    return 0.5 * total


def relative_sigma_error(problem: LayerProblem, approx: Tensor) -> float:
    """‖(W − W̃) Σ^{1/2}‖ / ‖W Σ^{1/2}‖ with the problem's uncentered Σ (the paper's per-layer error, in Σ as
    shrunk by ``datd.shrinkage`` where it is; over all groups)."""
    return _relative(problem, approx, lambda p: p.sigma)


def relative_output_error(problem: LayerProblem, approx: Tensor, bias_correction: bool) -> float:
    """sqrt(E‖output error‖² / E‖W x‖²): the error actually incurred (in C with bias correction, else Σ) over the
    layer's output energy (Σ), over all groups."""
    return _relative(problem, approx, lambda p: p.error_moment(bias_correction))


def output_energy(problem: LayerProblem) -> float:
    """E‖W x‖² per position = Σ_groups tr(W Σ Wᵀ): the scale of the layer's output (bias excluded)."""
    one = torch.ones((), dtype=torch.float64)
    return sum(float(_quadratic(p, torch.zeros_like(p.matrix), one, p.sigma).sum())
               for p in (problem.group(g) for g in range(problem.groups)))


def _relative(problem: LayerProblem, approx: Tensor, moment: Callable[[LayerProblem], Tensor]) -> float:
    """sqrt(Σ_groups tr(E M Eᵀ) / Σ_groups tr(W Σ Wᵀ)) with E = W − W̃ and M = ``moment(group problem)``."""
    one = torch.ones((), dtype=torch.float64)
    parts = [(problem.group(g), a) for g, a in enumerate(problem.split(approx))]
    error = sum(float(_quadratic(p, a, one, moment(p)).sum()) for p, a in parts)
    return (error / output_energy(problem)) ** 0.5


def svd_damage_curve(problem: LayerProblem, sensitivity: Sensitivity, settings: FitSettings) -> Tensor:
    """Damage of the rank-R fit of ``svd`` for every R = 0 … T (T+1,), from one eigendecomposition.

    The rank-R fit keeps the top-R eigenvectors u_k of W₁ S W₁ᵀ (S the fit norm): W − W̃ = Σ_{k>R} u_k v_k with
    v_k = u_kᵀ W₁. For each damage term (weights w, moment M) its damage is ½ Σ_{k,l>R} (v_k M v_lᵀ)(Σ_c w_c
    u_k[c] u_l[c]): a trailing-block sum of a T×T matrix, for all R at once. A grouped conv has the same rank
    in every group: its curve is the sum of the groups' (R = 0 … T/G)."""
    if problem.groups > 1:
        return sum(svd_damage_curve(problem.group(g), s, settings)
                   for g, s in enumerate(sensitivity.chunk(problem.groups)))
    w = problem.matrix
    s = prepare_sigma(problem.fit_moment(settings.norm, settings.bias_correction), w.shape[1], settings.sigma_reg)
    _, u = gram_top_eigh(w, s, min(w.shape))  # beyond rank D the fit is exact: v_k = 0
    v = u.T @ w
    h = sum((v @ m @ v.T) * (u.T @ (weights[:, None] * u))
            for weights, m in problem.damage_terms(sensitivity, settings.bias_correction))
    trailing = h.flip(0, 1).cumsum(0).cumsum(1).diagonal().flip(0)  # trailing[R] = Σ_{k,l>=R} h_kl
    return 0.5 * torch.cat([trailing, trailing.new_zeros(w.shape[0] + 1 - trailing.shape[0])]).clamp_min(0)  # as damage()


def prune_damage_curve(problem: LayerProblem, sensitivity: Sensitivity, settings: FitSettings,
                       anchors: list[int]) -> Tensor:
    """Damage of keeping k of the H prunable input channels (``fit(..., 'prune', (k,))``) for every k = 0 … H (H+1,).

    The greedy order gives every k's fit error e_k at once (in the fit norm); the damage weighs the same error by
    the sensitivities, pooled and spread. It is computed exactly at the ``anchors`` (kept counts), and elsewhere
    as e_k times the damage-to-error ratio interpolated (log-linearly in k) between the nearest anchors; 0 at
    k = H, where nothing is removed."""
    _, errors = problem.prune_order(settings)
    h = errors.shape[0] - 1
    counts = sorted({min(max(int(a), 1), h - 1) for a in anchors if h > 1})
    approxes = (fit(problem, "prune", (k,), settings) for k in counts)  # one at a time
    measured = damages(problem, approxes, sensitivity, settings.bias_correction)
    points = [(k, math.log(max(d / float(errors[k]), 1e-300))) for k, d in zip(counts, measured) if errors[k] > 0]
    if not points:  # exact at every anchor (or a single channel): nothing to lose
        return torch.zeros_like(errors)
    ks = torch.arange(h + 1, dtype=errors.dtype)
    xs = torch.tensor([p[0] for p in points], dtype=errors.dtype)
    ys = torch.tensor([p[1] for p in points], dtype=errors.dtype)
    i = torch.searchsorted(xs, ks).clamp(1, max(len(points) - 1, 1))
    if len(points) == 1:
        log_ratio = ys[0].expand(h + 1)
    else:
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        log_ratio = torch.where(ks <= xs[0], ys[0], torch.where(ks >= xs[-1], ys[-1], y0 + (ks - x0) / (x1 - x0) * (y1 - y0)))
    curve = errors * log_ratio.exp()
    curve[h] = 0.0
    return curve
