"""Factorized layers: drop-in replacements for Conv2d / Linear made of plain torch layers.

- ``Tucker2Conv2d``: 1×1 conv S→R_S (U_Sᵀ) → kh×kw conv R_S→R_T (core, original stride/padding/dilation)
  → 1×1 conv R_T→T (U_T, bias).
- ``CPConv2d``: 1×1 conv S→R (Bᵀ) → depthwise kh×1 conv (vertical factor, stride/padding/dilation along
  height) → depthwise 1×kw conv (horizontal factor, along width) → 1×1 conv R→T (A, bias).
- ``LowRankConv2d``: kh×kw conv S→R (original geometry) → 1×1 conv R→T (bias); ``LowRankLinear``:
  Linear S→R → Linear R→T (bias).

Each class builds its structure from an original layer and ranks (``from_conv`` / ``from_linear``), loads
a decomposition's factors (``load_factors``) and counts its parameters and multiply-accumulates exactly
(``cost``), from the original layer's geometry. Modules are ``nn.Sequential`` with named children
(``first``, …, ``last``), so they script, export and print like any torch model.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .decompose import CP, Decomposition, LowRank, Tucker2, parts

SUPPORTED = (nn.Conv2d, nn.Linear)  # the layer types datd collects statistics for and factorizes


@dataclass(frozen=True)
class Geometry:
    """What the cost of a Conv2d/Linear depends on: weight shape (T, S/G, kh, kw) or (T, S), groups, bias,
    input and output spatial size ((rows per sample, 1) for a Linear). ``add_bias``: its factorized
    replacement gets a bias even if the layer has none (bias correction)."""

    weight_shape: tuple[int, ...]
    groups: int
    bias: bool
    input_hw: tuple[int, int]
    output_hw: tuple[int, int]
    add_bias: bool = False
    input_channels: int = 0  # H where the layer's input channels can be pruned (``datd.channels``), else 0
    upstream: "Cost | None" = None  # what one of those channels costs before the layer (its producer, BN, ...)

    @classmethod
    def of(cls, layer: nn.Module, input_hw: tuple[int, int], output_hw: tuple[int, int], add_bias: bool = False) -> "Geometry":
        groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
        return cls(tuple(layer.weight.shape), groups, layer.bias is not None, tuple(input_hw), tuple(output_hw), add_bias)

    @property
    def factorized_bias(self) -> bool:
        return self.bias or self.add_bias

    @property
    def kernel_positions(self) -> int:
        return math.prod(self.weight_shape[2:])

    @property
    def in_positions(self) -> int:
        return self.input_hw[0] * self.input_hw[1]

    @property
    def out_positions(self) -> int:
        return self.output_hw[0] * self.output_hw[1]


@dataclass(frozen=True)
class Cost:
    """What a layer costs: parameters, multiply-accumulates per sample (both exact, from the geometry) and,
    when measured (``datd.latency``), nanoseconds per batch on the run's device (0: not measured)."""

    params: int
    macs: int
    latency: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.params + other.params, self.macs + other.macs, self.latency + other.latency)


def dense_cost(g: Geometry) -> Cost:
    """Parameters and MACs (per sample) of the original Conv2d/Linear."""
    n_weights = math.prod(g.weight_shape)
    return Cost(n_weights + (g.weight_shape[0] if g.bias else 0), n_weights * g.out_positions)


def pruned_cost(g: Geometry, kept: int) -> Cost:
    """Exact cost of the layer reading ``kept`` of its ``g.input_channels`` input channels (``datd.decompose.prune``),
    less what the removed channels cost upstream (``g.upstream`` each: the producer's output channels and the
    per-channel modules between, which are removed with them): the change of the whole model's cost, so it can be
    below zero."""
    if not 1 <= kept <= g.input_channels or g.upstream is None:
        raise ValueError(f"cannot keep {kept} input channels of a layer with {g.input_channels} prunable ones")
    n_out, per_channel = g.weight_shape[0], math.prod(g.weight_shape[1:]) // g.input_channels
    weights = n_out * per_channel * kept
    removed = g.input_channels - kept
    return Cost(weights + (n_out if g.factorized_bias else 0) - removed * g.upstream.params,
                weights * g.out_positions - removed * g.upstream.macs)


def _conv(n_in: int, n_out: int, kernel, conv: nn.Conv2d | None = None, **kwargs) -> nn.Conv2d:
    kwargs.setdefault("bias", False)
    factory = {} if conv is None else {"device": conv.weight.device, "dtype": conv.weight.dtype}
    return nn.Conv2d(n_in, n_out, kernel, **kwargs, **factory)


def _geometry(conv: nn.Conv2d) -> dict:
    return {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "padding_mode": conv.padding_mode}


def is_depthwise(conv: nn.Conv2d) -> bool:
    """One input channel per group: nothing to factorize."""
    return conv.groups > 1 and conv.in_channels // conv.groups == 1


def _check_conv(conv: nn.Module) -> int:
    """The groups of ``conv`` (a Conv2d that is not depthwise)."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected nn.Conv2d, got {type(conv).__name__}")
    if is_depthwise(conv):
        raise ValueError(f"depthwise convolutions (groups={conv.groups}) are not factorized")
    return conv.groups


def _set(module: nn.Module, value: Tensor) -> None:
    with torch.no_grad():
        module.weight.copy_(value.reshape(module.weight.shape))


def _stacked(d: Decomposition, factor: Callable[[Decomposition], Tensor]) -> Tensor:
    """``factor`` of each group's decomposition, concatenated over the first axis (the grouped conv layout)."""
    return torch.cat([factor(p) for p in parts(d)])


class _Factorized(nn.Sequential):
    """Common tail of the factorized modules: the ``last`` layer maps the rank to the output channels. For a
    grouped conv (G groups) every piece is a grouped conv with G groups and the ranks are per group."""

    @property
    def groups(self) -> int:
        return getattr(self.first, "groups", 1)

    def _load_output(self, d: Decomposition, bias: Tensor | None) -> "_Factorized":
        _set(self.last, _stacked(d, lambda p: p.out_factor))
        if bias is not None:
            with torch.no_grad():
                self.last.bias.copy_(bias)
        return self


def _output_cost(g: Geometry, rank: int) -> Cost:
    """The final 1×1 conv / Linear rank → T (G groups of rank → T/G), with its bias."""
    n_out = g.weight_shape[0]
    return Cost(rank * n_out + (n_out if g.factorized_bias else 0), rank * n_out * g.out_positions)


class Tucker2Conv2d(_Factorized):
    kind = "tucker2"

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.core.out_channels // self.groups, self.core.in_channels // self.groups)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: tuple[int, int], bias: bool | None = None) -> "Tucker2Conv2d":
        """Structure for ``conv`` with ranks (R_T, R_S) (per group); ``bias`` defaults to whether ``conv`` has one."""
        g = _check_conv(conv)
        r_out, r_in = ranks
        bias = conv.bias is not None if bias is None else bias
        return cls(OrderedDict(
            first=_conv(conv.in_channels, g * r_in, 1, conv, groups=g),
            core=_conv(g * r_in, g * r_out, conv.kernel_size, conv, groups=g, **_geometry(conv)),
            last=_conv(g * r_out, conv.out_channels, 1, conv, groups=g, bias=bias),
        ))

    def load_factors(self, d: Tucker2, bias: Tensor | None) -> "Tucker2Conv2d":
        _set(self.first, _stacked(d, lambda p: p.in_factor.T))
        _set(self.core, _stacked(d, lambda p: p.core))
        return self._load_output(d, bias)

    @staticmethod
    def cost(g: Geometry, ranks: tuple[int, ...]) -> Cost:
        r_out, r_in = ranks
        n_in, p, groups = g.weight_shape[1], g.kernel_positions, g.groups
        return (
            Cost(groups * n_in * r_in, groups * n_in * r_in * g.in_positions)
            + Cost(groups * r_in * r_out * p, groups * r_in * r_out * p * g.out_positions)
            + _output_cost(g, r_out)
        )


class CPConv2d(_Factorized):
    kind = "cp"

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.first.out_channels // self.groups,)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: tuple[int, ...], bias: bool | None = None) -> "CPConv2d":
        """Structure for ``conv`` with CP rank ``ranks[0]`` (per group); stride, padding and dilation are split
        between the vertical (height) and horizontal (width) depthwise convs."""
        g = _check_conv(conv)
        (rank,) = ranks
        rank *= g
        bias = conv.bias is not None if bias is None else bias
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        if isinstance(conv.padding, str):
            pad_v = pad_h = conv.padding
        else:
            pad_v, pad_h = (conv.padding[0], 0), (0, conv.padding[1])
        mode = conv.padding_mode
        return cls(OrderedDict(
            first=_conv(conv.in_channels, rank, 1, conv, groups=g),
            vertical=_conv(rank, rank, (kh, 1), conv, stride=(sh, 1), padding=pad_v, dilation=(dh, 1), groups=rank,
                           padding_mode=mode),
            horizontal=_conv(rank, rank, (1, kw), conv, stride=(1, sw), padding=pad_h, dilation=(1, dw), groups=rank,
                             padding_mode=mode),
            last=_conv(rank, conv.out_channels, 1, conv, groups=g, bias=bias),
        ))

    def load_factors(self, d: CP, bias: Tensor | None) -> "CPConv2d":
        _set(self.first, _stacked(d, lambda p: p.in_factor.T))
        _set(self.vertical, _stacked(d, lambda p: p.vertical.T))
        _set(self.horizontal, _stacked(d, lambda p: p.horizontal.T))
        return self._load_output(d, bias)

    @staticmethod
    def cost(g: Geometry, ranks: tuple[int, ...]) -> Cost:
        (rank,) = ranks
        _, n_in, kh, kw = g.weight_shape
        spatial = g.groups * rank  # depthwise channels
        mid_positions = g.output_hw[0] * g.input_hw[1]  # after the vertical conv: output height, input width
        return (
            Cost(spatial * n_in, spatial * n_in * g.in_positions)
            + Cost(spatial * kh, spatial * kh * mid_positions)
            + Cost(spatial * kw, spatial * kw * g.out_positions)
            + _output_cost(g, rank)
        )


class LowRankConv2d(_Factorized):
    kind = "svd"

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.first.out_channels // self.groups,)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: tuple[int, ...], bias: bool | None = None) -> "LowRankConv2d":
        g = _check_conv(conv)
        (rank,) = ranks
        bias = conv.bias is not None if bias is None else bias
        return cls(OrderedDict(
            first=_conv(conv.in_channels, g * rank, conv.kernel_size, conv, groups=g, **_geometry(conv)),
            last=_conv(g * rank, conv.out_channels, 1, conv, groups=g, bias=bias),
        ))

    def load_factors(self, d: LowRank, bias: Tensor | None) -> "LowRankConv2d":
        _set(self.first, _stacked(d, lambda p: p.in_factor))
        return self._load_output(d, bias)

    @staticmethod
    def cost(g: Geometry, ranks: tuple[int, ...]) -> Cost:
        (rank,) = ranks
        n_in, p = g.weight_shape[1], g.kernel_positions
        return (
            Cost(g.groups * n_in * p * rank, g.groups * n_in * p * rank * g.out_positions)
            + _output_cost(g, rank)
        )


class LowRankLinear(_Factorized):
    kind = "svd"

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.first.out_features,)

    @classmethod
    def from_linear(cls, linear: nn.Linear, ranks: tuple[int, ...], bias: bool | None = None) -> "LowRankLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        (rank,) = ranks
        bias = linear.bias is not None if bias is None else bias
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        return cls(OrderedDict(
            first=nn.Linear(linear.in_features, rank, bias=False, **factory),
            last=nn.Linear(rank, linear.out_features, bias=bias, **factory),
        ))

    def load_factors(self, d: LowRank, bias: Tensor | None) -> "LowRankLinear":
        _set(self.first, d.in_factor)
        return self._load_output(d, bias)

    cost = LowRankConv2d.cost


FACTORIZED: dict[str, type[nn.Sequential]] = {"tucker2": Tucker2Conv2d, "cp": CPConv2d, "svd": LowRankConv2d}
FACTORIZED_TYPES = (Tucker2Conv2d, CPConv2d, LowRankConv2d, LowRankLinear)


def factorized_class(layer: nn.Module, method: str) -> type[nn.Sequential]:
    """The factorized module class for ``layer`` (Conv2d or Linear) and ``method``."""
    if isinstance(layer, nn.Linear):
        if method != "svd":
            raise ValueError(f"Linear layers are factorized with 'svd', not {method!r}")
        return LowRankLinear
    if method not in FACTORIZED:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(FACTORIZED)}")
    return FACTORIZED[method]


def build(layer: nn.Module, method: str, ranks: tuple[int, ...], bias: bool | None = None) -> nn.Sequential:
    """An (unloaded) factorized replacement of ``layer``."""
    cls = factorized_class(layer, method)
    make = cls.from_linear if isinstance(layer, nn.Linear) else cls.from_conv
    return make(layer, tuple(ranks), bias)


def factorize(layer: nn.Module, decomposition: Decomposition, bias: Tensor | None = None) -> nn.Sequential:
    """The factorized replacement of ``layer`` computing ``decomposition`` (+ ``bias``, default: the
    layer's own bias)."""
    if bias is None and layer.bias is not None:
        bias = layer.bias.detach()
    module = build(layer, decomposition.method, decomposition.ranks, bias is not None)
    return module.load_factors(decomposition, bias)


__all__ = [
    "CPConv2d", "Cost", "Geometry", "LowRankConv2d", "LowRankLinear", "Tucker2Conv2d",
    "build", "dense_cost", "factorize", "factorized_class", "pruned_cost",
]
