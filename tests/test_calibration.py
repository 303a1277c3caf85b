"""The statistics and the sensitivities from one pass (``datd.calibration``): what two passes give."""

import pytest
import torch
from torch import nn

from datd.calibration import statistics_and_sensitivity
from datd.sensitivity import output_sensitivity
from datd.stats import collect_stats


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))


@pytest.mark.parametrize("sensitivity_images", [15, 20, 100])  # inside a batch, at a batch's end, beyond all images
def test_one_pass_gives_the_two_passes_results(sensitivity_images):
    model = _model()
    model.train()  # the pass runs in eval mode and gives the mode back
    x = torch.randn(32, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    batches = [x[:12], x[12:20], (x[20:], torch.zeros(12, dtype=torch.long))]
    layers = {"0": model[0], "3": model[3], "7": model[7]}
    stats, sens = statistics_and_sensitivity(model, batches, layers, layers, sensitivity_images=sensitivity_images,
                                             seed=4, progress=False)
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    reference = collect_stats(model, batches, list(layers), progress=False)
    expected = output_sensitivity(model, batches, layers, max_images=sensitivity_images, seed=4, progress=False)
    assert stats.num_images == reference.num_images == 32
    for name in layers:
        a, b = stats[name], reference[name]
        assert a.count == b.count and a.count_half == b.count_half
        for field in ("sigma", "sigma_half", "mean", "mean_half", "sigma_pooled"):
            got, want = getattr(a, field), getattr(b, field)
            if want is None:  # one position per image (the Linear): no pooled moment apart from Σ
                assert got is None and field == "sigma_pooled"
            elif sensitivity_images == 15:  # a batch split in two: its chunk products differ at float32 round-off
                assert (got - want).abs().max() <= 1e-6 * want.abs().max(), (name, field)
            else:  # the same chunks: the same sums
                assert torch.equal(got, want), (name, field)
        for part in ("total", "pooled", "spread"):  # the same images forward and backward: bit for bit
            assert torch.equal(getattr(sens[name], part), getattr(expected[name], part)), (name, part)


def test_compress_measures_both_in_one_stage():
    import datd

    model = _model().eval()
    x = torch.randn(40, 3, 9, 9, generator=torch.Generator().manual_seed(2))
    fast = dict(target="params=0.7", method="svd", sensitivity_images=24, probe_rounds=0, measure_latency=False,
                progress=False, min_params=10)
    _, report = datd.compress(model, list(x.split(16)), **fast)
    assert "statistics and sensitivity" in report["timings"] and "sensitivity" not in report["timings"]
    stats = datd.collect_stats(model, list(x.split(16)), progress=False)
    _, apart = datd.compress(model, list(x.split(16)), stats=stats, **fast)
    assert "statistics" in apart["timings"] and "sensitivity" in apart["timings"]
    assert [(e.get("method"), e.get("ranks")) for e in report["layers"]] == \
        [(e.get("method"), e.get("ranks")) for e in apart["layers"]]
    assert any(e.get("method") == "svd" for e in report["layers"])  # a plan that compresses something
