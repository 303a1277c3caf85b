"""The inference form of a (compressed) model: what runs, is timed and is exported.

Three exact rewrites, none of which changes the function (up to float round-off):

- **BatchNorm folding**: an eval-mode BatchNorm2d whose only input is the output of a Conv2d (called once,
  used only by that BatchNorm) is folded into that conv's weight and bias, and replaced by ``nn.Identity``.
  For a factorized layer that conv is its ``last`` 1×1 (Tucker-2, CP) or second conv (low rank). The pairs
  are found on a ``torch.fx`` trace; a model that cannot be traced keeps its BatchNorms (with a warning).
- **Execution forms**: a factorized layer may run as another, equivalent chain of plain convolutions
  (``forms(module)``): Tucker-2 as written (1×1 → k×k → 1×1, "chain"), with U_S merged into the core
  (k×k S→R_T → 1×1, "merge_in") or with U_T merged into it (1×1 → k×k R_S→T, "merge_out"); CP as written
  ("chain": 1×1 → k×1 → 1×k → 1×1), with its two spatial factors as one depthwise k×k ("depthwise"), or
  with the input and spatial factors as one k×k conv S→R ("merge_in"). Which is fastest depends on the
  shape and the machine, so it is measured (``datd.latency``) and recorded per layer.
- **Memory format**: ``channels_last`` or ``contiguous`` weights (convolutions then produce that layout).

``for_inference(model, forms=…, memory_format=…)`` applies all three to a copy.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from typing import Callable

import torch
import torch.fx
from torch import Tensor, nn

from .graph import conv_batchnorms
from .layers import FACTORIZED_TYPES, CPConv2d, LowRankConv2d, LowRankLinear, Tucker2Conv2d

MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
DEFAULT_FORM = "chain"


# ----------------------------------------------------------------------------------------------------------
# BatchNorm folding


def fold_batchnorms(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every foldable eval-mode BatchNorm2d into the Conv2d feeding it, in place; return the
    (conv, batchnorm) name pairs folded. The model must be in eval mode."""
    if model.training:
        raise ValueError("BatchNorm folding needs a model in eval mode (it uses the running statistics)")
    try:
        pairs = conv_batchnorms(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: leave the BatchNorms alone
        warnings.warn(f"BatchNorm layers are not folded: the model cannot be traced with torch.fx ({exc})", stacklevel=2)
        return []
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:
        _fold(modules[conv_name], modules[bn_name])
    for _, bn_name in pairs:
        _replace(model, bn_name, nn.Identity())
    return pairs


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv ← bn ∘ conv: weight scaled per output channel by γ/√(var+ε), bias (b − μ)·γ/√(var+ε) + β."""
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * scale + shift
    conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))).to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
    else:
        conv.bias.copy_(new_bias)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ----------------------------------------------------------------------------------------------------------
# execution forms of the factorized layers


def _conv_like(template: nn.Conv2d, in_channels: int, out_channels: int, weight: Tensor, bias: Tensor | None,
               groups: int = 1) -> nn.Conv2d:
    """A conv with ``template``'s kernel size, stride, padding, dilation and padding mode, and the given
    channels and parameters."""
    conv = nn.Conv2d(in_channels, out_channels, template.kernel_size, stride=template.stride, padding=template.padding,
                     dilation=template.dilation, groups=groups, bias=bias is not None, padding_mode=template.padding_mode,
                     device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def _bias(conv: nn.Conv2d) -> Tensor | None:
    return None if conv.bias is None else conv.bias.detach()


def _by_group(weight: Tensor, groups: int) -> Tensor:
    """(G·n, …) -> (G, n, …): a grouped conv's weight, one block per group."""
    return weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])


def _tucker2_merge_in(m: Tucker2Conv2d) -> nn.Sequential:
    """k×k conv S→R_T with kernel Σ_b G[a, b] U_S[s, b] (per group), then the 1×1 R_T→T."""
    g = m.groups
    w = torch.einsum("gabij,gbs->gasij", _by_group(m.core.weight, g), _by_group(m.first.weight[:, :, 0, 0], g))
    merged = _conv_like(m.core, m.first.in_channels, m.core.out_channels, w.flatten(0, 1), _bias(m.core), groups=g)
    return nn.Sequential(OrderedDict(first=merged, last=copy.deepcopy(m.last)))


def _tucker2_merge_out(m: Tucker2Conv2d) -> nn.Sequential:
    """The 1×1 S→R_S, then a k×k conv R_S→T with kernel Σ_a U_T[t, a] G[a, b] (per group) and the output bias."""
    g = m.groups
    w = torch.einsum("gta,gabij->gtbij", _by_group(m.last.weight[:, :, 0, 0], g), _by_group(m.core.weight, g))
    merged = _conv_like(m.core, m.core.in_channels, m.last.out_channels, w.flatten(0, 1), _bias(m.last), groups=g)
    return nn.Sequential(OrderedDict(first=copy.deepcopy(m.first), last=merged))


def _cp_spatial_kernel(m: CPConv2d) -> Tensor:
    """(R, 1, kh, kw): the rank-one spatial kernels vertical[r] ⊗ horizontal[r]."""
    return m.vertical.weight * m.horizontal.weight  # (R, 1, kh, 1) * (R, 1, 1, kw)


def _cp_geometry(m: CPConv2d) -> nn.Conv2d:
    """A template conv carrying the original layer's full k×k geometry (recombined from the two spatial
    convs: vertical holds the row geometry, horizontal the column geometry)."""
    v, h = m.vertical, m.horizontal
    if isinstance(v.padding, str):
        padding: str | tuple[int, int] = v.padding
    else:
        padding = (v.padding[0], h.padding[1])
    return nn.Conv2d(1, 1, (v.kernel_size[0], h.kernel_size[1]), stride=(v.stride[0], h.stride[1]), padding=padding,
                     dilation=(v.dilation[0], h.dilation[1]), padding_mode=v.padding_mode, bias=False,
                     device="meta")


def _cp_depthwise(m: CPConv2d) -> nn.Sequential:
    """1×1 S→R, one depthwise k×k conv (the rank-one kernels), 1×1 R→T."""
    rank = m.first.out_channels
    spatial = _conv_like(_cp_geometry(m), rank, rank, _cp_spatial_kernel(m), None, groups=rank)
    return nn.Sequential(OrderedDict(first=copy.deepcopy(m.first), spatial=spatial, last=copy.deepcopy(m.last)))


def _cp_merge_in(m: CPConv2d) -> nn.Sequential:
    """One k×k conv S→R with kernel B[s, r]·C[i, r]·D[j, r] (per group), then the 1×1 R→T."""
    w = m.first.weight[:, :, 0, 0][:, :, None, None] * _cp_spatial_kernel(m)  # (G·R, S/G, kh, kw)
    merged = _conv_like(_cp_geometry(m), m.first.in_channels, m.first.out_channels, w, None, groups=m.groups)
    return nn.Sequential(OrderedDict(first=merged, last=copy.deepcopy(m.last)))


def _as_is(m: nn.Module) -> nn.Module:
    return copy.deepcopy(m)


_FORMS: dict[type, dict[str, Callable[[nn.Module], nn.Module]]] = {
    Tucker2Conv2d: {"chain": _as_is, "merge_in": _tucker2_merge_in, "merge_out": _tucker2_merge_out},
    CPConv2d: {"chain": _as_is, "depthwise": _cp_depthwise, "merge_in": _cp_merge_in},
    LowRankConv2d: {"chain": _as_is},
    LowRankLinear: {"chain": _as_is},
}


def form_names(module: nn.Module) -> tuple[str, ...]:
    """The execution forms of a factorized module (('chain',) for anything without alternatives)."""
    return tuple(_FORMS.get(type(module), {DEFAULT_FORM: _as_is}))


@torch.no_grad()
def as_form(module: nn.Module, form: str) -> nn.Module:
    """A new module computing the same function as the factorized ``module`` in execution ``form``."""
    builders = _FORMS.get(type(module), {DEFAULT_FORM: _as_is})
    if form not in builders:
        raise ValueError(f"{type(module).__name__} has no execution form {form!r} (it has: {', '.join(builders)})")
    return builders[form](module).train(module.training)


# ----------------------------------------------------------------------------------------------------------
# the whole model


def for_inference(model: nn.Module, *, forms: dict[str, str] | None = None, memory_format: str = "contiguous",
                  fold: bool = True) -> nn.Module:
    """A copy of ``model`` in eval mode, with BatchNorms folded (``fold``), each factorized layer in its
    execution form (``forms``: layer name → form; default 'chain') and the weights in ``memory_format``
    ('contiguous' or 'channels_last')."""
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {sorted(MEMORY_FORMATS)}, got {memory_format!r}")
    model = copy.deepcopy(model).eval()
    if fold:
        fold_batchnorms(model)
    factorized = {n: m for n, m in model.named_modules() if isinstance(m, FACTORIZED_TYPES)}
    unknown = set(forms or {}) - set(factorized)
    if unknown:
        raise ValueError(f"forms name layers that are not factorized in this model: {', '.join(sorted(unknown))}")
    for name, module in factorized.items():
        form = (forms or {}).get(name, DEFAULT_FORM)
        if form != DEFAULT_FORM:
            _replace(model, name, as_form(module, form))
    return model.to(memory_format=MEMORY_FORMATS[memory_format])


__all__ = ["MEMORY_FORMATS", "as_form", "fold_batchnorms", "for_inference", "form_names"]
