"""Measured damage (the KL a replaced layer causes) against the planner's second-order prediction, and the
planner's correction of its predictions by measurements."""

import pytest
import torch
from torch import nn

from datd.fitting import LayerProblem, damage
from datd.layers import Cost, Geometry
from datd.plan import MEASURED_RATIO_LIMITS, Option, calibrated
from datd.probe import DamageProbe
from datd.sensitivity import output_sensitivity
from datd.stats import collect_stats


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def test_probe_is_zero_for_the_own_weight_and_matches_the_second_order_prediction_for_small_errors():
    model = _model()
    for p in model.parameters():
        p.data *= 3  # confident enough predictions that the Fisher is not flat
    torch.manual_seed(1)
    batches = list(torch.randn(1024, 3, 6, 6).split(128))
    conv = model[2]
    probe = DamageProbe(model, batches, images=1024)
    assert probe.images == 1024
    assert probe(conv, conv.weight.detach(), conv.bias.detach()) == pytest.approx(0.0, abs=1e-12)
    noisy = conv.weight.detach() * 1.5
    mean, error = probe.measure(conv, noisy, conv.bias.detach())
    assert mean > 0 and 0 < error < mean and probe.lower_bound(conv, noisy, conv.bias.detach()) == pytest.approx(
        mean - 2 * error)

    stats = collect_stats(model, batches, ["2"], progress=False)["2"]
    sens = output_sensitivity(model, batches, {"2": conv}, progress=False)["2"]
    g = Geometry.of(conv, stats.input_hw, stats.output_hw)
    problem = LayerProblem("2", conv.weight.detach().double(), stats.sigma, stats.mean, g, conv.bias.detach().double(),
                           stats.sigma_pooled)
    for seed in range(3):
        torch.manual_seed(10 + seed)
        approx = problem.weight + 0.02 * problem.weight.norm() * torch.randn_like(problem.weight) / problem.weight.numel() ** 0.5
        predicted = damage(problem, approx, sens, bias_correction=False)
        measured = probe(conv, approx, conv.bias.detach())
        assert 0.6 < measured / predicted < 1.6, (seed, measured, predicted)  # sampled-label Fisher: noisy, unbiased
    with torch.no_grad():
        after = model(batches[0])
    assert torch.equal(after, model(batches[0]))  # the probe leaves the model as it was


def test_probe_needs_images():
    with pytest.raises(ValueError, match="no images"):
        DamageProbe(_model(), [])


def _options() -> list[Option]:
    cost = lambda p: Cost(p, p)  # noqa: E731
    return [Option("dense", (), cost(100)), Option("svd", (1,), cost(10), 1.0), Option("svd", (2,), cost(20), 0.5),
            Option("svd", (4,), cost(60), 0.1), Option("cp", (3,), cost(20), 0.4)]


def test_calibrated_takes_measurements_and_scales_the_rest_by_the_nearest_ratio():
    out = {(o.method, o.ranks): o.damage for o in calibrated(_options(), {("svd", (2,)): 2.0})}
    assert out[("dense", ())] == 0.0
    assert out[("svd", (2,))] == pytest.approx(2.0)  # measured
    assert out[("svd", (1,))] == pytest.approx(4.0) and out[("svd", (4,))] == pytest.approx(0.4)  # ratio 4
    assert out[("cp", (3,))] == pytest.approx(1.6)  # no cp measurement: the nearest of any method
    two = {(o.method, o.ranks): o.damage for o in calibrated(_options(), {("svd", (1,)): 3.0, ("svd", (4,)): 1.0})}
    assert two[("svd", (2,))] == pytest.approx(1.5)  # nearer in cost to rank 1 (ratio 3) than to rank 4 (10)
    assert two[("svd", (4,))] == pytest.approx(1.0)
    lower = {(o.method, o.ranks): o.damage for o in calibrated(_options(), {("svd", (2,)): 0.1})}
    assert lower == {(o.method, o.ranks): o.damage for o in _options()}  # measurements never lower a prediction
    clamped = {(o.method, o.ranks): o.damage for o in calibrated(_options(), {("svd", (2,)): 1e9})}
    assert clamped[("svd", (1,))] == pytest.approx(MEASURED_RATIO_LIMITS[1])
    assert calibrated(_options(), {}) == _options()


class _Residual(nn.Module):
    """A residual block with a layer called twice (probed by full passes) and functional ops for fx to trace."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.shared = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.b(torch.relu(self.a(x))))
        x = self.shared(self.shared(x))
        return self.head(x.mean(dim=(2, 3)))


class _Untraceable(_Residual):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 1
        return super().forward(x)


@pytest.mark.parametrize("model_cls", [_Residual, _Untraceable])
def test_probing_together_gives_the_separate_probes_bit_for_bit(model_cls):
    torch.manual_seed(3)
    model = model_cls().eval()
    batches = list(torch.randn(40, 3, 6, 6).split(16))
    probe = DamageProbe(model, batches, images=40)
    gen = torch.Generator().manual_seed(4)
    replacements = [(m, m.weight.detach() * (1 + 0.3 * torch.randn(m.weight.shape, generator=gen)),
                     None if m.bias is None else m.bias.detach() + 0.1)
                    for m in (model.stem, model.a, model.b, model.shared, model.head, model.a)]
    separate = [probe.measure(*r) for r in replacements]
    if model_cls is _Untraceable:
        with pytest.warns(UserWarning, match="cannot trace"):
            together = probe.measure_many(replacements)
    else:
        together = probe.measure_many(replacements)
        assert probe._traced() is not None and "shared" not in probe._traced().start  # called twice
    assert together == separate and all(mean > 0 for mean, _ in together)
    assert probe.lower_bounds(replacements) == [probe.lower_bound(*r) for r in replacements]
    with torch.no_grad():
        assert torch.equal(model(batches[0]), model(batches[0]))


def test_measuring_replacements_together_is_the_model_with_all_of_them():
    """``measure_together``: one replacement is ``measure``; several are the KL of a model that really has all
    those weights (errors compounding included), and the probed model is left as it was."""
    import copy

    model = _model()
    torch.manual_seed(2)
    batches = list(torch.randn(96, 3, 6, 6).split(32))
    probe = DamageProbe(model, batches, images=96)
    first, second = model[0], model[2]
    w1, w2 = first.weight.detach() * 0.7, second.weight.detach().flip(0)
    b2 = second.bias.detach() + 0.1
    assert probe.measure_together([(second, w2, b2)]) == probe.measure(second, w2, b2)
    together = probe.measure_together([(first, w1, first.bias.detach()), (second, w2, b2)])[0]
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[0].weight.copy_(w1)
        changed[2].weight.copy_(w2)
        changed[2].bias.copy_(b2)
        x = torch.cat(batches)
        log_p, log_q = (torch.log_softmax(m(x).double(), 1) for m in (model, changed))
    assert together == pytest.approx(float((log_p.exp() * (log_p - log_q)).sum(1).mean()), rel=1e-9, abs=1e-12)
    with torch.no_grad():
        assert torch.equal(model(batches[0]), _model()(batches[0]))
    assert "forward" not in first.__dict__ and "forward" not in second.__dict__  # the class's forward again
