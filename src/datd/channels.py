"""Channel pruning: which channels a model can lose, what each costs, and removing them.

A *chain* is a producer layer P (Conv2d or Linear, ungrouped) whose output reaches one consumer layer Q (Conv2d,
ungrouped, or Linear) through channel-wise operations only — BatchNorm, element-wise activations, dropout,
pooling, a depthwise convolution, flattening before a Linear — with no other use of any value on the way (no
residual addition, concatenation or gating). Then Q's input channel c is P's output channel c, and if Q stops
reading channel c (``datd.decompose.prune``: Σ-optimal channel selection with a refitted Q), P's channel c and
everything per-channel between them (BatchNorm entries, depthwise filters, PReLU slopes) can be removed:
inverted-residual expansions of MobileNets, the inner channels of ResNet blocks, MLP hidden units, the features
before a classifier.

Chains are found on a ``torch.fx`` trace (a model that cannot be traced has none). ``profile_chains`` counts what
one channel of a chain costs upstream of Q (parameters and multiply-adds of P's output channel and of the per-channel
modules between), with ``datd.evaluate``'s definitions, and records the shapes its modules are timed at.
``prune_chain`` shrinks the modules of a chain in place; each shrunk module is marked, so that a saved model records
its new sizes (``channel_sizes``) and ``apply_sizes`` rebuilds them on the original architecture before its weights
are loaded.
"""

from __future__ import annotations

import operator
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from .evaluate import count_params, module_macs
from .layers import Cost, is_depthwise
from .surgery import get_module, replace_module

MARK = "datd_pruned"  # attribute set on every module whose channels were removed

# Modules that act on each channel alone and hold no per-channel state.
_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.AlphaDropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_CHANNELWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.softplus, F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, torch.relu, torch.sigmoid, torch.tanh, torch.nn.functional.sigmoid,
    torch.nn.functional.tanh,
}
_CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous"}
# Of those, the element-wise activations: one pass over the tensor each at inference (BatchNorms fold into convs,
# dropout and identities vanish), which a pruned channel no longer costs (``timed_parts``).
_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.PReLU,
)
_ACTIVATION_FUNCTIONS = _CHANNELWISE_FUNCTIONS - {
    F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}


@dataclass(frozen=True)
class Chain:
    """``producer`` → channel-wise operations → ``consumer`` (qualified module names). ``between``: the modules on
    the way that hold per-channel state (BatchNorm, depthwise conv, PReLU), shrunk with the channels;
    ``channels``: H, the channels that flow; ``block``: the consumer's weight columns per channel (kh·kw for a
    conv; h·w for a Linear reading flattened h×w maps; 1 otherwise); ``activations``: for each element-wise
    activation on the way, the producer or depthwise conv whose output it follows (for timing)."""

    producer: str
    consumer: str
    between: tuple[str, ...]
    channels: int
    block: int
    activations: tuple[str, ...] = ()


def _is_ungrouped(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _flattens(node: torch.fx.Node) -> bool:
    """torch.flatten(x, 1) / x.flatten(1) (channels then positions, per sample)."""
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1


def _constant_args(node: torch.fx.Node) -> bool:
    """Every argument but the first is a constant (not another value of the graph)."""
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args[1:], node.kwargs), found.append)
    return not found


def find_chains(model: nn.Module, consumers: set[str] | None = None) -> dict[str, Chain]:
    """Consumer name → its ``Chain``, for every chain of ``model`` (consumers restricted to ``consumers``). Chains
    share no layer: where a layer would be the consumer of one and the producer of the next (a bottleneck's middle
    conv), the first in the graph's order is kept. A model that cannot be traced has none (with a warning)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - any tracing failure: no chains, every other method still works
        warnings.warn(f"no channel pruning: the model cannot be traced with torch.fx ({type(exc).__name__})",
                      stacklevel=2)
        return {}
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    chains: dict[str, Chain] = {}
    claimed: set[str] = set()
    for node in graph.nodes:
        wanted = consumers is None or node.target in consumers
        if node.op != "call_module" or calls[node.target] != 1 or not wanted:
            continue
        consumer = modules[node.target]
        if not _is_ungrouped(consumer) or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        chain = _walk_back(node, modules, calls)
        if chain is None or chain.producer in claimed or chain.consumer in claimed:
            continue
        chains[chain.consumer] = chain
        claimed |= {chain.producer, chain.consumer}
    return chains


def _walk_back(consumer_node: torch.fx.Node, modules: dict[str, nn.Module], calls: Counter) -> Chain | None:
    """The chain ending at ``consumer_node``, or None."""
    consumer = modules[consumer_node.target]
    between: list[str] = []
    activations: list[str] = []
    pending = 0  # activations seen since the last conv (walking upstream): they follow the next conv up
    flattened = False
    node = consumer_node.args[0]
    while True:
        if not isinstance(node, torch.fx.Node) or len(node.users) != 1:
            return None
        if node.op == "call_module":
            module = modules[node.target]
            depthwise = isinstance(module, nn.Conv2d) and is_depthwise(module)
            pending += isinstance(module, _ACTIVATION_MODULES)
            if isinstance(module, (nn.Conv2d, nn.Linear)) and not depthwise:
                if calls[node.target] != 1 or not _is_ungrouped(module):
                    return None
                activations += [node.target] * pending
                return _chain(node.target, module, consumer_node.target, consumer, tuple(between[::-1]), flattened,
                              tuple(activations[::-1]))
            if isinstance(module, nn.Conv2d):  # depthwise: channel-wise if one filter per channel
                if module.out_channels != module.in_channels or calls[node.target] != 1:
                    return None
                between.append(node.target)
                activations += [node.target] * pending
                pending = 0
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)) or \
                    (isinstance(module, nn.PReLU) and module.num_parameters > 1):
                if calls[node.target] != 1:
                    return None
                between.append(node.target)
            elif isinstance(module, nn.Flatten):
                if (module.start_dim, module.end_dim) != (1, -1):
                    return None
                flattened = True
            elif not isinstance(module, _CHANNELWISE_MODULES + (nn.PReLU,)):
                return None
        elif node.op == "call_function" and node.target in _CHANNELWISE_FUNCTIONS and _constant_args(node):
            pending += node.target in _ACTIVATION_FUNCTIONS
        elif node.op == "call_function" and node.target is torch.flatten and _flattens(node):
            flattened = True
        elif node.op == "call_method" and node.target in _CHANNELWISE_METHODS and _constant_args(node):
            pending += node.target != "contiguous"
        elif node.op == "call_method" and node.target == "flatten" and _flattens(node):
            flattened = True
        elif node.op == "call_function" and node.target is operator.getitem:
            return None
        else:
            return None
        node = node.args[0] if node.args else None


def _chain(producer: str, p: nn.Module, consumer: str, q: nn.Module, between: tuple[str, ...],
           flattened: bool, activations: tuple[str, ...]) -> Chain | None:
    channels = _out_channels(p)
    if isinstance(q, nn.Conv2d):
        if q.in_channels != channels:
            return None
        block = q.kernel_size[0] * q.kernel_size[1]
    else:
        if q.in_features % channels or (q.in_features != channels and not flattened):
            return None
        block = q.in_features // channels
    return Chain(producer, consumer, between, channels, block, activations) if channels > 1 else None


@dataclass(frozen=True)
class ChainProfile:
    """What one channel of a chain costs upstream of its consumer (``unit``: parameters, and multiply-adds per sample
    as ``datd.evaluate.count_macs`` counts them) and the per-sample input shape of each module of the chain
    (``shapes``: name -> (1, C, H, W) or (1, F)) and of the producer's and depthwise convs' outputs (``outputs``),
    for timing it."""

    unit: Cost
    shapes: dict[str, tuple[int, ...]]
    outputs: dict[str, tuple[int, ...]]


@torch.no_grad()
def profile_chains(model: nn.Module, chains: dict[str, Chain], example: Tensor) -> dict[str, ChainProfile]:
    """Consumer name → ``ChainProfile`` of its chain, from one forward pass of ``example`` (N, …)."""
    wanted = {n for c in chains.values() for n in (c.producer, *c.between, c.consumer)}
    macs: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    outputs: dict[str, tuple[int, ...]] = {}

    def record(name: str, module: nn.Module, args: tuple, out: Tensor) -> None:
        macs[name] = module_macs(module, out) // example.shape[0]
        shapes[name] = (1,) + tuple(args[0].shape[1:])
        outputs[name] = (1,) + tuple(out.shape[1:])

    handles = [m.register_forward_hook(lambda m, a, o, name=name: record(name, m, a, o))
               for name, m in model.named_modules() if name in wanted]
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for consumer, chain in chains.items():
        names = (chain.producer, *chain.between)
        params = sum(count_params(model.get_submodule(n)) for n in names)
        unit = Cost(params // chain.channels, sum(macs.get(n, 0) for n in names) // chain.channels)
        out[consumer] = ChainProfile(unit, {n: shapes[n] for n in (*names, consumer) if n in shapes},
                                     {n: outputs[n] for n in names if n in outputs})
    return out


def timed_parts(model: nn.Module, chain: Chain, profile: ChainProfile,
                kept: int) -> list[tuple[nn.Module, tuple[int, ...]]]:
    """The chain's convolutions and Linears (BatchNorms fold into them at inference) and its element-wise
    activations with ``kept`` of its channels, each with its input shape: what ``datd.latency.LatencyModel.pruned``
    times (``kept`` = H: as they are)."""
    parts: list[tuple[nn.Module, tuple[int, ...]]] = []
    for name in chain.activations:  # one pass over the producer's or a depthwise conv's output each
        shape = profile.outputs[name]
        parts.append((nn.ReLU(), (1, kept) + shape[2:]))
    for name in (chain.producer, *chain.between, chain.consumer):
        module, shape = model.get_submodule(name), profile.shapes[name]
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if name == chain.producer:
            parts.append((resize(module, {"out": kept}), shape))
        elif name == chain.consumer:
            per = chain.block if isinstance(module, nn.Linear) else 1
            shape = shape[:-1] + (kept * per,) if isinstance(module, nn.Linear) else (1, kept) + shape[2:]
            parts.append((resize(module, {"in": kept * per}), shape))
        else:  # depthwise
            parts.append((resize(module, {"in": kept, "out": kept}), (1, kept) + shape[2:]))
    return parts


# ----------------------------------------------------------------------------------------------------------
# shrinking modules


def module_sizes(module: nn.Module) -> dict[str, int | bool]:
    """The channel sizes a saved model records for a shrunk ``module`` (and whether a Conv2d/Linear has a bias: a
    refitted consumer may have gained one)."""
    if isinstance(module, nn.Conv2d):
        return {"in": module.in_channels, "out": module.out_channels, "bias": module.bias is not None}
    if isinstance(module, nn.Linear):
        return {"in": module.in_features, "out": module.out_features, "bias": module.bias is not None}
    if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
        return {"out": module.num_features}
    if isinstance(module, nn.PReLU):
        return {"out": module.num_parameters}
    raise TypeError(f"cannot resize a {type(module).__name__}")


def channel_sizes(model: nn.Module) -> dict[str, dict[str, int | bool]]:
    """{module name: {"in"/"out": channels, "bias"}} of every module of ``model`` that ``prune_chain`` shrank."""
    return {name: module_sizes(m) for name, m in model.named_modules() if getattr(m, MARK, False)}


def resize(module: nn.Module, sizes: dict[str, int | bool]) -> nn.Module:
    """An empty module like ``module`` (same type and settings, same device and dtype) with the channel ``sizes``
    ({"in", "out", "bias"}, as ``channel_sizes`` records them), marked as shrunk."""
    factory = {"device": next(module.parameters(), torch.empty(0)).device,
               "dtype": next(module.parameters(), torch.empty(0)).dtype}
    if isinstance(module, nn.Conv2d):
        n_in, n_out = sizes.get("in", module.in_channels), sizes.get("out", module.out_channels)
        depthwise = is_depthwise(module) and module.in_channels == module.out_channels
        if depthwise and n_in != n_out:
            raise ValueError("a depthwise convolution keeps as many outputs as inputs")
        new: nn.Module = nn.Conv2d(n_in, n_out, module.kernel_size, module.stride, module.padding, module.dilation,
                                   n_in if depthwise else module.groups, sizes.get("bias", module.bias is not None),
                                   module.padding_mode, **factory)
    elif isinstance(module, nn.Linear):
        new = nn.Linear(sizes.get("in", module.in_features), sizes.get("out", module.out_features),
                        sizes.get("bias", module.bias is not None), **factory)
    elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
        new = type(module)(sizes["out"], module.eps, module.momentum, module.affine, module.track_running_stats,
                           **factory)
    elif isinstance(module, nn.PReLU):
        new = nn.PReLU(sizes["out"], **factory)
    else:
        raise TypeError(f"cannot resize a {type(module).__name__}")
    new.train(module.training)
    setattr(new, MARK, True)
    return new


def apply_sizes(model: nn.Module, sizes: dict[str, dict[str, int | bool]]) -> nn.Module:
    """Give each module named in ``sizes`` (``channel_sizes`` of a pruned model) those channel counts (an empty module,
    ``resize``), in place, before the pruned model's state dict is loaded into ``model``."""
    hint = "is this the architecture the compressed model was made from?"
    for name, counts in sizes.items():
        try:
            replace_module(model, name, resize(get_module(model, name), counts))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"cannot give the base model's '{name}' the saved channel counts ({exc}): {hint}") from exc
    return model


def with_bias(module: nn.Module, bias: bool) -> nn.Module:
    """``module`` (Conv2d/Linear) itself, or an empty copy of it with a bias where it has none and ``bias``."""
    if not bias or module.bias is not None:
        return module
    factory = {"device": module.weight.device, "dtype": module.weight.dtype}
    if isinstance(module, nn.Conv2d):
        new: nn.Module = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                   module.padding, module.dilation, module.groups, True, module.padding_mode, **factory)
    else:
        new = nn.Linear(module.in_features, module.out_features, True, **factory)
    with torch.no_grad():
        new.weight.copy_(module.weight)
        new.bias.zero_()
    new.train(module.training)
    return new


@torch.no_grad()
def _take(old: nn.Module, new: nn.Module, kept: Tensor) -> nn.Module:
    """Copy ``old``'s per-channel tensors at the output channels ``kept`` into the shrunk ``new``."""
    for name, tensor in list(old.named_parameters(recurse=False)) + list(old.named_buffers(recurse=False)):
        target = getattr(new, name)
        target.copy_(tensor if tensor.dim() == 0 else tensor[kept.to(tensor.device)])
    return new


@torch.no_grad()
def prune_chain(model: nn.Module, chain: Chain, kept: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """Keep only the channels ``kept`` (sorted indices into the chain's H) of ``chain`` in ``model``, in place: the
    producer's output channels and the per-channel modules between are cut to them, the consumer reads ``kept``
    only, with ``weight`` ((T, k, kh, kw) or (T, k·block)) and ``bias`` (T,) or None (its own)."""
    k = int(kept.numel())
    producer = model.get_submodule(chain.producer)
    replace_module(model, chain.producer, _take(producer, resize(producer, {"out": k}), kept))
    for name in chain.between:
        module = model.get_submodule(name)
        sizes = {"in": k, "out": k} if isinstance(module, nn.Conv2d) else {"out": k}
        replace_module(model, name, _take(module, resize(module, sizes), kept))
    consumer = with_bias(model.get_submodule(chain.consumer), bias is not None)
    new = resize(consumer, {"in": k * (chain.block if isinstance(consumer, nn.Linear) else 1)})
    new.weight.copy_(weight.reshape(new.weight.shape).to(new.weight.dtype))
    if new.bias is not None:
        new.bias.copy_(consumer.bias if bias is None else bias.to(new.bias.dtype))
    replace_module(model, chain.consumer, new)


__all__ = ["MARK", "Chain", "ChainProfile", "apply_sizes", "channel_sizes", "find_chains", "module_sizes",
           "profile_chains", "prune_chain", "resize", "timed_parts", "with_bias"]
