"""Layer input statistics: Σ = E[x xᵀ] of the input patches of every Conv2d / Linear.

For a Conv2d with weight (T, S/G, kh, kw) a patch x is one zero-padded (or ``padding_mode``-padded)
im2col column in ``F.unfold`` order (input channel major, then kernel row, then kernel column) at one
strided output position; every output position of every image weighs the same. With ``groups`` = G > 1
the statistics hold one block per group: ``sigma`` is (G, D, D) and ``mean`` (G, D) with D = (S/G)·kh·kw,
block g covering input channels g·S/G … (g+1)·S/G − 1. For a Linear, D = in_features and every row of
the input's leading dimensions is a sample. Sums are accumulated in float64 and streamed: memory is
O(Σ sizes), independent of the number of images. Under torch.distributed the sums are all-reduced.
``collect_stats(positions=F)`` estimates the same moments (without bias) from a drawn fraction F of each
image's positions where that is cheaper (``PositionSampler``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import DatdError, MissingFileError, reading
from .io import atomic_path
from .layers import SUPPORTED
from .patch_moments import (ConvGeometry, add_terms, channel_major, defers_terms, exact_cost, geometry_of,
                             im2col_cost, prefers_shifts, shifted_terms, tap_major, term_elements)

FORMAT = "datd-stats/1"
LayerFilter = Callable[[nn.Module, str], bool]
# Unfolded patches are processed in chunks of at most this many elements (memory bound); each chunk's sums are
# formed in the compute dtype (float32 by default: GEMMs at twice the float64 speed, rounding bounded in tests)
# and accumulated in float64.
_CHUNK_ELEMENTS = 1 << 24
# Per-image work C²·H·W of a conv's channel set from which the shifted path runs its two folds apart
# (``_folds_apart``).
FOLDS_APART = 1 << 22
# Images whose mean patches are gathered before their outer products are added to the pooled sum at once.
_POOLED_ROWS = 512
# Gram products x xᵀ are formed block row by block row, only the blocks on and above the diagonal (``_upper_gram``):
# in about this many block rows, each at least ``_GRAM_BLOCK`` wide. Four rows do 5/8 of the full product's
# multiply-adds; measured on 2 CPU cores (ResNet-50's 1×1 convs, 16 images: 256 to 2048 channels) 1.1-2.6× faster
# than one full product or the 1×1 weight-gradient kernel, more rows no faster (narrower products).
_GRAM_ROWS = 4
_GRAM_BLOCK = 128
# Σ is cross-validated over two halves of the images (datd.shrinkage): one image cannot be split
MIN_CALIBRATION_IMAGES = 2


def patch_dim(weight_shape: Iterable[int]) -> int:
    """D, the length of one input vector of a layer (per group): S·kh·kw for a conv weight (T, S, kh, kw), S for a
    Linear's (T, S); Σ is D×D."""
    return math.prod(tuple(weight_shape)[1:])


def check_calibration_size(images: int) -> None:
    """DatdError unless ``images`` calibration images are enough to estimate (and cross-validate) Σ."""
    if images < MIN_CALIBRATION_IMAGES:
        raise DatdError(f"at least {MIN_CALIBRATION_IMAGES} calibration images are needed (Σ is cross-validated over "
                        f"two halves of them; hundreds are recommended), got {images}")


@dataclass
class LayerStats:
    """Input statistics of one layer.

    sigma: (D, D) float64 uncentered second moment (or (G, D, D) for grouped convs);
    mean: (D,) float64 (or (G, D)); count: number of patch vectors averaged (per group);
    input_hw / output_hw: spatial size of the layer input / output ((rows per sample, 1) for a Linear),
    used to count MACs;
    sigma_pooled: E[x̄ x̄ᵀ] over calls (images) of the mean patch x̄ of one call, averaged over its output
    positions (rows for a Linear), same layout as ``sigma``: the part of Σ that moves all positions of an image
    together (what a global pooling after the layer sees); None where every image had one position (it is
    ``sigma`` then) and in files written before it existed.
    sigma_half / mean_half / count_half: the same moments over the even-numbered images only (one fold of a
    two-fold split by image, for cross-validating how far Σ can be trusted: ``datd.shrinkage``); None in files
    written before they existed.
    """

    kind: str
    weight_shape: tuple[int, ...]
    groups: int
    sigma: Tensor
    mean: Tensor
    count: int
    input_hw: tuple[int, int]
    output_hw: tuple[int, int]
    sigma_pooled: Tensor | None = None
    sigma_half: Tensor | None = None
    mean_half: Tensor | None = None
    count_half: int = 0

    def covariance(self) -> Tensor:
        """Σ − μμᵀ, the centered second moment (same layout as ``sigma``)."""
        return self.sigma - self.mean[..., :, None] * self.mean[..., None, :]

    def meta(self) -> dict:
        return {
            "kind": self.kind, "weight_shape": list(self.weight_shape), "groups": self.groups,
            "count": self.count, "input_hw": list(self.input_hw), "output_hw": list(self.output_hw),
            "count_half": self.count_half,
        }


class Statistics(dict[str, LayerStats]):
    """Layer name -> LayerStats, with the provenance needed to reuse it on another run."""

    def __init__(self, layers: dict[str, LayerStats], num_images: int, description: str = ""):
        super().__init__(layers)
        self.num_images = num_images
        self.description = description

    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (float64 tensors ``<layer>.sigma`` / ``<layer>.mean``) whose
        metadata holds JSON: format, layer names, weight shapes, counts, number of images, description."""
        meta = {
            "format": FORMAT, "num_images": self.num_images, "description": self.description,
            "layers": {name: s.meta() for name, s in self.items()},
        }
        tensors = {}
        for name, s in self.items():
            tensors[f"{name}.sigma"] = s.sigma.detach().cpu().contiguous()
            tensors[f"{name}.mean"] = s.mean.detach().cpu().contiguous()
            for key in ("sigma_pooled", "sigma_half", "mean_half"):
                if getattr(s, key) is not None:
                    tensors[f"{name}.{key}"] = getattr(s, key).detach().cpu().contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"datd": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> "Statistics":
        """Read a file written by ``save`` (every shape, count and value checked: DatdError otherwise); with
        ``model``, check that every layer exists there with the same kind and weight shape (DatdError naming
        the first mismatching layer)."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"statistics file not found: {path}")
        with reading(f"statistics from {path}"), safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("datd")
            meta = json.loads(raw) if raw else None
            if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("layers"), dict):
                raise DatdError(f"{path} is not a datd statistics file (format {FORMAT})")
            keys = set(f.keys())
            layers = {}
            for name, m in meta["layers"].items():
                tensors = {key: f.get_tensor(f"{name}.{key}") if f"{name}.{key}" in keys else None
                           for key in ("sigma", "mean", "sigma_pooled", "sigma_half", "mean_half")}
                layers[name] = _checked_layer(name, m, tensors, path)
            num_images = meta.get("num_images")
            if not isinstance(num_images, int) or num_images < 1:
                raise DatdError(f"{path}: num_images must be a positive integer")
            stats = cls(layers, num_images, str(meta.get("description", "")))
        if model is not None:
            stats.check(model)
        return stats

    def check(self, model: nn.Module, required: Iterable[str] = ()) -> None:
        """Raise ValueError naming the first layer that is missing from ``model`` or differs in kind/shape, or
        the first of the ``required`` layers that has no statistics."""
        modules = dict(model.named_modules())
        for name, s in self.items():
            module = modules.get(name)
            if module is None:
                raise DatdError(f"statistics do not match the model: layer '{name}' is not in the model")
            kind = _kind(module)
            shape = tuple(module.weight.shape) if kind else None
            if kind != s.kind or shape != s.weight_shape:
                raise DatdError(
                    f"statistics do not match the model at layer '{name}': statistics were collected for "
                    f"{s.kind} {s.weight_shape}, the model has {kind or type(module).__name__} {shape}"
                )
        missing = [n for n in required if n not in self]
        if missing:
            raise DatdError(f"statistics do not match the model: no statistics for layer '{missing[0]}'"
                            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''} (collect them for this "
                            "model, or leave those layers out with filter_fn)")


def _gram_edges(dim: int, unit: int = 1) -> list[tuple[int, int]]:
    """Block rows [start, stop) of a (dim × dim) Gram matrix for ``_upper_gram``: about ``_GRAM_ROWS`` of them, at
    least ``_GRAM_BLOCK`` wide, on multiples of ``unit`` (a conv's channels per tap, so that each tap-major block
    (p, p') with p ≤ p' is formed whole)."""
    if dim < 2 * _GRAM_BLOCK:
        return [(0, dim)]
    width = max(_GRAM_BLOCK, -(-dim // _GRAM_ROWS))
    width = -(-width // unit) * unit
    return [(start, min(start + width, dim)) for start in range(0, dim, width)]


def _upper_gram(rows: Tensor, edges: list[tuple[int, int]]) -> Tensor:
    """Σ_m rows[…, m, :]ᵀ rows[…, m, :] of ``rows`` (…, M, D), its block rows ``edges`` formed on and right of the
    diagonal only (…, D, D): the blocks left of it are zero (the matrix is symmetric; ``_symmetric``)."""
    out = rows.new_zeros(*rows.shape[:-2], rows.shape[-1], rows.shape[-1])
    for start, stop in edges:
        out[..., start:stop, start:] = rows[..., start:stop].transpose(-1, -2) @ rows[..., start:]
    return out


def _symmetric(upper: Tensor) -> Tensor:
    """The symmetric matrices (…, D, D) whose upper triangles (diagonal included) are those of ``upper``."""
    return upper.triu() + upper.triu(1).transpose(-1, -2)


def _checked_layer(name: str, m: object, tensors: dict[str, Tensor | None], path: Path) -> LayerStats:
    """One layer of a statistics file, its metadata and tensors checked against each other."""
    def bad(what: str) -> DatdError:
        return DatdError(f"{path}: layer '{name}': {what}")

    def ints(value: object, n: int | None = None) -> tuple[int, ...]:
        if not isinstance(value, list) or not all(isinstance(v, int) and v >= 1 for v in value) \
                or (n is not None and len(value) != n):
            raise bad(f"expected {n or 'some'} positive integers, got {value!r}")
        return tuple(value)

    if not isinstance(m, dict) or m.get("kind") not in ("conv2d", "linear"):
        raise bad("kind must be 'conv2d' or 'linear'")
    weight_shape = ints(m.get("weight_shape"), 4 if m["kind"] == "conv2d" else 2)
    groups, count, count_half = m.get("groups"), m.get("count"), m.get("count_half", 0)
    if not (isinstance(groups, int) and groups >= 1 and isinstance(count, int) and count >= 1
            and isinstance(count_half, int) and 0 <= count_half <= count):
        raise bad("groups and count must be positive integers, count_half in [0, count]")
    d = patch_dim(weight_shape)
    lead = (groups,) if groups > 1 else ()
    shapes = {"sigma": lead + (d, d), "mean": lead + (d,), "sigma_pooled": lead + (d, d), "sigma_half": lead + (d, d),
              "mean_half": lead + (d,)}
    for key, shape in shapes.items():
        t = tensors[key]
        if t is None:
            if key in ("sigma", "mean"):
                raise bad(f"no tensor '{name}.{key}'")
            continue
        if tuple(t.shape) != shape or t.dtype != torch.float64:
            raise bad(f"'{key}' is {t.dtype} {tuple(t.shape)}, expected float64 {shape}")
        if not torch.isfinite(t).all():
            raise bad(f"'{key}' holds NaN or Inf")
    if (tensors["sigma_half"] is None) != (tensors["mean_half"] is None):
        raise bad("sigma_half and mean_half come together")
    return LayerStats(
        kind=m["kind"], weight_shape=weight_shape, groups=groups, sigma=tensors["sigma"], mean=tensors["mean"],  # type: ignore[arg-type]
        count=count, input_hw=ints(m.get("input_hw"), 2), output_hw=ints(m.get("output_hw"), 2),  # type: ignore[arg-type]
        count_half=count_half, sigma_pooled=tensors["sigma_pooled"], sigma_half=tensors["sigma_half"],
        mean_half=tensors["mean_half"],
    )


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def select_layers(model: nn.Module, layers: Iterable[str] | LayerFilter | None = None) -> dict[str, nn.Module]:
    """The Conv2d/Linear modules of ``model`` by qualified name: all of them, the named subset (unknown or
    unsupported names raise), or those for which ``layers(module, name)`` is true."""
    supported = {n: m for n, m in model.named_modules() if isinstance(m, SUPPORTED)}
    if layers is None:
        return supported
    if callable(layers):
        return {n: m for n, m in supported.items() if layers(m, n)}
    chosen = {}
    modules = dict(model.named_modules())
    for name in layers:
        if name not in modules:
            raise DatdError(f"layer '{name}' is not in the model")
        if name not in supported:
            raise DatdError(f"layer '{name}' is a {type(modules[name]).__name__}; only Conv2d and Linear are supported")
        chosen[name] = supported[name]
    return chosen


def conv_pad(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """F.pad amounts (left, right, top, bottom) that reproduce ``conv``'s padding (ints, tuples, 'same',
    'valid'); 'same' splits odd totals with the extra pixel right/bottom as PyTorch does."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        amounts = []
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size)):
            total = d * (k - 1)
            amounts += [total // 2, total - total // 2]
        return tuple(amounts)  # type: ignore[return-value]
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def conv_padded(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``x`` (N, S, H, W) padded as ``conv`` pads it (amount and mode): what its kernel slides over unpadded."""
    pad = conv_pad(conv)
    if not any(pad):
        return x
    return F.pad(x, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)


def conv_patches(conv: nn.Conv2d, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """im2col patches of ``x`` (N, S, H, W) as seen by ``conv``: (N, G, D, L) with L = Ho·Wo, and (Ho, Wo)."""
    x = conv_padded(conv, x)
    if tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) == (1, 1):  # the columns are the input itself
        return x.reshape(x.shape[0], conv.groups, -1, x.shape[2] * x.shape[3]), (x.shape[2], x.shape[3])
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # (N, S·P, L)
    n, _, positions = cols.shape
    out_h = (x.shape[2] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
    return cols.reshape(n, conv.groups, -1, positions), (out_h, positions // out_h)


def check_positions(fraction: float) -> float:
    """The fraction of each conv's positions the statistics use (``collect_stats(positions=…)``), checked."""
    if not 0 < fraction <= 1:
        raise DatdError(f"positions must be a fraction in (0, 1], got {fraction}")
    return fraction


def _shifted_path(conv: nn.Conv2d, geometry: ConvGeometry) -> bool:
    """Whether the exact statistics of ``conv`` on inputs of ``geometry`` come from shifted cross-correlations
    (``datd.patch_moments``: zero padding, where ``prefers_shifts``) rather than im2col columns."""
    return conv.padding_mode == "zeros" and prefers_shifts(geometry, conv.in_channels // conv.groups)


class PositionSampler:
    """Unbiased spatial subsampling of a conv's patch positions (``collect_stats(positions=F)``): each image
    contributes ``keep(L)`` of its L output positions, drawn uniformly without replacement and independently per
    image and call from a seeded generator, in the layers where the products of those columns cost less than the
    exact computation (``datd.patch_moments.exact_cost``; the shifted path's cost grows with 15·C² per position,
    the drawn columns' with 81·C² per drawn one: drawing pays below about a fifth of a 3×3 conv's positions).
    Σ and μ estimate the full-position moments without bias (every position is equally likely to be drawn); the
    pooled moment Σ̄ of per-image mean patches is that of the drawn positions, larger by the sampling variance of
    a mean of m draws (at most 1/m of the within-image covariance, m ≥ ``MIN_POSITIONS``). Feature maps of at
    most ``MIN_POSITIONS`` positions are kept whole."""

    MIN_POSITIONS = 64

    def __init__(self, fraction: float, seed: int, device: torch.device):
        self.fraction = check_positions(fraction)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def keep(self, positions: int) -> int:
        """Positions drawn per image from a map of ``positions``."""
        return min(positions, max(math.ceil(self.fraction * positions), self.MIN_POSITIONS))

    def patches(self, conv: nn.Conv2d, x: Tensor, keep: int) -> Tensor:
        """``keep`` im2col columns of each image of ``x`` (N, S, H, W) at random output positions: (N, G, D, keep),
        the columns ``conv_patches`` would give there."""
        x = conv_padded(conv, x)
        n, channels, height, width = x.shape
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        out_h, out_w = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
        drawn = torch.rand(n, out_h * out_w, generator=self.generator, device=x.device).argsort(dim=1)[:, :keep]
        rows = (drawn // out_w * sh)[:, None, None, :] + (torch.arange(kh, device=x.device) * dh)[:, None, None]
        cols = (drawn % out_w * sw)[:, None, None, :] + (torch.arange(kw, device=x.device) * dw)[None, :, None]
        index = (rows * width + cols).reshape(n, 1, kh * kw * keep).expand(n, channels, -1)  # (N, S, taps·keep)
        patches = x.reshape(n, channels, height * width).gather(2, index)
        return patches.view(n, conv.groups, channels // conv.groups * kh * kw, keep)


class _Accumulator:
    """Streaming float64 sums of x xᵀ and x for one layer, per fold ([0]: the even-numbered images or samples,
    [1]: the others). A conv's sums are kept in tap-major order ((tap, channel), ``datd.patch_moments``), where
    only the blocks p ≤ p' of x xᵀ need to be complete; ``result`` turns them into ``F.unfold`` order."""

    def __init__(self, name: str, module: nn.Module, device: torch.device, compute: torch.dtype = torch.float32,
                 sampler: "PositionSampler | None" = None):
        self.name, self.module, self.device, self.compute = name, module, device, compute
        self.sampler = sampler
        self.kind = _kind(module)
        self.groups = module.groups if self.kind == "conv2d" else 1
        self.taps = math.prod(module.kernel_size) if self.kind == "conv2d" else 1
        dim = patch_dim(module.weight.shape)
        self.sum_outer = torch.zeros(2, self.groups, dim, dim, dtype=torch.float64, device=device)
        self.sum = torch.zeros(2, self.groups, dim, dtype=torch.float64, device=device)
        self.sum_pooled: Tensor | None = None  # while every call had one position per sample, it equals Σ of sum_outer
        self.counts = [0, 0]
        self.calls = 0  # images (one per sample of each call) behind sum_pooled
        self.pending: list[Tensor] = []  # mean patches (G, N, D) not yet added to sum_pooled
        self.images = 0  # images (samples) seen: the parity of the next one decides its fold
        self.terms: Tensor | None = None  # (folds, …) float64 sums of the shifted path's terms, not yet in sum_outer
        self.terms_geometry: ConvGeometry | None = None
        self.input_hw = self.output_hw = (0, 0)

    @property
    def count(self) -> int:
        return self.counts[0] + self.counts[1]

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().to(device=self.device, dtype=self.compute)
        if self.kind == "conv2d":
            if x.dim() == 3:
                x = x.unsqueeze(0)
            geometry = geometry_of(module, conv_pad(module), (x.shape[2], x.shape[3]))
            if geometry != self.terms_geometry:
                self.flush()
            self.input_hw, self.output_hw = geometry.input_hw, geometry.output_hw
            positions, channels = math.prod(geometry.output_hw), x.shape[1] // module.groups
            shifts = _shifted_path(module, geometry)
            keep = positions if self.sampler is None else self.sampler.keep(positions)
            if keep < positions and im2col_cost(geometry, channels, keep) < exact_cost(
                    geometry, channels, module.padding_mode == "zeros"):
                shifts = False  # drawn positions: fewer products than the exact path's
            else:
                keep = positions
            # elements per image of a chunk's largest temporary (a bound: kh·kw times the input for im2col; smaller
            # chunks keep the unfolded copy in cache)
            per_image = x[0].numel() * (2 if shifts else self.taps) if keep == positions \
                else x[0].numel() + x.shape[1] * self.taps * keep
            step = max(1, _CHUNK_ELEMENTS // per_image)
            for start in range(0, x.shape[0], step):
                self._add_conv(self._split(x[start:start + step]), geometry if shifts else None, keep)
        else:
            dim = x.shape[-1]
            self.input_hw = self.output_hw = (x[0].numel() // dim if x.dim() > 1 else 1, 1)
            per_sample = x.reshape(x.shape[0], -1, dim) if x.dim() > 1 else x[None, None]
            self._pool_from(per_sample.shape[1])
            self._add_pooled(per_sample.mean(dim=1)[None])
            step, edges = max(1, _CHUNK_ELEMENTS // dim), _gram_edges(dim)
            for fold, part in enumerate(self._split(per_sample)):
                rows = part.reshape(-1, dim)
                for start in range(0, rows.shape[0], step):
                    chunk = rows[start:start + step]
                    total = chunk.sum(dim=0)
                    self._check(total)
                    self.sum_outer[fold, 0] += _upper_gram(chunk, edges)
                    self._add(fold, total, chunk.shape[0])

    def _check(self, sums: Tensor) -> None:
        """Refuse non-finite inputs, seen in sums over them (a NaN/Inf input makes its sums NaN or Inf)."""
        if not torch.isfinite(sums).all():
            raise DatdError(f"non-finite input to layer '{self.name}': the calibration data or model produce NaN/Inf")

    def _add(self, fold: int, total: Tensor, count: int) -> None:
        self.sum[fold] += total.double()
        self.counts[fold] += count

    def _blocks(self, matrix: Tensor) -> Tensor:
        """The (…, taps, C, taps, C) view of tap-major (…, D, D) sums."""
        *lead, d, _ = matrix.shape
        return matrix.view(*lead, self.taps, d // self.taps, self.taps, d // self.taps)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The next images (samples) ``x`` by fold: the even-numbered ones (counted over all calls), the others."""
        first = self.images % 2  # index in x of its first even-numbered image
        self.images += x.shape[0]
        return x[first::2], x[1 - first::2]

    def flush(self) -> None:
        """Add the shifted path's term sums to the blocks of sum_outer (a linear map in float64: how often this
        happens does not change the result beyond float64 rounding)."""
        if self.terms is not None:
            for fold in (0, 1):
                add_terms(self.terms[fold], self.terms_geometry, self._blocks(self.sum_outer[fold]))
        self.terms, self.terms_geometry = None, None

    def _add_conv(self, parts: tuple[Tensor, Tensor], geometry: ConvGeometry | None, positions: int) -> None:
        """parts: (N, S, H, W) inputs of each fold in the compute dtype; their patch moments from shifted
        cross-correlations (``datd.patch_moments``, every group in the same calls; the two folds in one call each,
        or as two more sets of one call where the products are small: ``_folds_apart``) when ``geometry`` is given,
        else from im2col columns: all of them, or ``positions`` per image drawn by the sampler."""
        self._pool_from(positions)
        sums_of: list[Tensor | None] = [None, None]  # each fold's per-image patch sums (G, n, D), tap-major
        if geometry is not None and self._folds_apart(geometry, parts[0].shape[1] // self.groups):
            for fold, part in enumerate(parts):
                if part.shape[0]:
                    terms, per_image = shifted_terms(part, geometry, sets=self.groups)  # per_image: (n, taps, G, C)
                    self._add_terms(fold, terms, geometry)
                    sums_of[fold] = per_image.permute(2, 0, 1, 3).reshape(self.groups, part.shape[0], -1)
        elif geometry is not None:
            n = max(p.shape[0] for p in parts)
            stacked = torch.cat([p if p.shape[0] == n else F.pad(p, (0, 0, 0, 0, 0, 0, 0, n - p.shape[0]))
                                 for p in parts], dim=1)  # (n, folds·S, H, W): an absent image is zeros
            terms, per_image = shifted_terms(stacked, geometry, sets=2 * self.groups)  # per_image: (n, taps, 2G, C)
            for fold, fold_terms in enumerate(terms.view(terms.shape[0], 2, -1).unbind(1)):
                self._add_terms(fold, fold_terms, geometry)
            per_image = per_image.permute(2, 0, 1, 3).reshape(2, self.groups, n, -1)  # (folds, G, n, D)
            sums_of = [per_image[fold, :, :part.shape[0]] for fold, part in enumerate(parts)]
        for fold, part in enumerate(parts):
            if part.shape[0] == 0:
                continue
            sums = sums_of[fold]
            if geometry is None:
                cols = conv_patches(self.module, part)[0] if positions == math.prod(self.output_hw) \
                    else self.sampler.patches(self.module, part, positions)  # type: ignore[union-attr]
                outer, sums = self._im2col_moments(cols)
                self._blocks(self.sum_outer[fold]).add_(outer)
            assert sums is not None
            total = sums.sum(dim=1)
            self._check(total)
            self._add(fold, total, part.shape[0] * positions)
            self._add_pooled(sums / positions)

    @staticmethod
    def _folds_apart(geometry: ConvGeometry, channels: int) -> bool:
        """Whether the shifted path correlates the two folds in a call each rather than as two sets of one grouped
        call: where a set's C²·H·W (per image) reaches ``FOLDS_APART``. oneDNN's weight-gradient kernels run those
        5–15 % faster apart (measured on 2 CPU cores, 64 images: ResNet-18's 3×3 convs, whose C²·H·W is 2^23.6 at
        every stage; 256 channels at stride 2 the exception, 9 % slower), and no stacked copy of the input is
        made; on the CIFAR ResNets' small products (2^18) the one call is up to 15 % faster (per-call overhead)."""
        return channels * channels * math.prod(geometry.input_hw) >= FOLDS_APART

    def _add_terms(self, fold: int, terms: Tensor, geometry: ConvGeometry) -> None:
        """Add one fold's shifted-path terms (``shifted_terms``) to its blocks now, or to their float64 sums, which
        ``flush`` turns into blocks once (``defers_terms``: where the terms are fewer than the blocks)."""
        if not defers_terms(geometry, self.module.in_channels // self.groups):
            add_terms(terms, geometry, self._blocks(self.sum_outer[fold]))
            return
        if self.terms is None:
            self.terms, self.terms_geometry = terms.new_zeros((2,) + terms.shape, dtype=torch.float64), geometry
        self.terms[fold].add_(terms)

    def _im2col_moments(self, cols: Tensor) -> tuple[Tensor, Tensor]:
        """Σ x xᵀ (G, taps, C, taps, C) and each image's patch sum (G, N, D), tap-major, of im2col columns
        (N, G, D, L), D channel-major. Of Σ x xᵀ only the blocks that ``_upper_gram`` forms are filled, the tap
        blocks p ≤ p' among them (a 1×1 conv's: its upper triangle; ``_unfold_order`` completes either)."""
        n, groups, dim, positions = cols.shape
        channels = dim // self.taps
        edges = _gram_edges(dim, channels)
        reorder = self.taps > 1 and len(edges) > 1  # block rows on tap boundaries: tap-major columns (a copy)
        if reorder:
            cols = cols.view(n, groups, channels, self.taps, positions).transpose(2, 3).reshape(cols.shape)
        if positions >= dim:  # per-image products avoid a transposed copy of the patches
            outer = _upper_gram(cols.transpose(2, 3), edges).sum(dim=0)
        else:
            outer = _upper_gram(cols.permute(1, 0, 3, 2).reshape(groups, n * positions, dim), edges)
        sums = cols.sum(dim=3).transpose(0, 1)  # (G, N, D)
        if self.taps == 1 or reorder:
            return self._blocks(outer), sums
        sums = sums.reshape(groups, n, channels, self.taps).transpose(2, 3).reshape(groups, n, dim)
        return tap_major(outer, self.taps), sums

    def _pool_from(self, positions: int) -> None:
        """Call before adding a call's patches: from the first call with more than one position per image on,
        sum_pooled is kept apart (until then it equals the sum of both folds and is not stored)."""
        if positions > 1 and self.sum_pooled is None:
            self.sum_pooled = self.sum_outer.sum(dim=0)

    def _add_pooled(self, pooled: Tensor) -> None:
        """Add each image's mean patch (G, N, D). They are gathered until ``_POOLED_ROWS`` images are waiting and then
        added as one product (one pass over the D×D sum per batch of images, not per call)."""
        if self.sum_pooled is not None:
            self.pending.append(pooled)
            if sum(p.shape[1] for p in self.pending) >= _POOLED_ROWS:
                self._flush_pooled()
        self.calls += pooled.shape[1]

    def _flush_pooled(self) -> None:
        if self.pending and self.sum_pooled is not None:
            # in float64: products of float32 values are exact there, so the sum does not depend on how the
            # images were grouped into flushes (one process or several, any batch size) beyond float64 rounding
            means = torch.cat(self.pending, dim=1).double()
            self.sum_pooled += means.transpose(1, 2) @ means
        self.pending = []

    def _unfold_order(self, sums: Tensor) -> Tensor:
        """Tap-major x xᵀ sums (G, D, D) whose tap blocks p ≤ p' are complete (a single tap: its upper triangle) as
        the symmetric matrices in ``F.unfold`` order (new tensors)."""
        return _symmetric(sums) if self.taps == 1 else channel_major(self._blocks(sums))

    def result(self) -> LayerStats:
        """The layer's statistics (once: the sums are released as they become the moments)."""
        self.flush()
        if self.count == 0:
            raise DatdError(f"layer '{self.name}' was never called during the calibration forward passes")
        half = max(self.counts[0], 1)
        sums, self.sum_outer = self.sum_outer, None  # type: ignore[assignment]
        if not torch.isfinite(sums.diagonal(dim1=-2, dim2=-1)).all():  # products that overflowed (huge inputs)
            raise DatdError(f"non-finite input statistics for layer '{self.name}': the calibration data or model "
                            "produce values too large to square")
        sigma = self._unfold_order(sums[1].add_(sums[0])).div_(self.count)  # (a view of fold 1 for a single tap)
        sigma_half = self._unfold_order(sums[0]).div_(half)
        del sums
        means = self.sum.view(2, self.groups, self.taps, -1).transpose(2, 3).reshape(2, self.groups, -1)
        mean_half, mean = means[0] / half, (means[0] + means[1]) / self.count
        pooled = None  # one position per image: Σ itself
        self._flush_pooled()
        if self.sum_pooled is not None:
            pooled, self.sum_pooled = self._unfold_order(self.sum_pooled).div_(self.calls), None
        if self.groups == 1:
            sigma, mean, pooled = sigma[0], mean[0], None if pooled is None else pooled[0]
            sigma_half, mean_half = sigma_half[0], mean_half[0]
        return LayerStats(
            kind=self.kind, weight_shape=tuple(self.module.weight.shape), groups=self.groups, sigma=sigma, mean=mean,
            count=self.count, input_hw=self.input_hw, output_hw=self.output_hw, sigma_pooled=pooled,
            sigma_half=sigma_half, mean_half=mean_half, count_half=self.counts[0],
        )

    def all_reduce(self) -> None:
        self.flush()
        self._flush_pooled()
        pooled = torch.tensor([float(self.sum_pooled is not None)], device=self.sum.device)
        dist.all_reduce(pooled, op=dist.ReduceOp.MAX)
        if pooled.item() and self.sum_pooled is None:  # another rank saw several positions per image
            self.sum_pooled = self.sum_outer.sum(dim=0)
        counts = torch.tensor([float(self.counts[0]), float(self.counts[1]), float(self.calls)], dtype=torch.float64,
                              device=self.sum.device)
        for t in ((self.sum_outer, self.sum, counts) + ((self.sum_pooled,) if self.sum_pooled is not None else ())):
            dist.all_reduce(t)
        self.counts[0], self.counts[1], self.calls = (int(c) for c in counts.tolist())


def batch_inputs(batch: Tensor | tuple | list | dict) -> Tensor:
    """The input tensor of a calibration batch: a tensor, the first item of (input, label, …), or a
    dict's 'input'/'image'/'x' entry."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("input", "image", "x"):
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    raise TypeError(f"cannot find the input tensor in a calibration batch of type {type(batch).__name__}")


@torch.no_grad()
def sums_bytes(model: nn.Module, example: Tensor, layers: Iterable[str] | LayerFilter | None = None) -> dict[str, int]:
    """Bytes of the float64 sums ``collect_stats`` keeps for each layer (Σ of all images, of the even-image fold,
    and the pooled part where a call has several positions, plus the means), from one forward pass of
    ``example`` (its first sample), and for convs on the shifted path the float64 sums of their terms
    (``datd.patch_moments.shifted_terms``). The whole pass needs these, the forward pass and one chunk of patch
    products (≤ 2^24 elements in the compute dtype) at a time."""
    chosen = select_layers(model, layers)
    sizes: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0]
            groups = module.groups if isinstance(module, nn.Conv2d) else 1
            dim = patch_dim(module.weight.shape)
            terms = 0
            if isinstance(module, nn.Conv2d):
                positions = conv_patches(module, x[:1])[0].shape[-1]
                geometry = geometry_of(module, conv_pad(module), (x.shape[-2], x.shape[-1]))
                channels = module.in_channels // groups
                if _shifted_path(module, geometry) and defers_terms(geometry, channels):
                    terms = term_elements(geometry, channels, 2 * groups)
            else:
                positions = x[:1].numel() // x.shape[-1]
            matrices = 3 if positions > 1 else 2
            sizes[name] = 8 * (groups * (matrices * dim * dim + 2 * dim) + terms)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in chosen.items()]
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in handles:
            h.remove()
    return sizes


def collect_stats(
    model: nn.Module,
    batches: Iterable,
    layers: Iterable[str] | LayerFilter | None = None,
    *,
    device: str | torch.device | None = None,
    description: str = "",
    progress: bool = True,
    uncalled: str = "raise",
    precision: str = "float32",
    positions: float = 1.0,
    seed: int = 0,
) -> Statistics:
    """Run ``model`` (in eval mode) on ``batches`` (a DataLoader or any iterable of input tensors or
    (input, label) pairs) and return the input statistics of every Conv2d/Linear (or the chosen
    ``layers``: names or a ``filter(module, name)``). ``device`` defaults to the model's device. A layer
    called several times per forward pass has its statistics pooled over the calls; one never called
    raises a ValueError naming it (``uncalled='raise'``) or is left out (``uncalled='skip'``). ``precision``:
    the dtype in which each chunk's patch products are formed ('float32', or 'float64' for a reference); the
    sums over chunks are float64 either way. ``positions`` < 1: each image contributes only that fraction of
    each conv's output positions (at least ``PositionSampler.MIN_POSITIONS``), drawn at random with ``seed``
    (``PositionSampler``: unbiased, for calibration sets so large that all positions are not worth their cost;
    under torchrun each rank draws from its own seed, so the result is not the single-process one)."""
    check_uncalled(uncalled)
    with StatsCollector(model, layers, device=device, description=description, precision=precision,
                        positions=positions, seed=seed) as collector:
        total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
        for batch in tqdm(batches, total=total, desc="statistics", unit="batch", disable=not progress, leave=False):
            x = batch_inputs(batch).to(collector.device)
            with torch.no_grad():
                model(x)
            collector.counted(x.shape[0])
    return collector.result(uncalled)


def check_uncalled(uncalled: str) -> None:
    if uncalled not in ("raise", "skip"):
        raise DatdError(f"uncalled must be 'raise' or 'skip', got {uncalled!r}")


class StatsCollector:
    """``collect_stats`` for a caller that runs the forward passes itself (``datd.calibration``: the statistics
    and the sensitivities in one pass): within ``with``, every forward pass of ``model`` adds its inputs to the
    sums (in eval mode); ``counted(n)`` after each batch of n images, ``result()`` after the last."""

    def __init__(self, model: nn.Module, layers: Iterable[str] | LayerFilter | None = None, *,
                 device: str | torch.device | None = None, description: str = "", precision: str = "float32",
                 positions: float = 1.0, seed: int = 0):
        if precision not in ("float32", "float64"):
            raise DatdError(f"precision must be 'float32' or 'float64', got {precision!r}")
        self.model, self.chosen = model, select_layers(model, layers)
        if not self.chosen:
            raise DatdError("no Conv2d or Linear layer selected")
        self.device = torch.device(device if device is not None else next(model.parameters()).device)
        compute = torch.float32 if precision == "float32" else torch.float64
        sampler = None
        if positions != 1:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            sampler = PositionSampler(positions, seed + 7919 * rank, self.device)
            description = f"{description}; {positions:g} of each conv's positions drawn (seed {seed})".lstrip("; ")
        self.description = description
        self.accumulators = {name: _Accumulator(name, module, self.device, compute, sampler)
                             for name, module in self.chosen.items()}
        self.num_images = 0
        self._handles: list = []
        self._was_training = model.training

    def __enter__(self) -> "StatsCollector":
        self._was_training = self.model.training
        self.model.eval()
        self._handles = [m.register_forward_pre_hook(self.accumulators[n]) for n, m in self.chosen.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.model.train(self._was_training)

    def counted(self, images: int) -> None:
        """Count the images of the forward pass just run."""
        self.num_images += images

    def result(self, uncalled: str = "raise") -> Statistics:
        """The statistics (all-reduced over the ranks under torch.distributed). A layer never called raises a
        DatdError naming it (``uncalled='raise'``) or is left out (``'skip'``)."""
        check_uncalled(uncalled)
        num_images = self.num_images
        if num_images == 0:
            raise DatdError("the calibration data yielded no batches")
        if dist.is_available() and dist.is_initialized():
            total_images = torch.tensor([float(num_images)], dtype=torch.float64, device=self.device)
            dist.all_reduce(total_images)
            num_images = int(total_images.item())
            for acc in self.accumulators.values():
                acc.all_reduce()
        return Statistics({n: a.result() for n, a in self.accumulators.items() if a.count or uncalled == "raise"},
                          num_images, self.description)
