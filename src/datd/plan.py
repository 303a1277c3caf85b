"""Turning a whole-model budget into per-layer methods and ranks.

Pure bookkeeping over ``Option``s (a method, its ranks, their exact cost, a predicted damage); no model,
no data. The pipeline supplies the options (from Σ-SVD spectra and measured fits) and the damages
(Σ-errors weighted by measured sensitivities); this module chooses among them.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import DatdError
from .io import read_json, write_json
from .layers import FACTORIZED, Cost, Geometry, dense_cost, pruned_cost

PLAN_FORMAT = "datd-plan/1"
METHODS = ("tucker2", "cp", "svd", "prune")
METRICS = ("params", "macs", "latency")


@dataclass(frozen=True)
class Target:
    """A whole-model budget: ``metric`` at ``fraction`` of the original model. Metrics: 'params', 'macs' (exact
    counts) and 'latency' (measured wall-clock time of the inference form, on the run's device)."""

    metric: str
    fraction: float

    @classmethod
    def parse(cls, spec: "str | Target") -> "Target":
        if isinstance(spec, Target):
            return spec
        match = re.fullmatch(rf"\s*({'|'.join(METRICS)})\s*=\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*", str(spec))
        if not match:
            raise DatdError(f"target must look like 'params=0.5', 'macs=0.4' or 'latency=0.5', got {spec!r}")
        fraction = float(match.group(2))
        if not 0 < fraction < 1:
            raise DatdError(f"the target fraction must be in (0, 1), got {fraction}")
        return cls(match.group(1), fraction)

    def __str__(self) -> str:
        return f"{self.metric}={self.fraction:g}"

    def of(self, cost: Cost) -> int:
        return metric_of(cost, self.metric)


def metric_of(cost: Cost, metric: str) -> int:
    """``cost.params``, ``cost.macs`` or ``cost.latency`` (nanoseconds)."""
    if metric not in METRICS:
        raise DatdError(f"unknown metric {metric!r}; choose from {METRICS}")
    return getattr(cost, metric)


@dataclass(frozen=True)
class Option:
    """One way to treat a layer: ``method`` ('dense' keeps it), ``ranks``, its exact ``cost`` and a
    predicted ``damage`` (non-negative; 0 for 'dense'). An option of several layers decided together (``allocate``'s
    producer–consumer units) is their sum, with ``parts``: (layer, option) of each."""

    method: str
    ranks: tuple[int, ...]
    cost: Cost
    damage: float = 0.0
    parts: tuple[tuple[str, "Option"], ...] = ()


def factorized_cost(method: str, geometry: Geometry, ranks: tuple[int, ...]) -> Cost:
    """Exact cost of a compressed layer (the single definitions live on the layer classes and ``layers.pruned_cost``):
    for 'prune', the change of the whole model's cost (the removed channels' producer included)."""
    if method == "prune":
        return pruned_cost(geometry, ranks[0])
    return FACTORIZED[method].cost(geometry, ranks)


def _channels(geometry: Geometry) -> tuple[int, int]:
    """Output and input channels of one group (the whole layer when ungrouped): ranks are per group."""
    return geometry.weight_shape[0] // geometry.groups, geometry.weight_shape[1]


def max_ranks(method: str, geometry: Geometry) -> tuple[int, ...]:
    """The largest meaningful ranks (per group) of ``method`` for a weight (T, S/G, kh, kw)."""
    n_out, n_in = _channels(geometry)
    p = geometry.kernel_positions
    if method == "prune":
        if not geometry.input_channels:
            raise DatdError("this layer's input channels cannot be pruned (no producer feeds only them)")
        return (geometry.input_channels,)
    if method == "svd":
        return (min(n_out, n_in * p),)
    if method == "tucker2":
        return (n_out, n_in)
    if method == "cp":
        return (n_out * n_in * p,)
    raise DatdError(f"unknown method {method!r}; choose from {METHODS}")


def rank_ladder(method: str, geometry: Geometry, multiple: int = 1) -> list[tuple[int, ...]]:
    """Every rank setting of ``method`` that makes the layer strictly smaller in parameters and not larger in
    MACs than the dense layer, by increasing cost. Tucker-2 ranks move together: (⌈i·T/m⌉, ⌈i·S/m⌉),
    m = max(T, S), keeping R_T/T ≈ R_S/S. With ``multiple`` M > 1 every rank is a multiple of M (Tucker-2
    ranks are rounded up to one, capped at the channel count): hardware-friendly ranks."""
    if multiple < 1:
        raise DatdError(f"the rank multiple must be >= 1, got {multiple}")
    dense = dense_cost(geometry)
    n_out, n_in = _channels(geometry)
    if method == "tucker2":
        m = max(n_out, n_in)
        candidates = sorted({(_round_up(math.ceil(i * n_out / m), multiple, n_out),
                              _round_up(math.ceil(i * n_in / m), multiple, n_in)) for i in range(1, m + 1)})
    elif method == "prune":  # every kept count below all of them (the model only shrinks as channels go)
        candidates = ((k,) for k in range(multiple, max_ranks(method, geometry)[0], multiple))
    else:  # lazily: a CP rank bound is T·S·kh·kw, far beyond the ranks that make a layer smaller
        candidates = ((r,) for r in range(multiple, max_ranks(method, geometry)[0] + 1, multiple))
    ladder = []
    for ranks in candidates:
        cost = factorized_cost(method, geometry, ranks)
        if cost.params >= dense.params:
            break
        if cost.macs <= dense.macs:
            ladder.append(ranks)
    return ladder


def _round_up(rank: int, multiple: int, limit: int) -> int:
    return min(math.ceil(rank / multiple) * multiple, limit)


def check_ranks(method: str, geometry: Geometry, ranks: tuple[int, ...], layer: str) -> tuple[int, ...]:
    """Validate explicit ranks: within bounds and not making the layer bigger (ValueError naming the layer)."""
    ranks = tuple(int(r) for r in ranks)
    bounds = max_ranks(method, geometry)
    if len(ranks) != len(bounds) or any(not 1 <= r <= b for r, b in zip(ranks, bounds)):
        raise DatdError(f"layer '{layer}': {method} ranks must be {len(bounds)} integers in [1, {bounds}], got {list(ranks)}")
    if factorized_cost(method, geometry, ranks).params >= dense_cost(geometry).params:
        raise DatdError(f"layer '{layer}': {method} ranks {list(ranks)} would not make the layer smaller")
    return ranks


def ranks_for_fraction(method: str, geometry: Geometry, fraction: float, metric: str,
                       multiple: int = 1) -> tuple[int, ...] | None:
    """The largest ranks on the ladder whose cost (params or MACs) is at most ``fraction`` of the dense
    layer's (None if even the smallest does not fit)."""
    budget = fraction * metric_of(dense_cost(geometry), metric)
    ladder = rank_ladder(method, geometry, multiple)
    costs = [metric_of(factorized_cost(method, geometry, r), metric) for r in ladder]
    i = bisect.bisect_right(costs, budget)
    return ladder[i - 1] if i else None


def _lower_hull(options: list[Option], metric: str) -> list[Option]:
    """The options on the lower convex hull of (cost, damage), most expensive first: the only ones a
    Lagrangian allocation can choose (dominated options and options above the hull are dropped)."""
    staircase: list[Option] = []
    for o in sorted(options, key=lambda o: (metric_of(o.cost, metric), o.damage)):
        if not staircase or o.damage < staircase[-1].damage:
            staircase.append(o)  # cost increasing, damage strictly decreasing

    def cross(a: Option, b: Option, c: Option) -> float:
        ax, bx, cx = (metric_of(x.cost, metric) for x in (a, b, c))
        return (bx - ax) * (c.damage - a.damage) - (b.damage - a.damage) * (cx - ax)

    hull: list[Option] = []
    for o in staircase:
        while len(hull) >= 2 and cross(hull[-2], hull[-1], o) <= 0:
            hull.pop()
        hull.append(o)
    return hull[::-1]


def _minkowski(first: list[Option], second: list[Option], metric: str) -> list[tuple[Option, Option]]:
    """The lower convex hull of the sums of two layers' options, from their hulls (most expensive first): the
    pairs a Lagrangian allocation of the two layers apart would choose, in its order (steps by least damage added
    per unit saved)."""
    def slope(hull: list[Option], i: int) -> float:
        if i + 1 >= len(hull):
            return math.inf
        saved = metric_of(hull[i].cost, metric) - metric_of(hull[i + 1].cost, metric)
        return (hull[i + 1].damage - hull[i].damage) / max(saved, 1)

    i = j = 0
    pairs = [(first[0], second[0])]
    while i + 1 < len(first) or j + 1 < len(second):
        if slope(first, i) <= slope(second, j):
            i += 1
        else:
            j += 1
        pairs.append((first[i], second[j]))
    return pairs


def _units(options: dict[str, list[Option]], producers: dict[str, str], metric: str) -> dict[str, list[Option]]:
    """The allocation's units: each layer alone, except a consumer with 'prune' options and its producer
    (``producers``: consumer → producer, both in ``options``), decided together: pruning removes the producer's
    output channels, so it needs the producer dense. Their unit offers the two layers' other options combined
    (``_minkowski``) and each prune option with the producer dense."""
    units = dict(options)
    for consumer, producer in producers.items():
        if consumer not in options or producer not in options or not any(o.method == "prune" for o in options[consumer]):
            continue
        own = [o for o in options[consumer] if o.method != "prune"]
        dense = next(o for o in options[producer] if o.method == "dense")
        pairs = _minkowski(_lower_hull(options[producer], metric), _lower_hull(own, metric), metric)
        pairs += [(dense, o) for o in options[consumer] if o.method == "prune"]
        del units[consumer], units[producer]
        units[f"{producer} + {consumer}"] = [
            Option("joint", (), p.cost + c.cost, p.damage + c.damage, ((producer, p), (consumer, c))) for p, c in pairs]
    return units


def cheapest(options: dict[str, list[Option]], metric: str, producers: dict[str, str] | None = None) -> int:
    """The least total ``metric`` any allocation of ``options`` reaches."""
    return sum(min(metric_of(o.cost, metric) for o in opts) for opts in _units(options, producers or {}, metric).values())


def allocate(options: dict[str, list[Option]], budget: int, metric: str,
             producers: dict[str, str] | None = None) -> dict[str, Option]:
    """Choose one option per layer to minimize the total damage with the total cost ≤ ``budget``.

    Greedy on each layer's lower convex hull of (cost, damage): start from the least damaging option of
    every layer and repeatedly take the step down its hull with the least damage added per unit of cost
    saved (the Lagrangian solution of this separable problem), then spend what is left of the budget on
    the upgrades that remove the most damage per unit of cost. ``producers`` (consumer → producer): layers that
    are decided together (``_units``). Raises ValueError when even the cheapest options exceed the budget."""
    producers = producers or {}
    units = _units(options, producers, metric)
    chosen, left = _descend(units, budget, metric)
    out: dict[str, Option] = {}
    for name, option in chosen.items():
        out.update(option.parts or ((name, option),))
    # the leftover goes to the layers one by one (any of their options), keeping pruned consumers' producers dense
    pruned_by = {p: c for c, p in producers.items() if c in options and p in options}

    def allowed(name: str, option: Option, current: dict[str, Option]) -> bool:
        if option.method == "prune" and name in producers and producers[name] in current:
            return current[producers[name]].method == "dense"
        return name not in pruned_by or current[pruned_by[name]].method != "prune" or option.method == "dense"

    return _spend_leftover({name: out[name] for name in options}, options, left, metric, allowed)


def _descend(options: dict[str, list[Option]], budget: int, metric: str) -> tuple[dict[str, Option], int]:
    """The Lagrangian part of ``allocate``: each unit's point on its lower hull, and the budget left."""
    hulls = {name: _lower_hull(opts, metric) for name, opts in options.items()}
    least = sum(min(metric_of(o.cost, metric) for o in opts) for opts in options.values())
    if least > budget:
        raise DatdError(f"budget infeasible: the cheapest choice costs {least:,} {metric}, the budget is {budget:,}")
    position = {name: 0 for name in hulls}
    total = sum(metric_of(h[0].cost, metric) for h in hulls.values())

    def step(name: str) -> tuple[float, int] | None:
        """(damage added per unit saved, units saved) of moving ``name`` one point down its hull."""
        i, hull = position[name], hulls[name]
        if i + 1 >= len(hull):
            return None
        saved = metric_of(hull[i].cost, metric) - metric_of(hull[i + 1].cost, metric)
        return (hull[i + 1].damage - hull[i].damage) / saved, saved

    heap = [(s[0], name) for name in hulls if (s := step(name))]
    heapq.heapify(heap)
    while total > budget:
        _, name = heapq.heappop(heap)
        total -= step(name)[1]  # type: ignore[index]
        position[name] += 1
        if (s := step(name)) is not None:
            heapq.heappush(heap, (s[0], name))
    return {name: hulls[name][position[name]] for name in hulls}, budget - total


def _spend_leftover(chosen: dict[str, Option], options: dict[str, list[Option]], left: int, metric: str,
                    allowed: Callable[[str, Option, dict[str, Option]], bool]) -> dict[str, Option]:
    """Upgrade layers (to any option, on the hull or not, that ``allowed`` given the others' choice) while the budget
    allows, the largest damage reduction per unit of cost first; then, where no upgrade reduces the predicted damage,
    those that tie with the current choice, the largest that fits first.

    Ties are layers whose every option is predicted harmless (sensitivities of exactly 0: a residual branch behind a
    BatchNorm whose scale is 0, as timm initializes them). The hull keeps only their cheapest option; without the
    second phase a plan could end far below its budget (timm's random-init ResNet-18-D: params 0.065 at
    params=0.5), compressing what the user asked to keep for no predicted gain."""
    table = {name: [(metric_of(o.cost, metric), o.damage, o) for o in opts] for name, opts in options.items()}
    while True:
        best, best_rate, tie = None, 0.0, None
        for name, current in chosen.items():
            cost = metric_of(current.cost, metric)
            for c, damage, o in table[name]:
                extra, gain = c - cost, current.damage - damage
                if extra > left or gain < 0 or not allowed(name, o, chosen):
                    continue
                if gain > 0 and gain / max(extra, 1) > best_rate:
                    best, best_rate = (name, o, extra), gain / max(extra, 1)
                elif gain == 0 and extra > 0 and (tie is None or extra > tie[2]):
                    tie = (name, o, extra)
        best = best or tie
        if best is None:
            return chosen
        name, o, extra = best
        chosen[name] = o
        left -= extra


CURVE_FRACTIONS = (0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.33, 0.25)  # the budgets a report shows


def damage_curve(options: dict[str, list[Option]], total: int, fixed: int, metric: str,
                 fractions: tuple[float, ...] = CURVE_FRACTIONS, producers: dict[str, str] | None = None) -> list[dict]:
    """What each whole-model budget would cost: for every fraction F of ``total`` (the model's params or MACs;
    ``fixed`` of it outside the options) the predicted damage (nats per image) of the allocation at F, or
    None where F is below the cheapest plan. Lets a report say which budgets stay harmless."""
    curve = []
    for fraction in fractions:
        try:
            damage = sum(o.damage for o in allocate(options, int(fraction * total) - fixed, metric, producers).values())
        except ValueError:  # below the cheapest plan
            damage = None
        curve.append({"target": f"{metric}={fraction:g}", "damage": damage})
    return curve


FAMILY_SCALE_LIMITS = (1 / 30, 30.0)  # how far a plan-level measurement may move one family's damages against another's


def family_scale(predicted: dict[str, float], measured: dict[str, float]) -> float | None:
    """How much pruning's predicted damages must be scaled against the factorizations' (``predicted`` and
    ``measured``: the KL of a plan's pruned layers alone and of its factorized layers alone, keys 'prune' and
    'factorized'), clamped to ``FAMILY_SCALE_LIMITS``; None where either part predicts or measures nothing.

    Per-layer predictions and probes each see one layer; a plan's pruned layers compound through depth in a way its
    factorized ones do not. On CIFAR ResNet-20 at latency=0.7 a plan predicted 0.079 nats and measured 0.94 (72.8 %
    top-1), where a factorized-only plan at macs=0.3 predicted 0.042 and measured 0.19. One common factor would not
    change what the allocator picks; the ratio of the two families' factors does. Used by the latency rounds.
    Tried as a third plan in the plan-level prune check of params/macs targets (pruning rescaled by the first
    plan's parts, probed and measured whole beside the other two), it never won: MobileNetV2 params=0.7 and
    macs=0.85, CIFAR ResNet-56 params=0.25 and macs=0.33 kept their plans and accuracies, MobileNetV2 took 28 %
    longer."""
    if any(predicted.get(k, 0) <= 0 or measured.get(k, 0) <= 0 for k in ("prune", "factorized")):
        return None
    ratio = (measured["prune"] / predicted["prune"]) / (measured["factorized"] / predicted["factorized"])
    low, high = FAMILY_SCALE_LIMITS
    return min(max(ratio, low), high)


def pruning_scaled(options: dict[str, list[Option]], scale: float) -> dict[str, list[Option]]:
    """``options`` with every 'prune' option's damage times ``scale`` (``family_scale``); the others as they are."""
    if scale == 1:
        return options
    return {n: [dataclasses.replace(o, damage=o.damage * scale) if o.method == "prune" else o for o in opts]
            for n, opts in options.items()}


MEASURED_RATIO_LIMITS = (1.0, 1e4)  # how far one measurement may move a layer's predicted damages


def calibrated(options: list[Option], measured: dict[tuple[str, tuple[int, ...]], float]) -> list[Option]:
    """One layer's options with their predicted damages corrected by ``measured`` ones ((method, ranks) ->
    measured damage, e.g. ``datd.probe.DamageProbe``): every option is scaled by the measured / predicted ratio of
    the measured option of the same method nearest to it in cost (any method when its own has none; a measured
    option by its own), clamped to ``MEASURED_RATIO_LIMITS``. 'dense' stays 0.

    Corrections only ever raise damages: the second-order prediction fails by underestimating large errors
    (saturating units, narrow bottlenecks), while a measurement on a few dozen images that comes out below
    it is as likely noise. Measured on CIFAR ResNet-20 at params=0.25 (no probes: 88.12%): trusting lower
    measurements too lost 1.2 points, raising on the plain mean 0.65; raising on the lower confidence bound
    (``DamageProbe.lower_bound``, what the pipeline passes) changed nothing there, and on MobileNetV2 with
    ImageNet weights it kept 71.8% instead of 69.6% at params=0.7."""
    if not measured:
        return options
    by_key = {(o.method, o.ranks): o for o in options}
    low, high = MEASURED_RATIO_LIMITS
    points = []  # (method, params, ratio)
    for key, value in measured.items():
        if key in by_key and by_key[key].damage > 0:
            points.append((key[0], by_key[key].cost.params, min(max(value / by_key[key].damage, low), high)))
    out = []
    for o in options:
        if o.method == "dense":
            out.append(o)
            continue
        damage = o.damage
        if points:
            same = [p for p in points if p[0] == o.method] or points
            damage *= min(same, key=lambda p: abs(math.log(max(p[1], 1) / max(o.cost.params, 1))))[2]
        # a measured option is never below its measurement (a prediction of 0 has no ratio to correct it by)
        out.append(dataclasses.replace(o, damage=max(damage, measured.get((o.method, o.ranks), 0.0))))
    return out


@dataclass(frozen=True)
class LatencyBudget:
    """What the compressible layers may spend (ns per batch, in their per-layer timings) for a whole-model
    latency of ``fraction`` of the original's. ``dense``: the sum of the layers' dense timings; ``cheapest``:
    that of the cheapest plan.

    The first plan trusts the timings: the layers get ``first`` = fraction · reference − (reference − dense).
    But per-layer timings do not add up exactly to a whole model's time (caches, memory traffic between
    layers, and on a busy machine plain noise, which the one reference measurement carries into that
    formula), so every plan built is measured against the original, interleaved: a point (P, ratio) of its
    predicted layer time P and its measured ratio to the original. The original itself is the anchor point
    (dense, 1). ``measured`` adds a point and places the next budget where the ratio should meet the target:
    - between the points that bracket it (the largest P that met it, the smallest larger P that did not,
      the anchor at worst), by linear interpolation;
    - while no plan met it, on the line from the original through the fastest plan measured (the cheapest
      plan where that plan was no faster than the original).
    Only measured ratios enter, never the reference alone: on a loaded machine the old correction (one
    plan's realized/predicted scale, through the reference) once asked for half the MACs at latency=0.85."""

    fraction: float
    first: int
    cheapest: int
    dense: int
    budget: float | None = None  # the next allocation's budget (None: ``first``)
    points: tuple[tuple[float, float], ...] = ()  # measured (P, ratio)

    @classmethod
    def of(cls, fraction: float, reference: int, options: dict[str, list[Option]],
           producers: dict[str, str] | None = None) -> "LatencyBudget":
        dense = sum(next(o.cost.latency for o in opts if o.method == "dense") for opts in options.values())
        return cls(fraction, round(fraction * reference - (reference - dense)), cheapest(options, "latency", producers),
                   dense)

    @property
    def allowed(self) -> int:
        """The budget for the allocation (never below the cheapest plan: the fastest possible is then chosen)."""
        return max(self.cheapest, int(self.first if self.budget is None else self.budget))

    def measured(self, predicted: int, ratio: float) -> "LatencyBudget | None":
        """The budget after a plan predicted at ``predicted`` ns measured ``ratio`` of the original's time
        (None when the measurements leave no better plan to try)."""
        if ratio <= 0:
            return None
        points = self.points + ((float(predicted), float(ratio)),)
        anchor = (float(self.dense), 1.0)
        met = [p for p in points if p[1] <= self.fraction]
        if not met:
            p, r = min(points)
            if p >= anchor[0] or r >= 1:
                return dataclasses.replace(self, budget=float(self.cheapest), points=points)
            return dataclasses.replace(self, budget=p - (r - self.fraction) * (anchor[0] - p) / (1 - r), points=points)
        lo = max(met)
        above = [p for p in points + (anchor,) if p[1] > self.fraction and p[0] > lo[0]]
        if not above:
            return None
        hi = min(above)
        return dataclasses.replace(self, budget=lo[0] + (self.fraction - lo[1]) / (hi[1] - lo[1]) * (hi[0] - lo[0]),
                                   points=points)


@dataclass
class Plan:
    """Per-layer decisions: ``layers`` maps a layer name to its method and ranks ('dense' keeps the layer);
    ``skipped`` maps the layers that cannot be compressed to the reason."""

    layers: dict[str, Option]
    skipped: dict[str, str] = field(default_factory=dict)
    target: str | None = None

    def to_json(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "target": self.target,
            "layers": {n: {"method": o.method, "ranks": list(o.ranks)} for n, o in self.layers.items()},
            "skipped": dict(self.skipped),
        }

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    @staticmethod
    def read(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Layer -> (method, ranks) from a plan file (validated against the model later, in one place)."""
        data = read_json(path)
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT or not isinstance(data.get("layers"), dict):
            raise DatdError(f"{path} is not a datd plan (format {PLAN_FORMAT}, with a 'layers' object)")
        out = {}
        for name, entry in data["layers"].items():
            if not isinstance(entry, dict) or "method" not in entry:
                raise DatdError(f"{path}: layer '{name}' needs 'method' and 'ranks'")
            method, ranks = entry["method"], entry.get("ranks", [])
            if not isinstance(method, str) or method not in METHODS + ("dense",):
                raise DatdError(f"{path}: layer '{name}' has unknown method {method!r}")
            if not isinstance(ranks, list) or not all(type(r) is int for r in ranks):
                raise DatdError(f"{path}: layer '{name}': ranks must be a list of integers, got {ranks!r}")
            ranks = tuple(ranks)
            out[name] = (method, ranks)
        return out
