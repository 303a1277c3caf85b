"""datd: distribution-aware tensor decompositions that compress trained CNNs without fine-tuning.

    model, report = datd.compress(model, calib_loader, target="params=0.5")
    datd.save(model, "out/")                 # JSON config + safetensors state dict
    model = datd.load("out/", base_model)    # re-applied to the original architecture
    fast = datd.for_inference(model, **report["inference"])     # BatchNorms folded, fastest forms
    datd.export(model, example, "model.onnx", "onnx", **report["inference"])
"""

import importlib.metadata

from . import channels, decompose
from .export import export
from .inference import for_inference
from .io import load, save
from .latency import tune_allocator
from .pipeline import CompressConfig, compress
from .plan import Plan, Target
from .stats import LayerStats, Statistics, collect_stats

__version__ = importlib.metadata.version("datd")
__all__ = [
    "CompressConfig", "LayerStats", "Plan", "Statistics", "Target", "channels", "collect_stats", "compress", "decompose",
    "export",
    "for_inference", "load", "save", "tune_allocator", "__version__",
]
