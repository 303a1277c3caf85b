"""Artifacts: atomic writes, JSON, and compressed models saved as a JSON config plus a safetensors state dict."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from safetensors.torch import load_file, save_file
from torch import nn

from .channels import apply_sizes, channel_sizes
from .errors import DatdError, MissingFileError, reading
from .inference import MEMORY_FORMATS, for_inference
from .layers import FACTORIZED_TYPES
from .surgery import apply_config


MODEL_FORMAT = "datd-model/1"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is flushed to disk and replaces ``path``
    atomically, on error it is removed and ``path`` is left untouched."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    """Flush a written file (or a directory's entries) to the disk, so a rename never publishes a hole."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_result(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a result written by datd (a compressed-model config)."""
    try:
        return json.loads((Path(directory) / CONFIG_FILE).read_text(encoding="utf-8")).get("format") == MODEL_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_output_directory(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse (DatdError) an output path that is a file, or a directory holding anything but an earlier datd
    result, unless ``overwrite``: checked before any work starts, so that nobody's files are replaced."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise DatdError(f"output path {target} exists and is not a directory")
    if target.is_dir() and not overwrite and any(target.iterdir()) and not is_result(target):
        raise DatdError(f"output directory {target} exists and holds other files; choose another --out or pass "
                        "--overwrite to replace its contents")


@contextmanager
def output_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; once the block succeeds it becomes ``path`` (the
    previous directory there is swapped out by two renames, then deleted), on error it is removed and
    ``path`` is left as it was. Readers see the previous complete result or the new one, never a mixture
    (a kill between the two renames leaves the previous result at ``.NAME.old-PID`` beside it)."""
    target = Path(path)
    check_output_directory(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _fsync(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no such file: {path}")
    with reading(f"{path} as JSON"):
        return json.loads(path.read_text(encoding="utf-8"))


def compression_config(model: nn.Module) -> dict[str, dict]:
    """{layer name: {"method", "ranks", "bias"}} for every factorized module of ``model``."""
    return {
        name: {"method": m.kind, "ranks": list(m.ranks), "bias": m.last.bias is not None}
        for name, m in model.named_modules() if isinstance(m, FACTORIZED_TYPES)
    }


def save(model: nn.Module, directory: str | os.PathLike, *, source: dict | None = None,
         inference: dict | None = None) -> Path:
    """Write a compressed model as ``config.json`` (which layers are factorized how, the channel counts of the
    modules that channel pruning shrank, plus ``source``: how to rebuild the base model, e.g. {"model": "cifar_resnet20", "weights": …}, and ``inference``: how it runs
    fastest, {"memory_format": …, "forms": {layer: form}} as in ``report["inference"]``) and
    ``model.safetensors`` (the full state dict). Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"format": MODEL_FORMAT, "source": source or {}, "layers": compression_config(model),
              "channels": channel_sizes(model),
              "inference": _checked_inference(inference or {}, directory / CONFIG_FILE)}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    write_json(directory / CONFIG_FILE, config)
    return directory


def _checked_inference(inference: dict, where: Path) -> dict:
    """{"memory_format": str, "forms": {layer: form}} with defaults, or DatdError."""
    if not isinstance(inference, dict):
        raise DatdError(f"{where}: 'inference' must be an object")
    memory_format = inference.get("memory_format", "contiguous")
    forms = inference.get("forms", {})
    if (memory_format not in MEMORY_FORMATS or not isinstance(forms, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in forms.items())):
        raise DatdError(f"{where}: 'inference' must hold a memory_format ({', '.join(MEMORY_FORMATS)}) and forms "
                        "mapping layer names to execution forms")
    return {"memory_format": memory_format, "forms": dict(forms)}


def read_config(directory: str | os.PathLike) -> dict:
    """The ``config.json`` of a saved compressed model (validated: DatdError otherwise)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingFileError(f"compressed model directory not found: {directory}")
    where = directory / CONFIG_FILE
    config = read_json(where)
    if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT or not isinstance(config.get("layers"), dict):
        raise DatdError(f"{where} is not a datd compressed-model config ({MODEL_FORMAT})")
    for name, entry in config["layers"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("method"), str) and isinstance(entry.get("bias"), bool)
                and isinstance(entry.get("ranks"), list) and entry["ranks"]
                and all(type(r) is int and r >= 1 for r in entry["ranks"])):
            raise DatdError(f"{where}: layer '{name}' needs a method, positive integer ranks and a bias flag")
    channels = config.setdefault("channels", {})  # files written before channel pruning have none
    if not isinstance(channels, dict) or not all(
            isinstance(sizes, dict) and {"in", "out"} & set(sizes) and set(sizes) <= {"in", "out", "bias"}
            and all(type(v) is int and v >= 1 for k, v in sizes.items() if k != "bias")
            and type(sizes.get("bias", False)) is bool for sizes in channels.values()):
        raise DatdError(f"{where}: 'channels' must map module names to positive integer 'in'/'out' channel counts "
                        "(and a 'bias' flag)")
    if not isinstance(config.get("source", {}), dict):
        raise DatdError(f"{where}: 'source' must be an object")
    config["inference"] = _checked_inference(config.get("inference") or {}, where)
    return config


def load(directory: str | os.PathLike, base_model: nn.Module, *, inference: bool = False) -> nn.Module:
    """Re-apply a saved compression to ``base_model`` (the original architecture; modified in place and
    returned) and load the saved weights (strict). With ``inference``, return its inference form instead
    (BatchNorms folded, the saved execution forms and memory format: ``datd.for_inference``)."""
    directory = Path(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise MissingFileError(f"missing {weights}")
    with reading(weights):
        state = load_file(str(weights))
    with reading(f"{directory}: its configuration does not fit the base model"):
        apply_config(base_model, config["layers"])
        apply_sizes(base_model, config["channels"])
    # safetensors keeps no module versions; some modules check theirs when loading (torchvision's MNASNet):
    # the base model's own are the right ones, it is the same architecture
    state = OrderedDict(state)
    state._metadata = getattr(base_model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    try:
        base_model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DatdError(f"{weights} does not fit the base model with the saved configuration: {exc}") from exc
    if inference:
        return for_inference(base_model, **config["inference"])
    return base_model.eval()
