"""Σ from hooks against brute-force im2col averages; the statistics file format."""

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import datd.stats as stats_module
from datd.stats import Statistics, collect_stats

D64 = torch.float64


def brute_force_sigma(conv: nn.Conv2d, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Σ, mean, count and the pooled moment Σ̄ (of each image's mean patch) per group, by explicit loops over
    images, output positions and kernel taps."""
    pad = stats_module.conv_pad(conv)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(images.double(), pad, mode=mode)
    (kh, kw), (sh, sw), (dh, dw), g = conv.kernel_size, conv.stride, conv.dilation, conv.groups
    per_group = conv.in_channels // g
    out_h = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    dim = per_group * kh * kw
    sigma, mean, count = torch.zeros(g, dim, dim, dtype=D64), torch.zeros(g, dim, dtype=D64), 0
    pooled = torch.zeros(g, dim, dim, dtype=D64)
    for n in range(x.shape[0]):
        image_sum = torch.zeros(g, dim, dtype=D64)
        for oy in range(out_h):
            for ox in range(out_w):
                count += 1
                for grp in range(g):
                    patch = torch.stack([
                        x[n, grp * per_group + c, oy * sh + i * dh, ox * sw + j * dw]
                        for c in range(per_group) for i in range(kh) for j in range(kw)
                    ])
                    sigma[grp] += torch.outer(patch, patch)
                    mean[grp] += patch
                    image_sum[grp] += patch
        image_mean = image_sum / (out_h * out_w)
        pooled += image_mean[:, :, None] * image_mean[:, None, :]
    return sigma / count, mean / count, count, pooled / x.shape[0]


CONVS = {
    "stride2-pad1-dil2-groups2": dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, dilation=2, groups=2),
    "same": dict(in_channels=3, out_channels=5, kernel_size=(3, 2), padding="same"),
    "same-dilated": dict(in_channels=2, out_channels=4, kernel_size=3, padding="same", dilation=2),
    "valid-rect-stride": dict(in_channels=3, out_channels=4, kernel_size=(1, 3), stride=(2, 1), padding=(0, 2)),
    "reflect": dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
    "depthwise": dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),
    "grouped-wide-stride2": dict(in_channels=16, out_channels=8, kernel_size=(3, 5), stride=2, padding=(1, 2), groups=2),
    "pointwise": dict(in_channels=7, out_channels=4, kernel_size=1),
    "pointwise-stride2-grouped": dict(in_channels=8, out_channels=4, kernel_size=1, stride=2, groups=2),
}


@pytest.mark.parametrize("path", ["shifts", "shifts, folds apart", "im2col"])
@pytest.mark.parametrize("name", CONVS)
def test_conv_sigma_equals_brute_force_im2col(name, path, monkeypatch):
    """Both formulations of the patch moments (shifted cross-correlations: the folds as sets of one call, or in a
    call each; im2col) against explicit loops; the im2col Gram products in block rows of a few columns
    (``_upper_gram``: on tap boundaries, only the blocks on and above the diagonal formed)."""
    monkeypatch.setattr(stats_module, "prefers_shifts", lambda geometry, channels: path.startswith("shifts"))
    monkeypatch.setattr(stats_module, "FOLDS_APART", 0 if path == "shifts, folds apart" else 1 << 62)
    monkeypatch.setattr(stats_module, "_GRAM_BLOCK", 5)
    torch.manual_seed(0)
    conv = nn.Conv2d(**CONVS[name])
    images = torch.randn(5, conv.in_channels, 9, 8)
    batches = [images[:2], (images[2:], torch.zeros(3))]  # plain tensors and (input, label) pairs
    stats = collect_stats(nn.Sequential(conv), batches, progress=False)["0"]
    sigma, mean, count, pooled = brute_force_sigma(conv, images)
    if conv.groups == 1:
        sigma, mean, pooled = sigma[0], mean[0], pooled[0]
    assert stats.count == count
    assert stats.sigma.dtype == D64 and stats.sigma.shape == sigma.shape
    assert torch.allclose(stats.sigma, sigma, rtol=1e-5, atol=1e-6)
    assert torch.allclose(stats.mean, mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(stats.sigma_pooled, pooled, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        out = conv(images)
    assert stats.output_hw == tuple(out.shape[2:]) and stats.input_hw == (9, 8)
    # the cross-validation fold: the even-numbered images, counted across batches (2 + 3 images: 0, 2, 4)
    sigma_a, mean_a, count_a, _ = brute_force_sigma(conv, images[0::2])
    if conv.groups == 1:
        sigma_a, mean_a = sigma_a[0], mean_a[0]
    assert stats.count_half == count_a
    assert torch.allclose(stats.sigma_half, sigma_a, rtol=1e-5, atol=1e-6)
    assert torch.allclose(stats.mean_half, mean_a, rtol=1e-5, atol=1e-6)


def test_linear_on_3d_input_uses_every_row(monkeypatch):
    monkeypatch.setattr(stats_module, "_GRAM_BLOCK", 4)  # two block rows of the Gram product (4 + 2 columns)
    torch.manual_seed(1)
    lin = nn.Linear(6, 3)
    x = torch.randn(4, 7, 6)
    stats = collect_stats(nn.Sequential(lin), [x[:3], x[3:]], progress=False)["0"]
    rows = x.reshape(-1, 6).double()
    assert stats.count == 28 and stats.output_hw == (7, 1)
    assert torch.allclose(stats.sigma, rows.T @ rows / 28, atol=1e-6)
    assert torch.allclose(stats.mean, rows.mean(0), atol=1e-6)
    per_sample = x.double().mean(dim=1)
    assert torch.allclose(stats.sigma_pooled, per_sample.T @ per_sample / 4, atol=1e-6)
    even = x[0::2].reshape(-1, 6).double()  # samples 0 and 2 (the second batch starts at an odd number)
    assert stats.count_half == 14
    assert torch.allclose(stats.sigma_half, even.T @ even / 14, atol=1e-6)
    assert torch.allclose(stats.mean_half, even.mean(0), atol=1e-6)


def test_chunking_and_batching_do_not_change_sigma(monkeypatch):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2), nn.Flatten(), nn.LazyLinear(5))
    images = torch.randn(12, 3, 10, 10)
    model(images)
    # in float64 products, so that only the arithmetic of chunks is compared (float32 rounding: the test below)
    whole = collect_stats(model, [images], progress=False, precision="float64")
    monkeypatch.setattr(stats_module, "_CHUNK_ELEMENTS", 500)
    pieces = collect_stats(model, images.split(5), progress=False, precision="float64")
    for name in whole:
        assert whole[name].count == pieces[name].count
        assert torch.allclose(whole[name].sigma, pieces[name].sigma, rtol=1e-10, atol=1e-12)
        assert whole[name].count_half == pieces[name].count_half
        assert torch.allclose(whole[name].sigma_half, pieces[name].sigma_half, rtol=1e-10, atol=1e-12)
        if name == "4":  # the Linear sees one position per image: its pooled moment is Σ itself, not stored
            assert whole[name].sigma_pooled is None and pieces[name].sigma_pooled is None
        else:
            assert torch.allclose(whole[name].sigma_pooled, pieces[name].sigma_pooled, rtol=1e-10, atol=1e-12)


def test_layer_selection_by_name_and_filter():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
    data = [torch.randn(2, 3, 6, 6)]
    assert set(collect_stats(model, data, ["2"], progress=False)) == {"2"}
    only_3x3 = collect_stats(model, data, lambda m, n: m.kernel_size == (3, 3), progress=False)
    assert set(only_3x3) == {"0"}
    with pytest.raises(ValueError, match="'1' is a ReLU"):
        collect_stats(model, data, ["1"], progress=False)
    with pytest.raises(ValueError, match="'9' is not in the model"):
        collect_stats(model, data, ["9"], progress=False)


def test_save_load_roundtrip_and_mismatch(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.ReLU(), nn.Conv2d(4, 6, 3, groups=2))
    stats = collect_stats(model, [torch.randn(3, 3, 8, 8)], description="random test images", progress=False)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = Statistics.load(path, model)
    assert loaded.num_images == 3 and loaded.description == "random test images"
    for name in stats:
        assert torch.equal(loaded[name].sigma, stats[name].sigma)
        assert torch.equal(loaded[name].sigma_pooled, stats[name].sigma_pooled)
        assert torch.equal(loaded[name].sigma_half, stats[name].sigma_half)
        assert torch.equal(loaded[name].mean_half, stats[name].mean_half)
        assert loaded[name].meta() == stats[name].meta()
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(ValueError, match="layer '2'"):
        Statistics.load(path, other)
    with pytest.raises(ValueError, match="'0' is not in the model"):
        Statistics.load(path, nn.Sequential())
    with pytest.raises(FileNotFoundError):
        Statistics.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read statistics"):
        Statistics.load(tmp_path / "junk.safetensors")


def test_failed_save_leaves_existing_file(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    stats = collect_stats(model, [torch.randn(2, 3, 5, 5)], progress=False)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(stats_module, "save_file", broken)
    with pytest.raises(OSError):
        stats.save(path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_non_finite_inputs_and_empty_data_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="non-finite"):
        collect_stats(model, [torch.full((1, 3, 5, 5), float("nan"))], progress=False)
    with pytest.raises(ValueError, match="non-finite"):  # finite inputs whose squares overflow float32
        collect_stats(model, [torch.full((1, 3, 5, 5), 1e30)], progress=False)
    with pytest.raises(ValueError, match="no batches"):
        collect_stats(model, [], progress=False)
    with pytest.raises(TypeError, match="input tensor"):
        collect_stats(model, [{"foo": 1}], progress=False)


def _distributed_worker(rank: int, world: int, port: int, images: torch.Tensor, path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, stride=2))
        stats = collect_stats(model, [images[rank::world]], progress=False)
        if rank == 0:
            stats.save(path)
    finally:
        dist.destroy_process_group()


def test_statistics_all_reduce_under_torch_distributed(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    images = torch.randn(10, 3, 8, 8)
    path = str(tmp_path / "dist.safetensors")
    mp.spawn(_distributed_worker, args=(2, port, images, path), nprocs=2, join=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, stride=2))
    single = collect_stats(model, [images], progress=False)
    merged = Statistics.load(path, model)
    assert merged.num_images == 10
    for name in single:
        assert merged[name].count == single[name].count
        assert torch.allclose(merged[name].sigma, single[name].sigma, atol=1e-6)


def test_float32_products_stay_within_a_bounded_distance_of_the_float64_reference():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 24 * 24, 10)).eval()
    images = torch.randn(96, 3, 24, 24) + 0.5  # post-ReLU inputs with a mean: the covariance cancels Σ − μμᵀ
    batches = images.split(32)
    fast = collect_stats(model, batches, progress=False)
    exact = collect_stats(model, batches, progress=False, precision="float64")
    for name in exact:
        for key in ("sigma", "sigma_half", "sigma_pooled"):
            a, b = getattr(fast[name], key), getattr(exact[name], key)
            if b is not None:
                assert float((a - b).norm() / b.norm()) < 1e-6, (name, key)
        cov_fast, cov_exact = fast[name].covariance(), exact[name].covariance()
        assert float((cov_fast - cov_exact).norm() / cov_exact.norm()) < 1e-5, name
    with pytest.raises(ValueError, match="precision"):
        collect_stats(model, batches, progress=False, precision="float16")


def test_sums_bytes_is_what_collect_stats_keeps(monkeypatch):
    """The dry run's estimate equals the float64 sums the accumulators really hold (pooled part and the shifted
    path's term sums included)."""
    import datd.stats as st
    from datd.models import load_model

    model = load_model("cifar_resnet20").model
    x = torch.randn(8, 3, 32, 32)
    estimate = st.sums_bytes(model, x)
    held = {}
    result = st._Accumulator.result

    def measured(self):
        tensors = [self.sum_outer, self.sum, self.sum_pooled, self.terms]
        held[self.name] = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return result(self)

    monkeypatch.setattr(st._Accumulator, "result", measured)
    st.collect_stats(model, [x], progress=False)
    assert estimate == held and len(held) == 20


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, padding=1),
    nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2),
    nn.Conv2d(6, 6, (3, 2), padding=(1, 0), groups=3),
    nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
])
def test_drawn_positions_are_im2col_columns(conv):
    """The sampler's columns are conv_patches' columns at the drawn positions: all of them (in some order) when
    every position is drawn, and each one a column of its own image otherwise."""
    x = torch.randn(3, conv.in_channels, 9, 10, dtype=D64)
    full, _ = stats_module.conv_patches(conv, x)  # (N, G, D, L)
    sampler = stats_module.PositionSampler(0.5, seed=1, device=torch.device("cpu"))
    every = sampler.patches(conv, x, full.shape[-1])
    assert torch.allclose(every @ every.transpose(2, 3), full @ full.transpose(2, 3), atol=1e-10)
    assert torch.allclose(every.sum(dim=3), full.sum(dim=3), atol=1e-10)
    some = sampler.patches(conv, x, 5)
    assert some.shape == (*full.shape[:3], 5)
    distance = torch.cdist(some.transpose(2, 3), full.transpose(2, 3), compute_mode="donot_use_mm_for_euclid_dist")
    assert float(distance.min(dim=3).values.max()) < 1e-12
    assert len({tuple(c.tolist()) for c in some[0, 0].T}) == 5  # drawn without replacement


def test_drawn_positions_give_unbiased_moments_reproducibly():
    """Σ and μ from a quarter of the positions average (over seeds) to the all-position moments, much closer than any
    one draw is; a seed gives the same statistics every time; maps of at most MIN_POSITIONS positions are whole."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Conv2d(4, 4, 3, padding=1))
    images = torch.randn(8, 3, 32, 32).relu()  # 1024 positions in the first conv, 64 in the second
    exact = collect_stats(model, [images], progress=False)
    draws = [collect_stats(model, [images], progress=False, positions=0.25, seed=s) for s in range(60)]
    sigma, mean = exact["0"].sigma, exact["0"].mean
    errors = [float((d["0"].sigma - sigma).norm() / sigma.norm()) for d in draws]
    average = torch.stack([d["0"].sigma for d in draws]).mean(dim=0)
    assert float((average - sigma).norm() / sigma.norm()) < 0.3 * sorted(errors)[len(errors) // 2]
    average_mean = torch.stack([d["0"].mean for d in draws]).mean(dim=0)
    assert float((average_mean - mean).norm() / mean.norm()) < 0.3 * float((draws[0]["0"].mean - mean).norm() / mean.norm())
    assert draws[0]["0"].count == 8 * 256 and exact["0"].count == 8 * 1024
    again = collect_stats(model, [images], progress=False, positions=0.25, seed=0)
    assert torch.equal(again["0"].sigma, draws[0]["0"].sigma) and not torch.equal(draws[1]["0"].sigma, draws[0]["0"].sigma)
    assert torch.allclose(draws[0]["3"].sigma, exact["3"].sigma, rtol=1e-6, atol=1e-9)  # 8×8: kept whole
    assert "0.25 of each conv's positions drawn" in draws[0].description
    with pytest.raises(ValueError, match="positions"):
        collect_stats(model, [images], progress=False, positions=0)
