"""Fits in forked worker processes (``datd.workers``): the same factors as one thread here, for any worker count."""

import dataclasses
import functools

import pytest
import torch

import datd
from datd.decompose import Grouped
from datd.fitting import FitSettings, LayerProblem, fit
from datd.layers import Geometry
from datd.workers import can_fork, fit_many, resolve_workers

pytestmark = pytest.mark.skipif(not can_fork(), reason="fits fork only on Linux; elsewhere they run in-process")


def _problem(out_channels: int, in_channels: int, groups: int = 1, seed: int = 0) -> LayerProblem:
    gen = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1, groups=groups, bias=False)
    conv.weight.data = torch.randn(conv.weight.shape, generator=gen)
    d = in_channels // groups * 9
    x = torch.randn(groups, 4 * d, d, generator=gen, dtype=torch.float64)
    sigma = x.transpose(1, 2) @ x / x.shape[1]
    mean = x.mean(dim=1)
    geometry = dataclasses.replace(Geometry.of(conv, (8, 8), (8, 8)), input_channels=in_channels)
    if groups == 1:
        sigma, mean = sigma[0], mean[0]
    return LayerProblem("conv", conv.weight.detach().double(), sigma, mean, geometry, None)


def _jobs() -> dict:
    settings = FitSettings(max_iter=4)
    return {
        "tucker2": functools.partial(fit, _problem(24, 16), "tucker2", (8, 6), settings),
        "cp": functools.partial(fit, _problem(16, 24, seed=1), "cp", (12,), settings),
        "grouped cp": functools.partial(fit, _problem(16, 16, groups=2, seed=2), "cp", (5,), settings),
        "svd": functools.partial(fit, _problem(20, 12, seed=3), "svd", (7,), settings),
        "prune": functools.partial(fit, _problem(20, 12, seed=4), "prune", (5,), settings),
    }


def _same(a, b) -> bool:
    if isinstance(a, Grouped):
        return isinstance(b, Grouped) and len(a.parts) == len(b.parts) and all(map(_same, a.parts, b.parts))
    fa, fb = a.factors(), b.factors()
    return (type(a) is type(b) and a.shape == b.shape and a.history == b.history and fa.keys() == fb.keys()
            and all(torch.equal(fa[k], fb[k]) and fa[k].dtype == fb[k].dtype for k in fa))


def test_workers_give_the_factors_of_one_thread_here_for_any_worker_count():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = {k: job() for k, job in _jobs().items()}
    finally:
        torch.set_num_threads(threads)
    for workers in (2, 3):
        forked = fit_many(_jobs(), workers, cost=lambda k: len(k))
        assert forked.keys() == here.keys()
        assert all(_same(forked[k], here[k]) for k in here), workers
    assert torch.get_num_threads() == threads  # the workers' one thread stays theirs


def test_one_worker_a_single_job_or_a_gpu_run_stays_in_this_process(monkeypatch):
    import datd.workers as workers

    monkeypatch.setattr(workers.multiprocessing, "get_context", lambda *_: pytest.fail("forked"))
    jobs = _jobs()
    assert set(fit_many(jobs, 1)) == set(jobs)
    assert set(fit_many({"cp": jobs["cp"]}, 4)) == {"cp"}
    assert set(fit_many(jobs, 4, on_cpu=False)) == set(jobs)


def test_an_error_in_a_worker_reaches_the_caller():
    def broken():
        raise ValueError("no fit for you")

    with pytest.raises(ValueError, match="no fit for you"):
        fit_many({**_jobs(), "broken": broken}, 2)


def test_worker_counts():
    assert resolve_workers(0) == torch.get_num_threads()
    assert resolve_workers(3) == 3
    with pytest.raises(ValueError):
        resolve_workers(-1)
    with pytest.raises(datd.errors.DatdError, match="fit_workers"):
        datd.CompressConfig(fit_workers=-1)


def test_compress_gives_the_same_model_with_two_or_three_workers():
    """Planning fits, probe fits and final fits all run side by side; the model does not depend on how many."""
    from datd.models import load_model

    model = load_model("cifar_resnet20").model
    torch.manual_seed(0)
    images = torch.randn(32, 3, 32, 32)
    fast = dict(target="params=0.4", method="tucker2", candidates=(0.3, 0.6), candidate_iter=2, max_iter=3,
                sensitivity_images=16, probe_images=8, probe_rounds=1, measure_latency=False, progress=False)
    a, report_a = datd.compress(model, [images[:16], images[16:]], fit_workers=2, **fast)
    b, report_b = datd.compress(model, [images[:16], images[16:]], fit_workers=3, **fast)
    assert report_a["plan"] == report_b["plan"]
    assert sum(l.get("method") == "tucker2" for l in report_a["layers"]) > 2
    state, other = a.state_dict(), b.state_dict()
    assert state.keys() == other.keys() and all(torch.equal(state[k], other[k]) for k in state)
