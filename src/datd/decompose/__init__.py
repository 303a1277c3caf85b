"""Σ-aware decompositions of weight tensors: pure functions on tensors (no nn.Module, no I/O).

``sigma=None`` means the Frobenius norm (Σ = I) through the same code path.
"""

from .base import Decomposition, khatri_rao
from .cp import CP, cp
from .svd import DEFAULT_SIGMA_REG, LowRank, spectrum, svd
from .tucker2 import Tucker2, tucker2

__all__ = [
    "CP", "DEFAULT_SIGMA_REG", "Decomposition", "LowRank", "Tucker2", "cp", "khatri_rao", "spectrum", "svd",
    "tucker2",
]
