"""Measured latency: timing on the run's device, a persistent cache of layer timings, and the per-layer
latency model that planning spends like parameters or MACs.

Wall-clock time is what users compress for, and it does not follow MACs (a rank-17 conv costs what a rank-32
one does on an AVX-512 CPU; four small memory-bound ops can cost more than one dense GEMM). So every number
here is measured, on the device, at the layer's real input shape and batch size, in the memory format the
model will run in:

- ``time_modules``: median seconds per call of several callables, run in interleaved rounds (each round calls
  every module once, in rotated order) so that drifts of a shared machine hit all of them alike.
- ``LatencyCache``: a JSON file of measured layer timings, keyed by everything a timing depends on (device,
  threads, torch version, dtype, memory format, layer geometry, input shape, method, ranks, execution form).
- ``LatencyModel``: the latency of a layer kept dense and of its factorized candidates (the fastest of their
  execution forms, ``datd.inference``), and what pruning a chain's channels saves, measured on a grid of ranks
  (channel counts) and interpolated in between.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .errors import DatdError
from .inference import MEMORY_FORMATS, as_form, for_inference, form_names
from .io import read_json, write_json
from .layers import build

CACHE_FORMAT = "datd-latency-cache/1"


# ----------------------------------------------------------------------------------------------------------
# the allocator

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_TUNED: str | None = None


def tune_allocator() -> str:
    """Make glibc's malloc keep freed memory for reuse (mallopt: M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 1 GiB)
    for the rest of the process; return a description of the allocator state.

    By default glibc serves each activation tensor above its (dynamic) mmap threshold from fresh pages and
    returns the heap top to the OS whenever enough is free, so an eager forward pass keeps page-faulting its
    own activations: measured on CIFAR ResNet-20 at batch 32 (2 threads), 24 ms per batch instead of 14.5 ms,
    and timings that depend on what the process did before (±50 %). jemalloc and tcmalloc, which PyTorch's
    CPU performance guide recommends, behave like the tuned setting. datd measures latency in this setting
    and recommends it for deployment (or the environment variables MALLOC_MMAP_THRESHOLD_=33554432
    MALLOC_TRIM_THRESHOLD_=1073741824, or an LD_PRELOADed jemalloc/tcmalloc). The cost: the process keeps its
    peak heap instead of returning it to the OS. A no-op on other C libraries."""
    global _TUNED
    if _TUNED is None:
        _TUNED = "default (not glibc)"
        if platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(None)
                ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
            except (OSError, AttributeError):
                ok = False
            _TUNED = ("glibc, mallopt M_MMAP_THRESHOLD=32MiB M_TRIM_THRESHOLD=1GiB (datd.latency.tune_allocator)" if ok
                      else "glibc default (mallopt failed)")
    return _TUNED


def default_rank_multiple(device: str | torch.device) -> int:
    """Rank granularity that the device computes in: 16 on AVX-512 CPUs (oneDNN blocks output channels by 16;
    measured on this project's CPU: a conv with 17–32 output channels takes the time of one with 32), 8 on
    other CPUs (AVX2 holds 8 floats) and on GPUs (tensor-core friendly multiples)."""
    if torch.device(device).type == "cpu" and "AVX512" in torch.backends.cpu.get_cpu_capability():
        return 16
    return 8


# ----------------------------------------------------------------------------------------------------------
# timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_modules(modules: dict[str, Callable[[Tensor], object]], example: Tensor, *, repeats: int = 15,
                 warmup: int = 2) -> dict[str, float]:
    """Median wall-clock seconds of one call ``module(example)`` for each entry, measured in ``repeats``
    interleaved rounds after ``warmup`` untimed rounds."""
    if not modules:
        return {}
    names = list(modules)
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            _synchronize(example.device)
            start = time.perf_counter()
            modules[name](example)
            _synchronize(example.device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {n: sorted(t)[len(t) // 2] for n, t in times.items()}


def example_batch(batch: Tensor, size: int, memory_format: str = "contiguous") -> Tensor:
    """``size`` inputs made by repeating the samples of ``batch`` (N, …), in ``memory_format``."""
    reps = math.ceil(size / batch.shape[0])
    x = batch.repeat(reps, *([1] * (batch.dim() - 1)))[:size].contiguous()
    return x.to(memory_format=MEMORY_FORMATS[memory_format]) if x.dim() == 4 else x


def compare(models: dict[str, Callable[[Tensor], object]], example: Tensor, *, repeats: int = 15) -> dict[str, float]:
    """Median seconds per forward pass of whole models (modules, put in eval mode, or any callables such as
    an ONNX Runtime session's run) on ``example``, interleaved: ratios between them are what to trust on a
    shared machine."""
    return time_modules({n: m.eval() if isinstance(m, nn.Module) else m for n, m in models.items()}, example,
                        repeats=repeats, warmup=2)


def best_memory_format(model: nn.Module, example: Tensor, *, repeats: int = 10) -> tuple[str, dict[str, float]]:
    """The memory format ('contiguous' or 'channels_last') in which ``model``'s inference form runs fastest
    on ``example``, with the measured seconds of each."""
    if example.dim() != 4:
        return "contiguous", {}
    forms = {fmt: for_inference(model, memory_format=fmt) for fmt in MEMORY_FORMATS}
    times = compare(forms, example, repeats=repeats)
    return min(times, key=times.__getitem__), times


# ----------------------------------------------------------------------------------------------------------
# the setting and the cache


@functools.cache
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Setting:
    """Everything a timing depends on besides the module and its input shape."""

    device: str
    threads: int
    torch: str
    dtype: str
    memory_format: str

    @classmethod
    def current(cls, device: str | torch.device, memory_format: str, dtype: torch.dtype = torch.float32) -> "Setting":
        device = torch.device(device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
        return cls(f"{device.type}:{name}", torch.get_num_threads(), torch.__version__, str(dtype).removeprefix("torch."),
                   memory_format)

    def key(self) -> str:
        return f"{self.device}|threads={self.threads}|torch={self.torch}|{self.dtype}|{self.memory_format}"


def default_cache_path() -> Path:
    """$DATD_CACHE_DIR/latency.json, else $XDG_CACHE_HOME/datd/latency.json, else ~/.cache/datd/latency.json."""
    if os.environ.get("DATD_CACHE_DIR"):
        return Path(os.environ["DATD_CACHE_DIR"]) / "latency.json"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "datd" / "latency.json"


class LatencyCache:
    """Measured seconds by key, kept in a JSON file (``path``; None keeps them in memory only). Written
    atomically by ``save``; a file that is not a datd latency cache is refused, never overwritten."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = None if path is None else Path(path)
        self.entries: dict[str, float] = {}
        self._dirty = False
        if self.path is not None and self.path.exists():
            data = read_json(self.path)
            entries = data.get("entries") if isinstance(data, dict) and data.get("format") == CACHE_FORMAT else None
            if not isinstance(entries, dict) or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0
                    for k, v in entries.items()):
                raise DatdError(f"{self.path} is not a datd latency cache ({CACHE_FORMAT}); pass another path or "
                                "delete it")
            self.entries = {k: float(v) for k, v in entries.items()}

    def get(self, key: str) -> float | None:
        return self.entries.get(key)

    def put(self, key: str, seconds: float) -> None:
        self.entries[key] = float(seconds)
        self._dirty = True

    def save(self) -> None:
        if self.path is not None and self._dirty:
            write_json(self.path, {"format": CACHE_FORMAT, "entries": dict(sorted(self.entries.items()))})
            self._dirty = False


# ----------------------------------------------------------------------------------------------------------
# the per-layer latency model


def layer_signature(layer: nn.Module, input_shape: tuple[int, ...]) -> str:
    """What a layer's timing depends on: its type, geometry and input shape (not its weights)."""
    if isinstance(layer, nn.Conv2d):
        return (f"conv2d {layer.in_channels}->{layer.out_channels} k={tuple(layer.kernel_size)} "
                f"s={tuple(layer.stride)} p={layer.padding} d={tuple(layer.dilation)} g={layer.groups} "
                f"pm={layer.padding_mode} in={tuple(input_shape)}")
    if isinstance(layer, nn.Linear):
        return f"linear {layer.in_features}->{layer.out_features} in={tuple(input_shape)}"
    if isinstance(layer, nn.ReLU):  # what an element-wise activation costs (``datd.channels.timed_parts``)
        return f"elementwise in={tuple(input_shape)}"
    raise TypeError(f"no latency model for {type(layer).__name__}")


@dataclass(frozen=True)
class Measured:
    """The latency of one (method, ranks) candidate: seconds of its fastest execution form."""

    seconds: float
    form: str


def rank_grid(ladder: list[tuple[int, ...]], points: int) -> list[tuple[int, ...]]:
    """At most ``points`` ladder entries, geometrically spaced in rank (dense at small ranks, where the
    latency changes fastest), always including the first and the last."""
    if len(ladder) <= points:
        return list(ladder)
    lo, hi = sum(ladder[0]), sum(ladder[-1])
    wanted = [lo * (hi / lo) ** (i / (points - 1)) for i in range(points)]
    chosen = {min(range(len(ladder)), key=lambda j: abs(sum(ladder[j]) - w)) for w in wanted}
    return [ladder[j] for j in sorted(chosen)]


class LatencyModel:
    """Latency of layers kept dense and of factorized candidates, measured at ``batch`` in the given setting
    (through ``cache``), on ``device``.

    A candidate's latency is the fastest of its execution forms. Candidates are measured on a grid of at most
    ``grid_points`` ranks per method, ascending, stopping once two grid ranks in a row are slower than the
    dense layer (larger ranks would not be worth picking); ranks between grid points are interpolated
    linearly in the rank.
    """

    def __init__(self, device: str | torch.device, batch: int, memory_format: str, *, cache: LatencyCache | None = None,
                 repeats: int = 15, grid_points: int = 10, dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.batch = batch
        self.memory_format = memory_format
        self.setting = Setting.current(self.device, memory_format, dtype)
        self.cache = cache if cache is not None else LatencyCache(None)
        self.repeats = repeats
        self.grid_points = grid_points
        self.dtype = dtype
        self.measured = 0  # timings actually run (not found in the cache)

    # -- keys and inputs

    def _input_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.batch,) + tuple(shape[1:])

    def _key(self, signature: str, what: str) -> str:
        return f"{self.setting.key()}|{signature}|{what}"

    def _example(self, shape: tuple[int, ...]) -> Tensor:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen, dtype=self.dtype).to(self.device)
        return x.contiguous(memory_format=MEMORY_FORMATS[self.memory_format]) if x.dim() == 4 else x

    def _prepare(self, module: nn.Module) -> nn.Module:
        module = module.to(device=self.device, dtype=self.dtype).eval()
        return module.to(memory_format=MEMORY_FORMATS[self.memory_format])

    def _measure(self, signature: str, shape: tuple[int, ...], modules: dict[str, nn.Module]) -> dict[str, float]:
        """Seconds per call of the uncached ``modules`` (cache-key suffix -> module), timed together."""
        todo = {w: self._prepare(m) for w, m in modules.items() if self.cache.get(self._key(signature, w)) is None}
        if todo:
            for what, seconds in time_modules(todo, self._example(shape), repeats=self.repeats).items():
                self.cache.put(self._key(signature, what), seconds)
            self.measured += len(todo)
        return {w: self.cache.get(self._key(signature, w)) for w in modules}  # type: ignore[misc]

    # -- public

    def dense(self, layer: nn.Module, input_shape: tuple[int, ...]) -> float:
        """Seconds of ``layer`` itself (with a bias, as after BatchNorm folding) at the model's batch size."""
        shape = self._input_shape(input_shape)
        return self._measure(layer_signature(layer, shape), shape, {"dense": _dense_copy(layer)})["dense"]

    def candidates(self, layer: nn.Module, input_shape: tuple[int, ...], method: str,
                   ladder: Iterable[tuple[int, ...]]) -> dict[tuple[int, ...], Measured]:
        """Latency of ``method`` at every rank setting of ``ladder`` (ascending) for ``layer`` (measured on the
        grid, interpolated between; ranks above the last measured grid point are left out: slower than dense)."""
        ladder = list(ladder)
        if not ladder:
            return {}
        dense = self.dense(layer, input_shape)
        grid: dict[tuple[int, ...], Measured] = {}
        slower = 0
        for ranks in rank_grid(ladder, self.grid_points):
            grid[ranks] = self.best_form(layer, input_shape, method, ranks)
            slower = slower + 1 if grid[ranks].seconds >= dense else 0
            if slower == 2:
                break
        return _interpolate(ladder, grid)

    def best_form(self, layer: nn.Module, input_shape: tuple[int, ...], method: str, ranks: tuple[int, ...]) -> Measured:
        """The fastest execution form of ``layer`` factorized by ``method`` at ``ranks``, and its seconds."""
        shape = self._input_shape(input_shape)
        module = build(layer, method, tuple(ranks), bias=True)
        forms = {f"{method}{list(ranks)}|{form}": as_form(module, form) for form in form_names(module)}
        seconds = self._measure(layer_signature(layer, shape), shape, forms)
        best = min(seconds, key=seconds.__getitem__)
        return Measured(seconds[best], best.rpartition("|")[2])

    def pruned(self, parts_at: Callable[[int], list[tuple[nn.Module, tuple[int, ...]]]], channels: int,
               ladder: Iterable[tuple[int, ...]]) -> dict[tuple[int, ...], Measured]:
        """What keeping k of a chain's ``channels`` (channel pruning, ``datd.channels``) changes in latency, for each
        (k,) of ``ladder``: the seconds of the chain's layers with k channels (``parts_at(k)``: each module with its
        per-sample input shape, timed alone at the batch size like a dense layer) less their seconds with all of
        them (negative: faster). Measured on a grid of k, interpolated between."""
        ladder = list(ladder)
        if not ladder:
            return {}
        full = sum(self.dense(module, shape) for module, shape in parts_at(channels))
        grid = {ranks: Measured(sum(self.dense(module, shape) for module, shape in parts_at(ranks[0])) - full, "pruned")
                for ranks in rank_grid(ladder, self.grid_points)}
        return _interpolate(ladder, grid)

    def save(self) -> None:
        self.cache.save()


def _dense_copy(layer: nn.Module) -> nn.Module:
    """A copy of ``layer``'s structure with a bias (BatchNorm folding gives every conv one)."""
    if isinstance(layer, nn.ReLU):
        return nn.ReLU()
    if isinstance(layer, nn.Conv2d):
        return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                         padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=True,
                         padding_mode=layer.padding_mode)
    return nn.Linear(layer.in_features, layer.out_features, bias=True)


def _interpolate(ladder: list[tuple[int, ...]], grid: dict[tuple[int, ...], Measured]) -> dict[tuple[int, ...], Measured]:
    """Latency of every ladder entry up to the largest grid entry: measured where it was, otherwise linear in
    the rank between the neighbouring grid entries (with the faster neighbour's form)."""
    points = sorted(grid, key=sum)
    sizes = [sum(p) for p in points]
    out: dict[tuple[int, ...], Measured] = {}
    for ranks in ladder:
        x = sum(ranks)
        if ranks in grid:
            out[ranks] = grid[ranks]
            continue
        if x > sizes[-1] or x < sizes[0]:
            continue
        i = next(j for j in range(1, len(sizes)) if sizes[j] >= x)
        a, b = grid[points[i - 1]], grid[points[i]]
        t = (x - sizes[i - 1]) / (sizes[i] - sizes[i - 1])
        out[ranks] = Measured(a.seconds + t * (b.seconds - a.seconds), a.form if a.seconds <= b.seconds else b.form)
    return out
