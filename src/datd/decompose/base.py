"""The result type shared by every decomposition."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


@dataclass
class Decomposition:
    """Factors of an approximation W̃ of a weight of shape ``shape`` ((T, S, kh, kw) or (T, S)).

    ``history`` holds the relative Σ-error ‖(W − W̃)Σ^{1/2}‖_F / ‖W Σ^{1/2}‖_F after initialization and
    after each sweep (one entry for closed-form fits). Factors are float64.
    """

    shape: tuple[int, ...]
    history: list[float] = field(default_factory=list, kw_only=True)

    method = ""

    @property
    def ranks(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def error(self) -> float:
        """Final relative Σ-error."""
        return self.history[-1]

    def reconstruct(self) -> Tensor:
        """The dense approximation W̃, float64, in the original ``shape``."""
        raise NotImplementedError

    def matrix_factors(self) -> tuple[Tensor, Tensor] | None:
        """(L (T, R), Rt) with W̃₁ = L·Rt (W̃ as a (T, D) matrix, D = S·kh·kw), where W̃ has such a rank-R form by
        construction: Rt (R, D), or an int64 index vector (R,) of columns, Rt = I[Rt] (W̃₁ zero outside
        them); None otherwise. Lets a quadratic form in W̃ cost R rather than T products with a D×D moment
        (``datd.fitting.damages``)."""
        return None

    def factors(self) -> dict[str, Tensor]:
        """Named factor tensors (the tensor fields of the concrete class)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}

    def _shape4(self) -> tuple[int, int, int, int]:
        return (self.shape[0], self.shape[1], 1, 1) if len(self.shape) == 2 else tuple(self.shape)  # type: ignore[return-value]


def converged(history: list[float], tol: float) -> bool:
    """Whether an iterative fit with this error ``history`` stops: exact to round-off, or its last sweep lowered the
    error by at most ``tol`` of the error before it."""
    return history[-1] < 1e-13 or (len(history) > 1 and history[-2] - history[-1] <= tol * history[-2])


def check_start(start: Decomposition, shape: tuple[int, ...], ranks: tuple[int, ...]) -> None:
    """Refuse to continue a fit of another weight shape or rank."""
    if tuple(start.shape) != tuple(shape) or tuple(start.ranks) != tuple(ranks):
        raise ValueError(f"cannot continue a {start.method} fit of shape {tuple(start.shape)} at ranks "
                         f"{tuple(start.ranks)} as one of shape {tuple(shape)} at ranks {tuple(ranks)}")


class Grouped(Decomposition):
    """The decompositions of the G groups of a grouped convolution (same method and ranks in each), whose
    weight is their concatenation over output channels. ``history`` is the worst group's relative error after
    each sweep (a group that stopped early keeps its last error)."""

    def __init__(self, parts: list[Decomposition]):
        if not parts or len({(p.method, p.ranks) for p in parts}) != 1:
            raise ValueError("a grouped decomposition needs parts of one method and one rank setting")
        first = parts[0].shape
        sweeps = max(len(p.history) for p in parts)
        history = [max(p.history[min(i, len(p.history) - 1)] for p in parts) for i in range(sweeps)]
        super().__init__((first[0] * len(parts),) + tuple(first[1:]), history=history)
        self.parts = parts
        self.method = parts[0].method

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.parts[0].ranks

    def reconstruct(self) -> Tensor:
        return torch.cat([p.reconstruct() for p in self.parts])

    def factors(self) -> dict[str, Tensor]:
        return {f"group{g}.{k}": v for g, p in enumerate(self.parts) for k, v in p.factors().items()}


def parts(d: Decomposition) -> list[Decomposition]:
    """The per-group decompositions of ``d`` ([d] when ungrouped)."""
    return d.parts if isinstance(d, Grouped) else [d]


def khatri_rao(*factors: Tensor) -> Tensor:
    """Column-wise Kronecker product: (n₁, R), (n₂, R), … -> (n₁·n₂·…, R), first index slowest."""
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])
    return out

