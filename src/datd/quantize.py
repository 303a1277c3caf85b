"""int8 on top of a decomposition: post-training static quantization with ONNX Runtime.

``quantize(model, calib, path)`` exports the model's inference form to ONNX (BatchNorms folded, the factorized
layers in their execution forms; checked against torch), lets ONNX Runtime pre-process it (shape inference,
graph fusions) and quantizes it statically: int8 weights per output channel, uint8 activations whose ranges
are calibrated on the calibration images (QDQ format, which ONNX Runtime's CPU provider fuses into integer
kernels). The default range of each activation is its 0.001–99.999 percentile interval: on compressed CIFAR
ResNet-20s it kept top-1 within 0.5–0.8 points of the float model where min/max ranges lost up to 1.2.
Nothing is written unless every step succeeds; the file is replaced atomically.

The execution forms of the factorized layers (``datd.inference``) that are fastest in float are not those that
are fastest in int8: ONNX Runtime's integer kernels for the k×1 and 1×k depthwise convolutions of a CP layer
written as a chain are slow, and every extra convolution costs a quantize/dequantize pair. ``int8_forms``
measures it: each factorized layer type in each of its forms, quantized and timed against the best so far
(on a compressed CIFAR ResNet-20 at params=0.25, CP layers merged into one k×k conv ran 1.5× faster in int8
than as the chain the float timing had chosen).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .errors import DatdError
from .export import OnnxModel, _import_onnxruntime, export
from .inference import DEFAULT_FORM, for_inference, form_names
from .io import atomic_path
from .layers import FACTORIZED_TYPES
from .stats import batch_inputs

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def _reader(calib: Iterable, images: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Up to ``images`` calibration images, batch by batch, as ONNX Runtime's calibrator reads them."""

        def __init__(self) -> None:
            self.batches = self._batches()

        def _batches(self) -> Iterator[dict]:
            seen = 0
            for batch in calib:
                x = batch_inputs(batch)[: images - seen]
                seen += x.shape[0]
                yield {"input": np.ascontiguousarray(x.detach().cpu().float().numpy())}
                if seen >= images:
                    return

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    return Reader()


def quantize(model: nn.Module, calib: Iterable, path: str | os.PathLike, *, forms: dict[str, str] | None = None,
             memory_format: str = "contiguous", images: int = 512, method: str = "percentile",
             float_path: str | os.PathLike | None = None) -> Path:
    """Write an int8 ONNX model of ``model``'s inference form (``forms``/``memory_format`` as in
    ``for_inference``) to ``path``, with activation ranges calibrated on up to ``images`` images of ``calib``
    by ``method`` ('minmax', 'percentile' or 'entropy'). ``float_path``: where to keep the (checked) float ONNX
    model it starts from, e.g. to time the two side by side. Returns ``path``."""
    if method not in CALIBRATION_METHODS:
        raise DatdError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if images < 1:
        raise DatdError(f"images must be >= 1, got {images}")
    _import_onnxruntime()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    example = batch_inputs(next(iter(calib)))[:2].float().cpu()
    model = model.cpu().eval()
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="datd-quantize-") as work:
        float_file = Path(float_path) if float_path is not None else Path(work) / "float.onnx"
        prepared = Path(work) / "prepared.onnx"
        export(model, example, float_file, "onnx", forms=forms, memory_format=memory_format)
        quant_pre_process(str(float_file), str(prepared))
        with atomic_path(path) as tmp:
            out = tmp.with_suffix(".onnx")
            try:
                quantize_static(str(prepared), str(out), _reader(calib, images), quant_format=QuantFormat.QDQ,
                                per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                                calibrate_method={"minmax": CalibrationMethod.MinMax,
                                                  "percentile": CalibrationMethod.Percentile,
                                                  "entropy": CalibrationMethod.Entropy}[method])
                os.replace(out, tmp)
            finally:
                out.unlink(missing_ok=True)
    return path


def int8_forms(model: nn.Module, calib: Iterable, *, forms: dict[str, str] | None = None,
               memory_format: str = "contiguous", batch: int = 32, images: int = 32, repeats: int = 15,
               margin: float = 0.03, size_slack: float | None = None,
               error_slack: float = 0.1) -> tuple[dict[str, str], list[dict]]:
    """The execution forms of ``model``'s factorized layers in which its int8 model runs fastest in ONNX Runtime
    (CPU, batch ``batch``). Starting from ``forms``, for each factorized layer type in turn the model is quantized
    with every layer of the type in each of its forms, and these are timed together with the best so far,
    interleaved (medians of ``repeats``); a form replaces the best where it is faster by more than ``margin`` and
    its int8 outputs on the timing batch are as close to the float model's as the best's (relative error at most
    ``error_slack`` above it: merged factors can quantize worse).
    Trials are quantized with min/max ranges from ``images`` images: ranges change the scales, not the kernels
    that run (``calib`` is read once per trial: a list or DataLoader, not a one-shot generator). ``size_slack``:
    forms whose model holds more than (1 + slack) times the weights of the model in ``forms`` are not tried
    (merging a CP layer's factors into one k×k conv is often fastest and has several times its weights: not what
    a model compressed for size should become); None tries every form. Returns
    (the forms, the trials: per type, the seconds of each form tried and of the best before, and the forms
    left out for their size, the relative output error of each)."""
    from .latency import compare, example_batch

    _import_onnxruntime()
    factorized = {n: m for n, m in model.named_modules() if isinstance(m, FACTORIZED_TYPES)}
    best = {n: (forms or {}).get(n, DEFAULT_FORM) for n in factorized}
    by_type: dict[str, list[str]] = {}
    for name, module in factorized.items():
        if len(form_names(module)) > 1:
            by_type.setdefault(type(module).__name__, []).append(name)
    trials: list[dict] = []
    if not by_type:
        return best, trials
    example = example_batch(batch_inputs(next(iter(calib))).float().cpu(), batch, memory_format)

    def weights(candidate: dict[str, str]) -> int:
        return sum(p.numel() for p in for_inference(model, forms=candidate, fold=False).parameters())

    limit = None if size_slack is None else (1 + size_slack) * weights(best)
    with torch.no_grad():
        reference = model.eval()(example)

    def error(session: OnnxModel) -> float:
        return float((session(example) - reference).norm() / reference.norm().clamp_min(1e-30))

    with tempfile.TemporaryDirectory(prefix="datd-int8-forms-") as work:
        def session(candidate: dict[str, str], tag: str) -> OnnxModel:
            path = Path(work) / f"{tag}.onnx"
            quantize(model, calib, path, forms=candidate, memory_format=memory_format, images=images, method="minmax")
            return OnnxModel(path)

        current = session(best, "start")
        current_error = error(current)
        for kind, names in by_type.items():
            candidates = {form: {**best, **{n: form for n in names}} for form in form_names(factorized[names[0]])}
            candidates = {form: c for form, c in candidates.items() if c != best}
            too_large = [form for form, c in candidates.items() if limit is not None and weights(c) > limit]
            candidates = {form: c for form, c in candidates.items() if form not in too_large}
            sessions = {form: session(c, f"{kind}-{form}") for form, c in candidates.items()}
            seconds = compare({"best": current, **sessions}, example, repeats=repeats)
            errors = {"best": current_error, **{form: error(s) for form, s in sessions.items()}}
            trials.append({"type": kind, "layers": len(names), "seconds": seconds, "errors": errors,
                           "too_large": too_large})
            accurate = [f for f in sessions if errors[f] <= (1 + error_slack) * current_error]
            fastest = min(accurate, key=seconds.__getitem__, default=None)
            if fastest is not None and seconds[fastest] < (1 - margin) * seconds["best"]:
                best, current, current_error = candidates[fastest], sessions[fastest], errors[fastest]
    return best, trials


__all__ = ["CALIBRATION_METHODS", "int8_forms", "quantize"]
