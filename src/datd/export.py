"""Export of a model's inference form to ONNX or TorchScript, with a dynamic batch size, checked against torch.

``export(model, example, path, format)`` builds the inference form (``datd.inference.for_inference``:
BatchNorms folded, each factorized layer in its execution form), exports it, reloads the file with ONNX
Runtime / TorchScript, and compares its outputs with the torch model's on ``example`` and on a batch of
another size (relative error ≤ ``rtol``). Only a checked file is written (atomically): a failed check
raises and leaves any previous file in place.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from .inference import for_inference
from .io import atomic_path

FORMATS = ("onnx", "torchscript")


def _relative_error(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _import_onnxruntime():
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime
    except ImportError as exc:
        raise RuntimeError("ONNX export needs onnx and onnxruntime: pip install 'datd[export]'") from exc
    return onnxruntime


def onnxruntime_session(path: str | os.PathLike, threads: int | None = None) -> Callable[[Tensor], Tensor]:
    """A callable running the ONNX model at ``path`` on the CPU with ONNX Runtime (``threads`` intra-op threads,
    default: torch's thread count): (N, …) float32 tensor -> first output as a tensor. Its threads do not spin
    between runs: spinning threads of one session steal the cores of the next one timed beside it (measured
    here: the original ResNet-20 at batch 32 took 28 ms with spinning, 7 ms without)."""
    ort = _import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {name: np.ascontiguousarray(x.detach().cpu().numpy())})[0])

    return run


class OnnxModel(nn.Module):
    """An ONNX model run by ONNX Runtime on the CPU, as an nn.Module (for ``accuracy`` and latency ``compare``)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        super().__init__()
        self.path = Path(path)
        self._run = onnxruntime_session(path, threads)

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x)


def _onnx(model: nn.Module, example: Tensor, path: Path, opset: int | None) -> None:
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["output"],
                              dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, external_data=False,
                              verbose=False)
    except Exception as exc:  # noqa: BLE001 - models torch.export cannot capture: the TorchScript-based exporter
        warnings.warn(f"torch.export could not capture the model ({type(exc).__name__}); using the TorchScript-based "
                      "ONNX exporter", stacklevel=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset or 17,
                              dynamo=False)


def _torchscript(model: nn.Module, example: Tensor, path: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (example,), check_trace=False)
    torch.jit.save(traced, str(path))


def export(model: nn.Module, example: Tensor, path: str | os.PathLike, format: str = "onnx", *,
           forms: dict[str, str] | None = None, memory_format: str = "contiguous", rtol: float = 1e-4,
           opset: int | None = None) -> Path:
    """Write the inference form of ``model`` (``forms``/``memory_format`` as in ``for_inference``) for inputs
    like ``example`` (N, …) with a dynamic batch size to ``path`` as ``format`` ('onnx' or 'torchscript');
    check the written model against torch (ValueError when the relative error exceeds ``rtol``)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "onnx":
        _import_onnxruntime()
    path = Path(path)
    device = next(iter(model.parameters())).device
    fast = for_inference(model, forms=forms, memory_format=memory_format).to(device)
    example = example.to(device)
    other = torch.cat([example, example[:1]])  # another batch size
    with torch.inference_mode():
        expected = [fast(example), fast(other)]
    suffix = ".onnx" if format == "onnx" else ".pt"
    with atomic_path(path) as tmp:
        tmp_file = tmp.with_suffix(suffix)  # exporters pick the format from nothing, but ONNX may add sidecar data
        try:
            if format == "onnx":
                _onnx(fast.cpu(), example.cpu(), tmp_file, opset)
                run = onnxruntime_session(tmp_file)
                got = [run(example.cpu()), run(other.cpu())]
            else:
                _torchscript(fast, example, tmp_file)
                loaded = torch.jit.load(str(tmp_file), map_location=device)
                with torch.inference_mode():
                    got = [loaded(example), loaded(other)]
            errors = [_relative_error(g.to(e.device), e) for g, e in zip(got, expected)]
            if max(errors) > rtol:
                raise ValueError(f"the exported {format} model differs from torch: relative errors {errors} > {rtol}")
            os.replace(tmp_file, tmp)
        finally:
            tmp_file.unlink(missing_ok=True)
    return path


__all__ = ["FORMATS", "OnnxModel", "export", "onnxruntime_session"]
