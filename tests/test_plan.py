"""Budget parsing, rank ladders and the global allocation."""

import dataclasses
import itertools
import random

import pytest

from datd.layers import Cost, Geometry, dense_cost
from datd.plan import (
    FAMILY_SCALE_LIMITS, LatencyBudget, Option, Plan, Target, allocate, check_ranks, damage_curve, factorized_cost,
    family_scale, pruning_scaled, rank_ladder, ranks_for_fraction,
)


def geometry(t=64, s=32, k=3, hw=8, stride=1):
    return Geometry((t, s, k, k), 1, False, (hw * stride, hw * stride), (hw, hw))


@pytest.mark.parametrize("spec, metric, fraction", [("params=0.5", "params", 0.5), ("macs = 0.25", "macs", 0.25), ("params=1e-1", "params", 0.1)])
def test_target_parsing(spec, metric, fraction):
    target = Target.parse(spec)
    assert (target.metric, target.fraction) == (metric, fraction)
    assert Target.parse(str(target)) == target


@pytest.mark.parametrize("spec", ["params=0", "params=1", "params=1.5", "flops=0.5", "0.5", "params=-0.2", ""])
def test_bad_targets_are_refused(spec):
    with pytest.raises(ValueError, match="target"):
        Target.parse(spec)


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp"])
@pytest.mark.parametrize("stride", [1, 2])
def test_ladder_never_makes_a_layer_bigger(method, stride):
    g = geometry(stride=stride)
    dense = dense_cost(g)
    ladder = rank_ladder(method, g)
    assert ladder and all(min(r) >= 1 for r in ladder)
    costs = [factorized_cost(method, g, r) for r in ladder]
    assert all(c.params < dense.params and c.macs <= dense.macs for c in costs)
    assert [c.params for c in costs] == sorted(c.params for c in costs)
    for fraction in (0.1, 0.3, 0.7):
        ranks = ranks_for_fraction(method, g, fraction, "params")
        assert factorized_cost(method, g, ranks).params <= fraction * dense.params
        bigger = ladder[ladder.index(ranks) + 1] if ladder.index(ranks) + 1 < len(ladder) else None
        assert bigger is None or factorized_cost(method, g, bigger).params > fraction * dense.params


def test_explicit_ranks_are_validated():
    g = geometry()
    assert check_ranks("tucker2", g, [10, 8], "conv") == (10, 8)
    with pytest.raises(ValueError, match="layer 'conv'.*ranks must be"):
        check_ranks("tucker2", g, [0, 8], "conv")
    with pytest.raises(ValueError, match="ranks must be"):
        check_ranks("svd", g, [10, 8], "conv")
    with pytest.raises(ValueError, match="not make the layer smaller"):
        check_ranks("svd", g, [64], "conv")


def brute_force(options, budget):
    best = None
    names = list(options)
    for combo in itertools.product(*(options[n] for n in names)):
        if sum(o.cost.params for o in combo) <= budget:
            d = sum(o.damage for o in combo)
            best = d if best is None or d < best else best
    return best


@pytest.mark.parametrize("seed", range(8))
def test_allocation_meets_budget_and_is_near_optimal(seed):
    rng = random.Random(seed)
    options = {}
    for layer in range(4):
        dense = rng.randint(500, 2000)
        opts = [Option("dense", (), Cost(dense, dense), 0.0)]
        for r in range(1, 6):
            cost = int(dense * r / 6)
            opts.append(Option("svd", (r,), Cost(cost, cost), rng.uniform(0.5, 2) * (6 - r) ** 2))
        options[f"l{layer}"] = opts
    total = sum(o[0].cost.params for o in options.values())
    for fraction in (0.3, 0.5, 0.8):
        budget = int(fraction * total)
        chosen = allocate(options, budget, "params")
        assert sum(o.cost.params for o in chosen.values()) <= budget
        assert sum(o.damage for o in chosen.values()) <= 1.25 * brute_force(options, budget) + 1e-9


def test_damage_curve_says_what_each_budget_costs():
    fragile = [Option("dense", (), Cost(100, 0), 0.0), Option("svd", (1,), Cost(50, 0), 100.0)]
    robust = [Option("dense", (), Cost(100, 0), 0.0), Option("svd", (1,), Cost(50, 0), 1.0)]
    curve = damage_curve({"fragile": fragile, "robust": robust}, 250, 50, "params", (0.99, 0.8, 0.6, 0.5))
    assert [c["target"] for c in curve] == ["params=0.99", "params=0.8", "params=0.6", "params=0.5"]
    # of 250 (50 fixed): 0.99 → 197 for the layers, both dense (200) do not fit: the robust one goes; 0.8 → 150:
    # still one; 0.6 → 100: both; 0.5 → 75: below the cheapest plan (100)
    assert [c["damage"] for c in curve] == [1.0, 1.0, 101.0, None]


def test_allocation_prefers_the_cheap_damage_and_refuses_the_impossible():
    fragile = [Option("dense", (), Cost(100, 0), 0.0), Option("svd", (1,), Cost(50, 0), 100.0)]
    robust = [Option("dense", (), Cost(100, 0), 0.0), Option("svd", (1,), Cost(50, 0), 1.0)]
    chosen = allocate({"fragile": fragile, "robust": robust}, 150, "params")
    assert chosen["fragile"].method == "dense" and chosen["robust"].method == "svd"
    with pytest.raises(ValueError, match="infeasible"):
        allocate({"fragile": fragile, "robust": robust}, 99, "params")


def test_options_that_tie_in_damage_take_what_the_budget_leaves():
    """A layer whose every option is predicted harmless (sensitivity 0) is not compressed further than the budget
    needs: the allocation still meets the budget, and ends near it rather than at the cheapest option everywhere."""
    harmless = [Option("dense", (), Cost(1000, 0), 0.0)] + [Option("svd", (r,), Cost(100 * r, 0), 0.0) for r in (1, 4, 8)]
    harmful = [Option("dense", (), Cost(1000, 0), 0.0)] + [Option("svd", (r,), Cost(100 * r, 0), 10.0 / r) for r in (1, 4, 8)]
    for budget in (1000, 1300, 1700):
        chosen = allocate({"harmless": harmless, "harmful": harmful}, budget, "params")
        spent = sum(o.cost.params for o in chosen.values())
        assert budget - 400 < spent <= budget  # within the largest gap between two of the harmless options
        assert chosen["harmful"].damage == min(o.damage for o in harmful if o.cost.params <= budget - 100)
    only = allocate({"harmless": harmless}, 500, "params")["harmless"]
    assert only.ranks == (4,)


def test_plan_json_roundtrip(tmp_path):
    g = geometry()
    plan = Plan({"a": Option("tucker2", (8, 4), factorized_cost("tucker2", g, (8, 4)))}, {"b": "too small"}, "params=0.5")
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.read(path) == {"a": ("tucker2", (8, 4))}
    path.write_text('{"format": "datd-plan/1", "layers": {"a": {"method": "tt", "ranks": [3]}}}')
    with pytest.raises(ValueError, match="unknown method"):
        Plan.read(path)
    path.write_text('{"layers": {}}')
    with pytest.raises(ValueError, match="not a datd plan"):
        Plan.read(path)


def test_latency_targets_parse():
    target = Target.parse("latency=0.5")
    assert (target.metric, target.fraction) == ("latency", 0.5) and str(target) == "latency=0.5"


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp"])
@pytest.mark.parametrize("multiple", [8, 16])
def test_rank_multiples(method, multiple):
    g = geometry(t=64, s=40)
    ladder = rank_ladder(method, g, multiple)
    assert ladder
    for ranks in ladder:
        caps = (64, 40) if method == "tucker2" else (None,)
        assert all(r % multiple == 0 or r == cap for r, cap in zip(ranks, caps))
    if method != "tucker2":
        assert ladder == [r for r in rank_ladder(method, g) if r[0] % multiple == 0]
    assert [factorized_cost(method, g, r).params for r in ladder] == sorted(factorized_cost(method, g, r).params for r in ladder)
    with pytest.raises(ValueError, match="multiple"):
        rank_ladder(method, g, 0)


def test_latency_budget_follows_the_measured_ratios():
    options = {"a": [Option("dense", (), Cost(1, 1, 100)), Option("svd", (4,), Cost(1, 1, 40))],
               "b": [Option("dense", (), Cost(1, 1, 100)), Option("svd", (4,), Cost(1, 1, 30))]}
    # the original: 250 ns, 200 of them in the two layers; at 0.6 the layers get 150 − 50 = 100
    budget = LatencyBudget.of(fraction=0.6, reference=250, options=options)
    assert budget.cheapest == 70 and budget.dense == 200 and budget.allowed == 100
    # a plan predicted at 100 measured 0.65: on the line from it to the original (200, 1), 0.6 lies at 100 − 14.3
    slow = budget.measured(predicted=100, ratio=0.65)
    assert slow.allowed == int(100 - 0.05 * 100 / 0.35)
    chosen = allocate(options, slow.allowed, "latency")
    assert sum(o.cost.latency for o in chosen.values()) <= slow.allowed
    # every plan too slow: the next line starts from the fastest one measured
    assert slow.measured(predicted=95, ratio=0.62).allowed == int(95 - 0.02 * 105 / 0.38)
    assert slow.measured(predicted=90, ratio=0.8).allowed == 70  # that line ends below the cheapest plan
    # a plan no faster than the original asks for the cheapest one
    assert budget.measured(predicted=100, ratio=1.05).allowed == 70
    assert budget.measured(predicted=100, ratio=0.0) is None
    # an unreachable target asks for the cheapest plan
    assert LatencyBudget.of(fraction=0.2, reference=250, options=options).allowed == 70


def test_latency_budget_overshoot_is_bracketed_by_the_measured_plans_and_the_original():
    options = {"a": [Option("dense", (), Cost(1, 1, 100)), Option("svd", (4,), Cost(1, 1, 40))],
               "b": [Option("dense", (), Cost(1, 1, 100)), Option("svd", (4,), Cost(1, 1, 30))]}
    budget = LatencyBudget.of(fraction=0.85, reference=250, options=options)
    # a plan predicted at 120 ran at 0.6 (a busy machine inflated the reference): not a budget from that one
    # plan's scale but on the line from it to the original (200, 1)
    after = budget.measured(predicted=120, ratio=0.6)
    assert after.allowed == int(120 + 0.25 / 0.4 * 80)
    # a second plan there ran too slow: the next lies between the two measured plans
    again = after.measured(predicted=after.allowed, ratio=0.9)
    assert 120 < again.allowed < after.allowed
    assert again.allowed == int(120 + 0.25 / 0.3 * (after.allowed - 120))
    # a plan at the original's cost that met the target leaves nothing to bracket
    assert budget.measured(predicted=200, ratio=0.8) is None


def _joint_case(seed):
    """Two producer/consumer pairs and an unrelated layer with factorization options (damage growing as the rank
    falls), and prune options on each consumer keeping k of 8 channels, whose cost counts the producer's removed
    channels too (linear in k, below zero for small k)."""
    rng = random.Random(seed)
    options = {}
    for name in ("p1", "c1", "p2", "c2", "other"):
        dense = rng.randint(500, 2000)
        opts = [Option("dense", (), Cost(dense, dense), 0.0)]
        opts += [Option("svd", (r,), Cost(int(dense * r / 6), 0), rng.uniform(0.5, 2) * (6 - r) ** 2) for r in range(1, 6)]
        options[name] = opts
    for consumer, producer in (("c1", "p1"), ("c2", "p2")):
        dense, upstream = options[consumer][0].cost.params, options[producer][0].cost.params / 8
        scale = rng.uniform(0.3, 3)
        options[consumer] += [Option("prune", (k,), Cost(int(dense * k / 8 - (8 - k) * upstream), 0), scale * (8 - k) ** 2)
                              for k in range(1, 8)]
    return options


@pytest.mark.parametrize("seed", range(8))
def test_a_pruned_consumer_keeps_its_producer_dense_and_the_joint_allocation_is_near_optimal(seed):
    """``producers``: pruning a consumer removes its producer's channels, so the two are decided together: never a
    prune option beside a factorized producer, the budget kept, and the total damage near the best feasible
    combination (brute force over the allowed choices)."""
    options = _joint_case(seed)
    producers = {"c1": "p1", "c2": "p2"}
    total = sum(o[0].cost.params for o in options.values())
    pairs = {c: [(p, q) for p in options[producers[c]] for q in options[c] if q.method != "prune" or p.method == "dense"]
             for c in producers}
    for fraction in (0.3, 0.5, 0.7):
        budget = int(fraction * total)
        chosen = allocate(options, budget, "params", producers)
        assert set(chosen) == set(options)
        assert sum(o.cost.params for o in chosen.values()) <= budget
        for consumer, producer in producers.items():
            if chosen[consumer].method == "prune":
                assert chosen[producer].method == "dense"
        best = min(sum(o.damage for o in (*a, *b, c)) for a, b, c in itertools.product(pairs["c1"], pairs["c2"], options["other"])
                   if sum(o.cost.params for o in (*a, *b, c)) <= budget)
        assert sum(o.damage for o in chosen.values()) <= 1.25 * best + 1e-9


def test_a_joint_unit_whose_pruning_never_pays_allocates_like_two_layers():
    """A producer–consumer unit offers the two layers' other options combined (the lower hull of their sums): where
    its prune options are never worth taking the allocation is as good as that of the two layers apart."""
    for seed in range(6):
        options = _joint_case(seed)
        useless = {c: [dataclasses.replace(o, damage=o.damage + 1e6) if o.method == "prune" else o for o in options[c]]
                   for c in ("c1", "c2")}
        apart = {**options, **{c: [o for o in options[c] if o.method != "prune"] for c in ("c1", "c2")}}
        total = sum(o[0].cost.params for o in options.values())
        for fraction in (0.3, 0.5, 0.7):
            budget = int(fraction * total)
            separate = sum(o.damage for o in allocate(apart, budget, "params").values())
            together = allocate({**options, **useless}, budget, "params", {"c1": "p1", "c2": "p2"})
            assert all(o.method != "prune" for o in together.values())
            assert sum(o.damage for o in together.values()) <= 1.05 * separate + 1e-9


def test_a_plan_level_measurement_rescales_pruning_against_the_factorizations_and_moves_the_allocation():
    """Pruned layers whose plan-level KL is 10× their prediction, factorized ones at 2×: pruning's damages are scaled
    by 5, which turns the allocator from pruning to factorizing where the two were close; clamped, and None where a
    part predicts or measures nothing."""
    assert family_scale({"prune": 0.1, "factorized": 0.05}, {"prune": 1.0, "factorized": 0.1}) == pytest.approx(5.0)
    assert family_scale({"prune": 0.1, "factorized": 0.1}, {"prune": 1e3, "factorized": 1e-3}) == FAMILY_SCALE_LIMITS[1]
    assert family_scale({"prune": 0.1, "factorized": 0.1}, {"prune": 1e-3, "factorized": 1e3}) == FAMILY_SCALE_LIMITS[0]
    assert family_scale({"prune": 0.0, "factorized": 0.1}, {"prune": 0.2, "factorized": 0.1}) is None
    assert family_scale({"prune": 0.1, "factorized": 0.1}, {"factorized": 0.1}) is None
    options = {"a": [Option("dense", (), Cost(10, 10)), Option("prune", (4,), Cost(5, 5), 0.01),
                     Option("cp", (3,), Cost(5, 5), 0.03)]}
    assert allocate(options, 5, "params")["a"].method == "prune"
    scaled = pruning_scaled(options, 5.0)
    assert [o.damage for o in scaled["a"]] == pytest.approx([0.0, 0.05, 0.03])
    assert allocate(scaled, 5, "params")["a"].method == "cp" and pruning_scaled(options, 1.0) is options
