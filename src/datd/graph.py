"""A model traced by ``torch.fx`` and run node by node, from any point of its graph.

Damage probes (``datd.probe``) run the rest of the model from each probed layer with that layer replaced;
propagated fits (``datd.propagate``) run the original and the partially compressed model from where the layers
still to be fitted begin. Both keep the values live before a node (``TracedModel.run``'s ``visit`` sees them)
and continue from there: the same operations on the same values as a full forward pass, so the same results bit
for bit, for the cost of the rest of the graph.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

Replacement = tuple[nn.Module, Tensor, "Tensor | None"]  # (Conv2d or Linear of the model, weight, bias)


def forward_with(module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``module`` (a Conv2d or Linear) applied to ``x`` with ``weight`` and ``bias`` instead of its own."""
    if isinstance(module, nn.Conv2d):
        return module._conv_forward(x, weight, bias)
    return F.linear(x, weight, bias)


@dataclass(frozen=True)
class Sink:
    """Where a layer's output joins a sum of two values through per-channel affine modules only (the residual
    add of a ResNet block, of an inverted residual): ``node``, the index of the add; ``other``, the fx node of the
    other addend; ``affine``, the names of the eval-mode BatchNorms between the layer and the add (in order)."""

    node: int
    other: fx.Node
    affine: tuple[str, ...]


_ADDS = {operator.add, operator.iadd, torch.add}


def conv_batchnorms(model: nn.Module, graph: fx.Graph | None = None) -> list[tuple[str, str]]:
    """(conv, batchnorm) names of every BatchNorm2d with running statistics whose input is a Conv2d's output and
    nothing else reads that output, both called once per forward pass: BN ∘ conv is one conv (``fold_batchnorms``),
    and the BatchNorm's running statistics describe the conv's outputs on the data the model was trained on
    (``datd.shrinkage``). ``graph``: ``model`` traced by torch.fx (traced here if not given; what tracing raises
    is raised)."""
    graph = fx.symbolic_trace(model).graph if graph is None else graph
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        bn = modules[node.target]
        if (isinstance(modules.get(source.target), nn.Conv2d) and calls[source.target] == 1
                and calls[node.target] == 1 and bn.track_running_stats and bn.running_mean is not None):
            pairs.append((str(source.target), str(node.target)))
    return pairs


def _is_add(node: fx.Node) -> bool:
    """A plain binary sum of two graph values (no ``alpha``, no ``out``)."""
    plain = (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method"
                                                                      and node.target in ("add", "add_"))
    return plain and len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)


def affine_scale(modules: list[nn.Module]) -> Tensor | None:
    """The per-channel scale (T,) of eval-mode BatchNorms applied in sequence (float64), or None where one of
    them is not a fixed per-channel affine map (training mode, no running statistics)."""
    scale: Tensor | None = None
    for m in modules:
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or m.training or m.running_var is None:
            return None
        s = (m.running_var.double() + m.eps).rsqrt()
        if m.weight is not None:
            s = s * m.weight.double()
        scale = s if scale is None else scale * s
    return scale


class TracedModel:
    """``model`` traced by ``torch.fx``, run node by node: ``run`` from the first node or, given the values live
    before node ``start``, from there, with one module's call replaced. ``start[name]``: the node of each module
    called exactly once. Values are dropped after their last use, so a run holds what an eager forward holds.

    The graph calls modules by name, so it runs on any ``root`` with the same module names (``run(root=…)``):
    a copy of the model whose layers were replaced by factorized or pruned ones, say."""

    def __init__(self, model: nn.Module):
        self.module = fx.symbolic_trace(model)
        self.nodes = list(self.module.graph.nodes)
        index = {n: i for i, n in enumerate(self.nodes)}
        self.dead: list[list[fx.Node]] = [[] for _ in self.nodes]  # per node: the values last used there
        for i, n in enumerate(self.nodes):
            self.dead[max((index[u] for u in n.users), default=i)].append(n)
        calls = Counter(n.target for n in self.nodes if n.op == "call_module")
        self.start = {n.target: i for i, n in enumerate(self.nodes) if n.op == "call_module" and calls[n.target] == 1}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if not placeholders or any(not n.args for n in placeholders[1:]):
            raise TypeError("the traced forward does not take exactly one required input")

    def sinks(self, names: list[str], root: nn.Module) -> dict[str, Sink]:
        """The layers among ``names`` (each called once) whose output reaches a two-value sum through nothing but
        eval-mode BatchNorms, each used once: their ``Sink`` (``datd.propagate``'s residual compensation)."""
        index = {n: i for i, n in enumerate(self.nodes)}
        found: dict[str, Sink] = {}
        for name in names:
            if name not in self.start:
                continue
            node, affine = self.nodes[self.start[name]], []
            while len(node.users) == 1:
                user = next(iter(node.users))
                if (user.op == "call_module" and user.target in self.start
                        and affine_scale([root.get_submodule(str(user.target))]) is not None):
                    node = user
                    affine.append(str(user.target))
                    continue
                if _is_add(user) and user.args[0] is not user.args[1]:
                    other = user.args[1] if user.args[0] is node else user.args[0]
                    found[name] = Sink(index[user], other, tuple(affine))  # type: ignore[arg-type]
                break
        return found

    def run(self, x: Tensor | None, env: dict[fx.Node, Any] | None = None, start: int = 0,
            replace: Replacement | None = None, visit: Callable[[int, dict], None] | None = None,
            root: nn.Module | None = None) -> Tensor:
        """The output from node ``start`` on (``env``: the values live there; ``x`` the input, needed from node
        0 only), node ``start`` computed by ``replace`` = (module, weight, bias) if given; ``visit(i, env)`` is
        called before each node i (it may raise to end the run there); modules and attributes are those of
        ``root`` (default: the traced model)."""
        root = self.module if root is None else root
        env = {} if env is None else dict(env)
        placeholder = 0
        for i in range(start, len(self.nodes)):
            node = self.nodes[i]
            if visit is not None:
                visit(i, env)
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            if node.op == "placeholder":
                value = x if placeholder == 0 else args[0]
                placeholder += 1
            elif node.op == "get_attr":
                value = root
                for part in str(node.target).split("."):
                    value = getattr(value, part)
            elif node.op == "call_function":
                value = node.target(*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "call_module":
                if i == start and replace is not None:
                    value = forward_with(replace[0], args[0], replace[1], replace[2])
                else:
                    value = root.get_submodule(node.target)(*args, **kwargs)
            else:  # output
                return args[0]
            env[node] = value
            for n in self.dead[i]:
                env.pop(n, None)
        raise RuntimeError("the traced graph has no output node")
