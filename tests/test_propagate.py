"""Propagated (error-compensating) fits: the corrected problem and what it buys (datd.propagate)."""

import copy
import dataclasses

import pytest
import torch
from torch import Tensor, nn

import datd
from datd.fitting import FitSettings, LayerProblem, fit
from datd.layers import Geometry, factorize
from datd.propagate import call_order, corrected_problem, paired_statistics
from datd.report import markdown
from datd.stats import collect_stats, conv_patches
from datd.surgery import replace_module

D64 = torch.float64


def _problem(model: nn.Module, name: str, stats) -> LayerProblem:
    module, s = model.get_submodule(name), stats[name]
    return LayerProblem(name, module.weight.detach().double(), s.sigma, s.mean,
                        Geometry.of(module, s.input_hw, s.output_hw), module.bias.detach().double())


def test_without_earlier_compression_the_corrected_problem_is_the_layer_itself():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, groups=2)).eval()
    images = torch.randn(6, 3, 9, 9)
    stats = collect_stats(model, [images], progress=False)
    order, calls = call_order(model, ["2", "0"], images[:1])
    assert order == ["0", "2"] and calls == {"0": 1, "2": 1}
    paired = paired_statistics(model, copy.deepcopy(model), ["2"], calls, [images[:4], images[4:]])["2"]
    assert torch.allclose(paired.cross, paired.sigma) and torch.allclose(paired.sigma, stats["2"].sigma)
    plain = _problem(model, "2", stats)
    corrected = corrected_problem(plain, paired, bias_correction=True)
    assert torch.allclose(corrected.weight, plain.weight, atol=1e-10)
    approx = fit(corrected, "svd", (2,), FitSettings()).reconstruct()
    assert torch.allclose(corrected.corrected_bias(approx, True), plain.corrected_bias(approx, True), atol=1e-10)


def test_the_propagated_fit_compensates_the_error_of_the_layers_before():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12)).eval()
    x = torch.randn(400, 20) @ torch.randn(20, 20)
    stats = collect_stats(model, [x], progress=False)
    settings = FitSettings()
    compressed = copy.deepcopy(model)
    first = _problem(model, "0", stats)
    d = fit(first, "svd", (5,), settings)
    replace_module(compressed, "0", factorize(model[0], d, first.corrected_bias(d.reconstruct(), True).float()))
    _, calls = call_order(model, ["2"], x[:1])
    paired = paired_statistics(model, compressed, ["2"], calls, [x])["2"]
    plain_problem = _problem(model, "2", stats)
    with torch.no_grad():
        target, received = model(x).double(), compressed[1](compressed[0](x))

    def output_error(problem: LayerProblem) -> float:
        decomposition = fit(problem, "svd", (6,), settings)
        layer = factorize(model[2], decomposition, problem.corrected_bias(decomposition.reconstruct(), True).float())
        with torch.no_grad():
            return float(((layer(received).double() - target) ** 2).mean())

    plain = output_error(plain_problem)
    propagated = output_error(corrected_problem(plain_problem, paired, bias_correction=True, ridge=1e-8))
    assert propagated < 0.95 * plain


def test_compress_with_propagate_keeps_the_plan_and_tracks_the_original_closer():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 10)).eval()
    images = torch.randn(64, 3, 10, 10)
    calib = [images[:32], images[32:]]
    common = dict(target="params=0.4", method="tucker2", ranks="uniform", progress=False, measure_latency=False,
                  min_params=500, max_iter=10)
    plain, report = datd.compress(model, calib, **common)
    propagated, report_p = datd.compress(model, calib, propagate=True, **common)
    assert report_p["plan"] == report["plan"]
    assert all(l["propagated"] for l in report_p["layers"] if "method" in l)
    with torch.no_grad():
        reference = model(images)
        errors = [float(((m(images) - reference) ** 2).mean()) for m in (plain, propagated)]
    assert errors[1] < errors[0]
    assert "propagated fits: paired statistics from all calibration images" in markdown(report_p)
    assert "propagated fits" not in markdown(report)
    # from the first 32 images only: the same plan, other fits, and the report says so
    capped, report_c = datd.compress(model, calib, propagate=True, propagate_images=32, **common)
    assert report_c["plan"] == report["plan"]
    assert not torch.equal(capped(images), propagated(images))
    assert "paired statistics from the first 32 calibration images" in markdown(report_c)


def test_paired_moments_in_float32_chunks_match_a_float64_reference():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 12, 3, padding=1)).eval()
    compressed = copy.deepcopy(model)
    with torch.no_grad():
        compressed[0].weight.add_(0.1 * torch.randn_like(compressed[0].weight))  # x̃ differs from x
    images = torch.rand(16, 3, 12, 12)
    _, calls = call_order(model, ["2"], images[:1])
    fast = paired_statistics(model, compressed, ["2"], calls, [images[:8], images[8:]], chunk_elements=5000)["2"]
    exact = paired_statistics(model.double(), compressed.double(), ["2"], calls, [images.double()])["2"]
    for a, b in ((fast.sigma, exact.sigma), (fast.cross, exact.cross), (fast.mean_tilde, exact.mean_tilde)):
        assert a.dtype == torch.float64
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()
    assert not torch.allclose(exact.cross, exact.sigma, rtol=1e-3)


def test_joint_patch_moments_match_im2col_pairs_for_plain_and_grouped_convs(monkeypatch):
    """The shifted path on [x; x̃] (propagate._Joint) gives the moments of the im2col pairs (propagate._Sums)."""
    import datd.propagate as propagate

    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1, stride=2, groups=2)).double().eval()
    compressed = copy.deepcopy(model)
    with torch.no_grad():
        compressed[0].weight.add_(0.1 * torch.randn_like(compressed[0].weight))
    images = torch.rand(6, 3, 16, 16, dtype=D64)
    names = ["2", "4"]
    _, calls = call_order(model, names, images[:1])
    assert all(propagate._Joint.suits(model.get_submodule(n), torch.zeros(1, 64, 16, 16)) for n in names)
    joint = paired_statistics(model, compressed, names, calls, [images[:4], images[4:]])
    monkeypatch.setattr(propagate, "_JOINT_BYTES", 0)
    pairs = paired_statistics(model, compressed, names, calls, [images])
    for name in names:
        a, b = joint[name], pairs[name]
        assert a.count == b.count
        for x, y in ((a.sigma, b.sigma), (a.cross, b.cross), (a.mean, b.mean), (a.mean_tilde, b.mean_tilde)):
            assert x.shape == y.shape
            assert torch.allclose(x, y, rtol=1e-10, atol=1e-12)


class _Block(nn.Module):
    """A residual block with in-place operations on values that passes may start from."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        x.add_(self.conv2(out))  # changes the block's input, which the passes may have kept (fx traces
        # `x += …` as an addition that is not in place)
        return self.relu(x)


def _randomized(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("group", [1, 2])
def test_passes_from_kept_values_give_the_statistics_of_full_passes_as_layers_are_installed(group):
    """PairedPasses (the values at the next layers' entry kept per batch, moved on once per group) gives the
    paired statistics of full passes bit for bit, through in-place operations on kept values (a group of two
    runs past the block's ``x +=``), a pruned chain (its entry is its producer) and layers installed between
    the groups."""
    from datd.propagate import PairedPasses

    model = _randomized(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), _Block(16), _Block(16),
                                      nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.ReLU(), nn.Conv2d(24, 8, 1),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)), 5)
    compressed = copy.deepcopy(model)
    images = [torch.randn(4, 3, 12, 12), torch.randn(3, 3, 12, 12)]
    names = ["0", "2.conv1", "2.conv2", "3.conv1", "3.conv2", "4", "7", "10"]
    order, calls = call_order(model, names, images[0][:1])
    assert order == names
    # "7" prunes 24 -> 16 channels of its chain 4 -> 5 (BatchNorm) -> 7: its entry is "4"'s node
    touches = {n: [n] for n in names} | {"7": ["7", "4", "5"]}
    passes = PairedPasses(model, compressed, images, touches)
    assert passes.graph is not None
    fitted = [n for n in order if n != "4"]  # the producer of a pruned chain stays dense
    for k in range(0, len(fitted), group):
        names = fitted[k:k + group]
        fast = passes.statistics(names, calls, fitted[k:])
        full = paired_statistics(model, compressed, names, calls, images)
        for name in names:
            for x, y in ((fast[name].sigma, full[name].sigma), (fast[name].cross, full[name].cross),
                         (fast[name].mean_tilde, full[name].mean_tilde)):
                assert torch.equal(x, y), name
        for name in names:
            _install(compressed, name)
    assert passes.position > 0 and passes.kept is not None


def _install(compressed: nn.Module, name: str) -> None:
    """Stand-in for a fit: a changed weight, or for "7" its chain 4 -> 5 -> 7 pruned to 16 channels."""
    with torch.no_grad():
        if name != "7":
            layer = compressed.get_submodule(name)
            layer.weight.mul_(1 + 0.2 * torch.randn_like(layer.weight))
            return
        keep = torch.arange(16)
        producer, bn, consumer = compressed[4], compressed[5], compressed[7]
        small = nn.Conv2d(16, 16, 1)
        small.weight.copy_(producer.weight[keep]), small.bias.copy_(producer.bias[keep])
        replace_module(compressed, "4", small)
        norm = nn.BatchNorm2d(16).eval()
        for attr in ("weight", "bias", "running_mean", "running_var"):
            getattr(norm, attr).copy_(getattr(bn, attr)[keep])
        replace_module(compressed, "5", norm)
        reader = nn.Conv2d(16, 8, 1)
        reader.weight.copy_(consumer.weight[:, keep]), reader.bias.copy_(consumer.bias)
        replace_module(compressed, "7", reader)


class _Branching(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if y.mean() > 0:
            y = y * 2
        return self.head(y.mean(dim=(2, 3)))


def test_a_model_fx_cannot_trace_gets_passes_from_the_images():
    from datd.propagate import PairedPasses

    torch.manual_seed(0)
    model = _Branching().eval()
    compressed = copy.deepcopy(model)
    images = [torch.randn(5, 3, 8, 8)]
    _, calls = call_order(model, ["conv", "head"], images[0])
    passes = PairedPasses(model, compressed, images, {"conv": ["conv"], "head": ["head"]})
    assert passes.graph is None
    _install(compressed, "conv")
    fast = passes.statistics(["head"], calls, ["head"])["head"]
    full = paired_statistics(model, compressed, ["head"], calls, images)["head"]
    assert torch.equal(fast.cross, full.cross) and not torch.equal(full.cross, full.sigma)


class _Residual(nn.Module):
    """conv1 → BN → ReLU → conv2 → BN, added to the block's input (grouped / reflect-padded conv2 on request)."""

    def __init__(self, channels: int, groups: int = 1, padding_mode: str = "zeros"):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=groups, bias=False, padding_mode=padding_mode)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


@pytest.mark.parametrize("groups,padding_mode", [(1, "zeros"), (2, "reflect")])
def test_residual_compensation_moments_match_im2col_and_take_up_the_shortcut_error(groups, padding_mode):
    """The last conv of a residual block gets E[d x̃ᵀ] and E[d] of d = (o − õ)·a/(a² + δ), o the block's input
    (the add's other value) and a bn2's scale, equal to those formed from im2col patches; its corrected weight
    (full rank) reproduces the block's sum better than the correction without them."""
    import datd.propagate as propagate
    from datd.graph import affine_scale
    from datd.propagate import PairedPasses

    model = _randomized(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _Residual(8),
                                      _Residual(8, groups, padding_mode), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(8, 5)), 6).double()
    compressed = copy.deepcopy(model)
    images = [torch.rand(5, 3, 10, 10, dtype=D64), torch.rand(4, 3, 10, 10, dtype=D64)]
    names = ["0", "2.conv1", "2.conv2", "3.conv1", "3.conv2", "6"]
    _, calls = call_order(model, names, images[0][:1])
    passes = PairedPasses(model, compressed, images, {n: [n] for n in names})
    assert set(passes.sinks) == {"2.conv2", "3.conv2"} and passes.sinks["3.conv2"].affine == ("3.bn2",)
    torch.manual_seed(7)
    with torch.no_grad():  # stand-ins for the fits before: the block's input and conv2's input both change
        for name in ("0", "2.conv2", "3.conv1"):
            w = compressed.get_submodule(name).weight
            w.mul_(1 + 0.3 * torch.randn_like(w))
    paired = passes.statistics(["3.conv2"], calls, ["3.conv2", "6"])["3.conv2"]
    assert paired.residual is not None

    # the same moments from the blocks' values and im2col patches
    def values(m: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        seen = {}
        hooks = [m[3].register_forward_pre_hook(lambda _, a: seen.update(o=a[0])),
                 m[3].conv2.register_forward_pre_hook(lambda _, a: seen.update(x=a[0]))]
        with torch.no_grad():
            m(x)
        for h in hooks:
            h.remove()
        return seen["o"], seen["x"]

    scale = affine_scale([model[3].bn2])
    factor = scale / (scale.square() + propagate._DAMPING * scale.square().mean())
    cross, total, count = 0, 0, 0
    for x in images:
        (o, _), (ot, xt) = values(model, x), values(compressed, x)
        d = ((o - ot) * factor[None, :, None, None]).flatten(2)  # (N, T, L)
        cols, _ = conv_patches(model[3].conv2, xt)  # (N, G, D, L)
        rows = 8 // groups
        cross += torch.cat([torch.einsum("ntl,ndl->td", d[:, g * rows:(g + 1) * rows], cols[:, g])
                            for g in range(groups)])
        total, count = total + d.sum(dim=(0, 2)), count + d.shape[0] * d.shape[2]
    assert torch.allclose(paired.residual.cross, cross / count, rtol=1e-10, atol=1e-14)
    assert torch.allclose(paired.residual.mean, total / count, rtol=1e-10, atol=1e-14)

    # the block's sum (before its ReLU) with conv2 at full rank: closer to the original's with the compensation
    stats = collect_stats(model, images, progress=False)
    conv, s = model[3].conv2, stats["3.conv2"]
    plain = LayerProblem("3.conv2", conv.weight.detach(), s.sigma, s.mean, Geometry.of(conv, s.input_hw, s.output_hw),
                         torch.zeros(8, dtype=D64))

    def sum_error(problem: LayerProblem) -> float:
        errors = []
        for x in images:
            block, block_t = model[3], copy.deepcopy(compressed[3])
            with torch.no_grad():
                block_t.conv2.weight.copy_(problem.weight)
                block_t.conv2.bias = nn.Parameter(problem.corrected_bias(problem.weight, True))
                (o, xi), (ot, xti) = values(model, x), values(compressed, x)
                errors.append(float(((block.bn2(block.conv2(xi)) + o - block_t.bn2(block_t.conv2(xti)) - ot) ** 2)
                                    .sum()))
        return sum(errors)

    without = dataclasses.replace(paired, residual=None)
    compensated = sum_error(corrected_problem(plain, paired, True, ridge=1e-9))
    assert compensated < 0.9 * sum_error(corrected_problem(plain, without, True, ridge=1e-9))


def test_residual_sinks_of_torchvision_blocks():
    """Every ResNet block's last conv and its downsample conv, and each inverted residual's projection that is added
    to the block's input, reach their add through their BatchNorm alone; nothing else does."""
    import torchvision

    from datd.graph import TracedModel

    resnet = torchvision.models.resnet18().eval()
    names = [n for n, m in resnet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    sinks = TracedModel(resnet).sinks(names, resnet)
    assert set(sinks) == {f"layer{s}.{b}.conv2" for s in range(1, 5) for b in range(2)} | {
        f"layer{s}.0.downsample.0" for s in range(2, 5)}
    assert sinks["layer2.0.conv2"].affine == ("layer2.0.bn2",)
    mobilenet = torchvision.models.mobilenet_v2().eval()
    names = [n for n, m in mobilenet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    sinks = TracedModel(mobilenet).sinks(names, mobilenet)
    residual = [i for i, f in enumerate(mobilenet.features) if getattr(f, "use_res_connect", False)]
    assert len(residual) == 10 and set(sinks) == {f"features.{i}.conv.{len(mobilenet.features[i].conv) - 2}"
                                                  for i in residual}
    mobilenet.train()  # BatchNorms in training mode are no fixed per-channel scale
    assert not TracedModel(mobilenet).sinks(names, mobilenet)


def test_passes_that_outgrow_the_kept_values_bound_run_from_the_images_on_the_graph(monkeypatch):
    """With no room for kept values, every pass starts from the images, still on the traced graph: the same
    statistics as full passes, and the residual compensation is kept."""
    import datd.propagate as propagate
    from datd.propagate import PairedPasses

    monkeypatch.setattr(propagate, "_ACTIVATION_BYTES", 0)
    model = _randomized(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _Residual(8), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten(), nn.Linear(8, 5)), 8)
    compressed = copy.deepcopy(model)
    images = [torch.rand(4, 3, 10, 10), torch.rand(3, 3, 10, 10)]
    names = ["0", "2.conv1", "2.conv2", "5"]
    _, calls = call_order(model, names, images[0][:1])
    passes = PairedPasses(model, compressed, images, {n: [n] for n in names})
    with torch.no_grad():
        compressed[0].weight.mul_(1.2)
    fast = passes.statistics(["2.conv2"], calls, ["2.conv2", "5"])["2.conv2"]
    full = paired_statistics(model, compressed, ["2.conv2"], calls, images)["2.conv2"]
    assert passes.spilled and passes.kept is None and passes.graph is not None
    assert torch.equal(fast.sigma, full.sigma) and torch.equal(fast.cross, full.cross)
    assert fast.residual is not None and full.residual is None


@pytest.mark.parametrize("kept", [True, False])
def test_propagate_images_takes_the_paired_statistics_from_the_first_images(kept, monkeypatch):
    """BatchCache(images=N) yields the first N calibration images, across and within batches, whether it keeps
    them in memory or reads them again on every pass; the paired statistics over it equal those over a loader of
    only those images, and differ from those over all of them."""
    import datd.propagate as propagate

    if not kept:
        monkeypatch.setattr(propagate, "_BATCH_CACHE_BYTES", 0)
    torch.manual_seed(0)
    model = _randomized(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _Block(8),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)), 5)
    compressed = copy.deepcopy(model)
    images = [(torch.randn(4, 3, 10, 10), torch.zeros(4)) for _ in range(3)]  # (x, y) batches, as a loader gives
    cache = propagate.BatchCache(images, torch.device("cpu"), images=6)
    assert (cache.kept is not None) == kept
    first = torch.cat([x for x, _ in images])[:6]
    for _ in range(2):  # every pass sees the same images
        assert torch.equal(torch.cat(list(cache)), first)
    names = ["0", "2.conv1", "2.conv2", "5"]
    _, calls = call_order(model, names, first[:1])
    _install(compressed, "0")
    capped = propagate.PairedPasses(model, compressed, cache, {n: [n] for n in names}).statistics(
        ["2.conv1", "5"], calls, names[1:])
    alone = paired_statistics(model, compressed, ["2.conv1", "5"], calls, [first[:4], first[4:]])
    everything = paired_statistics(model, compressed, ["2.conv1", "5"], calls, [x for x, _ in images])
    for name in ("2.conv1", "5"):
        assert capped[name].count == alone[name].count < everything[name].count
        for field in ("sigma", "cross", "mean_tilde"):
            torch.testing.assert_close(getattr(capped[name], field), getattr(alone[name], field), rtol=1e-10,
                                       atol=1e-12)
        assert not torch.allclose(capped[name].sigma, everything[name].sigma)


@pytest.mark.parametrize("field,value", [("propagate_images", -1), ("propagate_group", 0), ("propagate_ridge", -1e-3)])
def test_propagation_settings_are_checked(field, value):
    from datd.errors import DatdError

    with pytest.raises(DatdError, match=field):
        datd.CompressConfig(**{field: value})
