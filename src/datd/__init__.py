"""datd: distribution-aware tensor decompositions that compress trained CNNs without fine-tuning."""

from .stats import LayerStats, Statistics, collect_stats

__version__ = "0.1.0"
__all__ = ["LayerStats", "Statistics", "collect_stats", "__version__"]
