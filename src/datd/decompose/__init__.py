"""Σ-aware decompositions of weight tensors: pure functions on tensors (no nn.Module, no I/O).

``sigma=None`` means the Frobenius norm (Σ = I) through the same code path.
"""

from .base import Decomposition, Grouped, khatri_rao, parts
from .cp import CP, cp
from .prune import Pruned, prune, prune_order
from .svd import DEFAULT_SIGMA_REG, LowRank, spectrum, svd
from .tucker2 import Tucker2, tucker2

__all__ = [
    "CP", "DEFAULT_SIGMA_REG", "Decomposition", "Grouped", "LowRank", "Pruned", "Tucker2", "cp", "khatri_rao", "parts",
    "prune", "prune_order", "spectrum", "svd", "tucker2",
]
