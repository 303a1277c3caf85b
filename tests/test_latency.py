"""Latency measurement: interleaved timing, the cache, the rank grid and the per-layer latency model."""

import json

import pytest
import torch
from torch import nn

from datd.latency import (
    LatencyCache, LatencyModel, Measured, Setting, _interpolate, compare, default_cache_path, example_batch, rank_grid,
    time_modules, tune_allocator,
)
from datd.layers import Geometry
from datd.plan import rank_ladder


def test_time_modules_interleaves_and_returns_medians():
    calls = []

    def make(name, work):
        def run(x):
            calls.append(name)
            return x.sum() if work else x
        return run

    x = torch.randn(64, 64)
    times = time_modules({"a": make("a", True), "b": make("b", False)}, x, repeats=5, warmup=1)
    assert set(times) == {"a", "b"} and all(t > 0 for t in times.values())
    assert calls.count("a") == calls.count("b") == 6
    assert calls[2:4] == ["b", "a"]  # the order rotates between rounds
    assert compare({"m": nn.Linear(64, 8).train()}, x, repeats=3)["m"] > 0


def test_example_batch_repeats_samples_to_the_size():
    batch = torch.arange(3.0).reshape(3, 1, 1, 1).expand(3, 2, 2, 2)
    x = example_batch(batch, 7, "channels_last")
    assert x.shape == (7, 2, 2, 2) and x.is_contiguous(memory_format=torch.channels_last)
    assert x[:, 0, 0, 0].tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_cache_round_trip_and_refusal_of_foreign_files(tmp_path):
    path = tmp_path / "cache.json"
    cache = LatencyCache(path)
    cache.put("k", 0.25)
    cache.save()
    assert LatencyCache(path).get("k") == 0.25
    assert LatencyCache(None).get("k") is None
    foreign = tmp_path / "plan.json"
    foreign.write_text(json.dumps({"format": "datd-plan/1", "layers": {}}))
    with pytest.raises(ValueError, match="not a datd latency cache"):
        LatencyCache(foreign)
    assert json.loads(foreign.read_text())["format"] == "datd-plan/1"  # never overwritten
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"format": "datd-latency-cache/1", "entries": {"k": -1}}))
    with pytest.raises(ValueError, match="not a datd latency cache"):
        LatencyCache(broken)


def test_default_cache_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DATD_CACHE_DIR", str(tmp_path))
    assert default_cache_path() == tmp_path / "latency.json"


def test_setting_key_names_what_a_timing_depends_on():
    key = Setting.current("cpu", "channels_last").key()
    assert f"threads={torch.get_num_threads()}" in key and torch.__version__ in key and "channels_last" in key


def test_rank_grid_spans_the_ladder():
    ladder = rank_ladder("cp", Geometry((64, 64, 3, 3), 1, False, (8, 8), (8, 8)), 8)
    grid = rank_grid(ladder, 6)
    assert grid[0] == ladder[0] and grid[-1] == ladder[-1] and len(grid) <= 6
    assert grid == sorted(grid) and set(grid) <= set(ladder)
    assert rank_grid(ladder[:4], 6) == ladder[:4]


def test_interpolation_is_exact_on_the_grid_and_linear_between():
    grid = {(8,): Measured(1.0, "a"), (24,): Measured(3.0, "b")}
    out = _interpolate([(8,), (16,), (24,), (32,)], grid)
    assert out[(8,)] == grid[(8,)] and out[(24,)] == grid[(24,)]
    assert out[(16,)].seconds == pytest.approx(2.0) and out[(16,)].form == "a"
    assert (32,) not in out  # beyond the measured range: left out


def test_latency_model_measures_once_then_reads_the_cache(tmp_path):
    conv = nn.Conv2d(32, 32, 3, padding=1)
    model = LatencyModel("cpu", 4, "contiguous", cache=LatencyCache(tmp_path / "c.json"), repeats=2, grid_points=3)
    ladder = rank_ladder("tucker2", Geometry((32, 32, 3, 3), 1, True, (8, 8), (8, 8)), 8)
    first = model.candidates(conv, (1, 32, 8, 8), "tucker2", ladder)
    assert first and all(m.seconds > 0 and m.form in ("chain", "merge_in", "merge_out") for m in first.values())
    measured = model.measured
    model.save()
    again = LatencyModel("cpu", 4, "contiguous", cache=LatencyCache(tmp_path / "c.json"), repeats=2, grid_points=3)
    assert again.candidates(conv, (1, 32, 8, 8), "tucker2", ladder) == first and again.measured == 0
    assert model.dense(conv, (1, 32, 8, 8)) > 0 and model.measured == measured
    other_batch = LatencyModel("cpu", 8, "contiguous", cache=again.cache, repeats=2)
    other_batch.dense(conv, (1, 32, 8, 8))
    assert other_batch.measured == 1  # another batch size is another measurement


def test_tune_allocator_is_idempotent():
    assert tune_allocator() == tune_allocator()
