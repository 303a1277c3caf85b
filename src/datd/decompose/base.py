"""The result type shared by every decomposition."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

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

    def factors(self) -> dict[str, Tensor]:
        """Named factor tensors (the tensor fields of the concrete class)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}

    def _shape4(self) -> tuple[int, int, int, int]:
        return (self.shape[0], self.shape[1], 1, 1) if len(self.shape) == 2 else tuple(self.shape)  # type: ignore[return-value]


def khatri_rao(*factors: Tensor) -> Tensor:
    """Column-wise Kronecker product: (n₁, R), (n₂, R), … -> (n₁·n₂·…, R), first index slowest."""
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])
    return out

