"""Model surgery: which layers can be compressed, swapping modules, re-applying a saved configuration."""

from __future__ import annotations

from typing import Callable

from torch import nn

from . import layers as factorized
from .layers import SUPPORTED, is_depthwise

LayerFilter = Callable[[nn.Module, str], bool]


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise ValueError(f"layer '{name}' is not in the model") from exc


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` (e.g. 'layer1.0.conv1')."""
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    get_module(model, name)  # raises a clear error for unknown names
    setattr(parent, child, module)


def skip_reason(module: nn.Module, min_params: int) -> str | None:
    """Why ``module`` is not compressed, or None when it can be."""
    if not isinstance(module, SUPPORTED):
        return f"unsupported layer type {type(module).__name__}"
    if isinstance(module, nn.Conv2d):
        if is_depthwise(module):
            return "depthwise convolution (one input channel per group: nothing to factorize)"
    if module.weight.numel() < min_params:
        return f"too small ({module.weight.numel()} weights < {min_params})"
    groups = getattr(module, "groups", 1)
    if min(module.weight.shape[0] // groups, module.weight.shape[1]) < 2:
        return "a single input or output channel (per group) cannot be factorized"
    return None


def candidate_layers(model: nn.Module, filter_fn: LayerFilter | None = None) -> dict[str, nn.Module]:
    """Convolutions of any kind and Linear modules by qualified name that pass ``filter_fn(module, name)``: the
    supported ones (Conv2d/Linear) and those a user may expect to be compressed (transposed, 1-D and 3-D
    convolutions), which ``skip_reason`` names as unsupported so that the report says why they stay."""
    kinds = SUPPORTED + (nn.modules.conv._ConvNd,)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds) and (filter_fn is None or filter_fn(m, n))}


def apply_config(model: nn.Module, config: dict[str, dict]) -> nn.Module:
    """Replace each layer named in ``config`` ({name: {"method", "ranks", "bias"}}) by an empty factorized
    module of that structure, in place; load the compressed state dict afterwards."""
    hint = "is this the architecture the compressed model was made from?"
    for name, entry in config.items():
        try:
            layer = get_module(model, name)
        except ValueError as exc:
            raise ValueError(f"the base model has no layer '{name}': {hint}") from exc
        if not isinstance(layer, SUPPORTED):
            raise ValueError(f"layer '{name}' of the base model is a {type(layer).__name__}, not a Conv2d/Linear: {hint}")
        replace_module(model, name, factorized.build(layer, entry["method"], tuple(entry["ranks"]), entry["bias"]))
    return model
