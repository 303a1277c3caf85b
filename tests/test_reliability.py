"""Faults and bad input: one clear line and nothing written; atomic outputs; untrusted pickles refused;
bit-identical and resumable runs (killed for real); a fuzz test of every file reader."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import datd
from datd import io
from datd.cli import main
from datd.errors import DatdError
from datd.latency import LatencyCache
from datd.models import _read_state_dict, load_model
from datd.plan import Option, Plan
from datd.stats import Statistics, collect_stats

FAST = dict(candidates=(0.3, 0.6), candidate_iter=2, max_iter=3, sensitivity_images=32, probe_images=0,
            measure_latency=False, progress=False)


def invoke(args):
    return CliRunner().invoke(main, args)


class Tiny(nn.Module):
    """Conv2d, Linear, a transposed and a 1-D convolution (unsupported: skipped with the reason)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.line = nn.Conv1d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = torch.relu(self.up(x))
        x = self.line(x.flatten(2)).mean(2)
        return self.fc(x)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return Tiny().eval()


def batches(n=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, size, size, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Valid files of every kind datd reads: statistics, a compressed model, a plan, a latency cache, weights."""
    root = tmp_path_factory.mktemp("artifacts")
    model = tiny()
    stats = collect_stats(model, batches(), progress=False)
    stats.save(root / "stats.safetensors")
    compressed, report = datd.compress(tiny(), batches(), target="params=0.6", min_params=100, **FAST)
    io.save(compressed, root / "model", source={"model": "tiny"}, inference=report["inference"])
    Plan({"conv2": Option("tucker2", (8, 4), datd.layers.Cost(1, 1))}, {}, "params=0.5").save(root / "plan.json")
    cache = LatencyCache(root / "latency.json")
    cache.put("a|b", 1e-3)
    cache.save()
    torch.save(model.state_dict(), root / "weights.pth")
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(root / "weights.safetensors"))
    return root


# -- bad input: one line, exit code 2, nothing written -------------------------------------------------------


def test_a_weights_file_of_another_architecture_is_refused(tmp_path):
    torch.save(load_model("cifar_resnet20").model.state_dict(), tmp_path / "r20.pth")
    result = invoke(["compress", "--model", "cifar_resnet56", "--weights", str(tmp_path / "r20.pth"), "--data", "cifar10",
                     "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "does not fit model cifar_resnet56" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def _mangle(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(300)))
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_corrupted_statistics_plan_and_model_files_give_one_line(artifacts, tmp_path, how):
    stats, plan = tmp_path / "stats.safetensors", tmp_path / "plan.json"
    stats.write_bytes((artifacts / "stats.safetensors").read_bytes())
    plan.write_bytes((artifacts / "plan.json").read_bytes())
    model = tmp_path / "model"
    model.mkdir()
    for f in ("config.json", "model.safetensors"):
        (model / f).write_bytes((artifacts / "model" / f).read_bytes())
    for path in (stats, plan, model / "model.safetensors", model / "config.json"):
        _mangle(path, how)
    out = tmp_path / "out"
    common = ["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--calib", "16", "--out", str(out)]
    for args, word in ((common + ["--stats", str(stats)], "statistics"), (common + ["--ranks", str(plan)], "plan.json"),
                       (["eval", "--compressed", str(model), "--data", "cifar10"], "config.json"),
                       (["export", str(model), "--out", str(tmp_path / "m.onnx")], "config.json")):
        result = invoke(args)
        assert result.exit_code == 2, (args, result.output)
        line = result.output.strip().splitlines()[-1]
        assert line.startswith("error: ") and word in line and "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("layers, message", [
    ({"layer9.conv": {"method": "svd", "ranks": [4]}}, "names layer 'layer9.conv'"),
    ({"layer1.0.conv1": {"method": "tucker2", "ranks": [0, 4]}}, "ranks must be 2 integers in [1,"),
    ({"layer1.0.conv1": {"method": "tucker2", "ranks": [17, 4]}}, "ranks must be 2 integers in [1,"),
    ({"layer1.0.conv1": {"method": "svd", "ranks": ["4"]}}, "ranks must be a list of integers"),
    ({"layer1.0.conv1": {"method": "magic", "ranks": [4]}}, "unknown method"),
    ({"layer1.0.conv1": ["svd", 4]}, "needs 'method' and 'ranks'"),
])
def test_bad_plans_are_refused_naming_the_layer(tmp_path, layers, message):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "datd-plan/1", "layers": layers}))
    result = invoke(["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--calib", "16", "--probe-images", "0",
                     "--no-measure-latency", "--ranks", str(plan), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["params=0", "params=1", "params=-0.5", "macs=1.5", "speed=0.5", "params"])
def test_targets_outside_0_1_are_refused(target, tmp_path):
    result = invoke(["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--target", target,
                     "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "target" in result.output
    assert not (tmp_path / "out").exists()


def test_an_unreachable_budget_says_what_is_reachable():
    with pytest.raises(DatdError, match=r"impossible budget params=0.01: .* keeps 0\.\d+ of its params"):
        datd.compress(tiny(), batches(), target="params=0.01", min_params=100, **FAST)


def test_non_finite_weights_and_data_are_refused():
    model = tiny()
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(DatdError, match="NaN or Inf .*'conv2.weight'"):
        datd.compress(model, batches(), target="params=0.6", **FAST)
    data = batches()
    data[1][3, 0, 0, 0] = float("inf")
    with pytest.raises(DatdError, match="non-finite input"):
        datd.compress(tiny(), data, target="params=0.6", **FAST)


@pytest.mark.parametrize("calib", ["0", "1"])
def test_empty_or_one_image_calibration_sets_are_refused(calib, tmp_path):
    result = invoke(["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--calib", calib,
                     "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "at least 2 calibration images" in result.output
    one = [torch.randn(1, 3, 16, 16)]
    with pytest.raises(DatdError, match="at least 2 calibration images"):
        datd.compress(tiny(), one, target="params=0.6", **FAST)


def test_few_images_warn_of_a_rank_deficient_sigma():
    with pytest.warns(UserWarning, match="rank-deficient"):
        datd.compress(tiny(), [torch.randn(4, 3, 16, 16)], target="params=0.8", min_params=100, **FAST)


def test_unsupported_layers_are_skipped_with_the_reason_in_the_report():
    _, report = datd.compress(tiny(), batches(), target="params=0.8", min_params=100, **FAST)
    layers = {entry["name"]: entry for entry in report["layers"]}
    assert layers["up"]["skipped"] == "unsupported layer type ConvTranspose2d" and layers["up"]["kind"] == "ConvTranspose2d"
    assert layers["line"]["skipped"] == "unsupported layer type Conv1d"
    assert "skipped" not in layers["conv2"]


def test_cuda_without_a_gpu_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke(["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--device", "cuda",
                     "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "CUDA is not available" in result.output


def test_debug_shows_the_traceback_and_unexpected_errors_are_one_line(monkeypatch):
    args = ["compress", "--model", "cifar_resnet20", "--data", "nowhere.npz"]
    plain, debug = invoke(args), invoke(["--debug"] + args)
    assert plain.exit_code == 2 and plain.exception.__class__ is SystemExit
    assert isinstance(debug.exception, DatdError)  # re-raised, so the traceback is printed
    monkeypatch.setattr("datd.cli.load_model", lambda *a, **k: 1 / 0)
    result = invoke(["eval", "--model", "cifar_resnet20", "--data", "cifar10"])
    assert result.exit_code == 1
    assert result.output.strip() == ("error: unexpected ZeroDivisionError: division by zero (datd --debug ... shows "
                                     "the traceback)")


# -- outputs: never someone else's files, never half-written ---------------------------------------------------


def test_an_output_directory_with_other_files_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = invoke(["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--out", str(out)])
    assert result.exit_code == 2 and "holds other files" in result.output and "--overwrite" in result.output
    assert (out / "notes.txt").read_text() == "mine"
    with io.output_directory(out, overwrite=True) as tmp:
        io.save(tiny(), tmp)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    with io.output_directory(out) as tmp:  # an earlier datd result is replaced without --overwrite
        (tmp / "config.json").write_text((out / "config.json").read_text())
        (tmp / "report.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "report.json"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatdError, match="not a directory"):
        io.check_output_directory(tmp_path / "file")


def test_a_full_disk_leaves_the_previous_result_intact(tmp_path, monkeypatch, artifacts):
    out = tmp_path / "out"
    compressed = io.load(artifacts / "model", tiny())
    with io.output_directory(out) as tmp:
        io.save(compressed, tmp)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    stats_file = tmp_path / "stats.safetensors"
    stats_file.write_bytes((artifacts / "stats.safetensors").read_bytes())

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # part of it made it to the disk
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr("datd.io.save_file", full)
    monkeypatch.setattr("datd.stats.save_file", full)
    with pytest.raises(OSError, match="No space left"):
        with io.output_directory(out) as tmp:
            io.save(tiny(), tmp)
    with pytest.raises(OSError, match="No space left"):
        Statistics.load(stats_file).save(stats_file)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert stats_file.read_bytes() == (artifacts / "stats.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stats.safetensors"]  # no temporary left over


class Payload:
    """A pickled object that runs code when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('owned')",)


def test_a_malicious_pickle_checkpoint_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "owned"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload(marker)}, evil)
    with pytest.raises(DatdError, match="weights_only=True"):
        _read_state_dict(str(evil))
    result = invoke(["eval", "--model", "cifar_resnet20", "--weights", str(evil), "--data", "cifar10"])
    assert result.exit_code == 2 and "weights_only" in result.output
    assert not marker.exists()


def test_no_code_path_unpickles_untrusted_data():
    """Every load in the package is weights_only / allow_pickle=False / safetensors / JSON."""
    import re

    for path in Path(datd.__file__).parent.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M), path
        assert "pickle.load" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        for call in re.findall(r"np\.load\([^)]*\)", text):
            assert "allow_pickle=False" in call, (path, call)


# -- property tests --------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from datd.layers import Geometry, dense_cost  # noqa: E402
from datd.plan import METRICS, Target, allocate, factorized_cost, metric_of, rank_ladder  # noqa: E402


@st.composite
def layer_options(draw):
    """Real options of a random conv layer: its rank ladder for one method, damage falling with the rank."""
    t, s, k = draw(st.integers(2, 48)), draw(st.integers(2, 48)), draw(st.sampled_from([1, 3]))
    hw = draw(st.sampled_from([1, 4, 8]))
    g = Geometry.of(nn.Conv2d(s, t, k, padding=k // 2), (hw, hw), (hw, hw))
    method = draw(st.sampled_from(["svd", "tucker2", "cp"] if k > 1 else ["svd"]))
    ladder = rank_ladder(method, g)
    decay = draw(st.floats(0.1, 5.0))
    options = [Option("dense", (), dense_cost(g), 0.0)]
    for ranks in ladder:
        cost = factorized_cost(method, g, ranks)
        options.append(Option(method, ranks, cost, float((1 - ranks[0] / (max(ranks[0], 1) + 1)) ** decay)
                              / ranks[0] + draw(st.floats(0, 1e-3))))
    return options


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(layer_options(), min_size=1, max_size=6), st.sampled_from(["params", "macs"]),
       st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_the_planner_keeps_the_budget_never_grows_a_layer_and_is_monotone(layers, metric, u, v):
    options = {f"l{i}": opts for i, opts in enumerate(layers)}
    cheapest = sum(min(metric_of(o.cost, metric) for o in opts) for opts in options.values())
    dense = sum(metric_of(opts[0].cost, metric) for opts in options.values())
    small, large = sorted((cheapest + int(u * (dense - cheapest)), cheapest + int(v * (dense - cheapest))))
    plans = [allocate(options, budget, metric) for budget in (small, large)]
    for plan, budget in zip(plans, (small, large)):
        assert sum(metric_of(o.cost, metric) for o in plan.values()) <= budget
        for name, o in plan.items():
            assert o in options[name] and all(r >= 1 for r in o.ranks)
            assert metric_of(o.cost, metric) <= metric_of(options[name][0].cost, metric)
    assert sum(o.damage for o in plans[1].values()) <= sum(o.damage for o in plans[0].values()) + 1e-12
    with pytest.raises(ValueError):
        allocate(options, cheapest - 1, metric)


@given(st.text(max_size=30))
def test_the_target_parser_accepts_only_well_formed_targets(text):
    try:
        target = Target.parse(text)
    except DatdError:
        return
    assert target.metric in METRICS and 0 < target.fraction < 1
    assert Target.parse(str(target)) == target


@given(st.sampled_from(METRICS), st.floats(allow_nan=True, allow_infinity=True))
def test_the_target_parser_round_trips_fractions(metric, fraction):
    spec = f"{metric}={fraction}"
    if 0 < fraction < 1:
        assert Target.parse(spec) == Target(metric, fraction)
    else:
        with pytest.raises(DatdError):
            Target.parse(spec)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats() | st.text(max_size=8),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                        max_size=4), max_leaves=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_statistics_and_config_readers_take_any_json_metadata(artifacts, tmp_path_factory, data):
    """Valid files whose metadata has one value replaced by arbitrary JSON: read, or refused with DatdError."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("meta")
    with safe_open(str(artifacts / "stats.safetensors"), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["datd"]), {k: f.get_tensor(k) for k in f.keys()}
    layer = data.draw(st.sampled_from(sorted(meta["layers"])))
    key = data.draw(st.sampled_from(["kind", "weight_shape", "groups", "count", "input_hw", "count_half", "*"]))
    value = data.draw(JSON)
    if key == "*":
        meta[data.draw(st.sampled_from(["num_images", "layers", "format"]))] = value
    else:
        meta["layers"][layer][key] = value
    save_file(tensors, str(tmp / "s.safetensors"), metadata={"datd": json.dumps(meta)})
    try:
        Statistics.load(tmp / "s.safetensors", tiny())
    except DatdError:
        pass
    config = json.loads((artifacts / "model" / "config.json").read_text())
    where = data.draw(st.sampled_from(["layers", "inference", "source", "entry", "ranks"]))
    name = next(iter(config["layers"]))
    if where == "entry":
        config["layers"][name] = value
    elif where == "ranks":
        config["layers"][name]["ranks"] = value
    else:
        config[where] = value
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text(json.dumps(config))
    (tmp / "model" / "model.safetensors").write_bytes((artifacts / "model" / "model.safetensors").read_bytes())
    try:
        io.load(tmp / "model", tiny())
    except DatdError:
        pass


# -- fuzz: random and mutated bytes into every reader ----------------------------------------------------------


class _Hang(KeyboardInterrupt):
    """Raised by the alarm: a reader took too long (KeyboardInterrupt passes through the readers' net)."""


def _mutations(data: bytes, rng: random.Random, count: int):
    for i in range(count):
        kind = i % 6
        b = bytearray(data)
        if kind == 0:
            yield bytes(b[: rng.randrange(len(b) + 1)])
        elif kind == 1:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            yield bytes(b)
        elif kind == 2:  # the first 200 bytes hold safetensors' header length and JSON
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(min(len(b), 200))] = rng.randrange(256)
            yield bytes(b)
        elif kind == 3:
            at = rng.randrange(len(b) + 1)
            yield bytes(b[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + b[at:])
        elif kind == 4:
            yield bytes(rng.randrange(256) for _ in range(rng.randint(0, 512)))
        else:
            at, n = rng.randrange(len(b)), rng.randint(1, 64)
            yield bytes(b[:at] + b[at + n:])


READERS = {
    "statistics": ("stats.safetensors", lambda p: Statistics.load(p, tiny())),
    "model weights": ("model/model.safetensors", lambda p: io.load(p.parent, tiny())),
    "model config": ("model/config.json", lambda p: io.load(p.parent, tiny())),
    "plan": ("plan.json", Plan.read),
    "latency cache": ("latency.json", LatencyCache),
    "weights .pth": ("weights.pth", lambda p: _read_state_dict(str(p))),
    "weights .safetensors": ("weights.safetensors", lambda p: _read_state_dict(str(p))),
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_fuzzed_files_give_only_our_error(artifacts, tmp_path, reader):
    relative, read = READERS[reader]
    original = (artifacts / relative).read_bytes()
    target = tmp_path / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if Path(relative).parent != Path("."):  # the rest of a model directory, intact
        for other in (artifacts / relative).parent.iterdir():
            (target.parent / other.name).write_bytes(other.read_bytes())
    rng = random.Random(reader)
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(_Hang()))
    refused = 0
    try:
        for mutated in _mutations(original, rng, 120):
            target.write_bytes(mutated)
            signal.alarm(20)
            try:
                read(target)
            except DatdError:
                refused += 1
            except _Hang:
                pytest.fail(f"{reader}: reading a mutated file hung")
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    assert refused >= 60  # most mutations break the file; the rest were read as valid files


# -- bit-identical and resumable runs (real CIFAR-10 ResNet-20, real processes killed with SIGKILL) ------------


RUN = ["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--calib", "256", "--target", "params=0.4",
       "--no-measure-latency", "--eval-limit", "200"]


def _datd(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.Popen([sys.executable, "-m", "datd", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def _result(directory: Path) -> dict:
    report = json.loads((directory / "report.json").read_text())
    for key in ("seconds", "timings", "resumed"):
        report.pop(key, None)
    return {"weights": (directory / "model.safetensors").read_bytes(),
            "config": (directory / "config.json").read_text(), "report": report}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    process = _datd(RUN + ["--out", str(out)])
    _, err = process.communicate(timeout=900)
    assert process.returncode == 0, err.decode()[-2000:]
    return out


@pytest.mark.slow
def test_two_runs_with_the_same_seed_are_bit_identical(reference, tmp_path):
    out = tmp_path / "again"
    process = _datd(RUN + ["--out", str(out)])
    _, err = process.communicate(timeout=900)
    assert process.returncode == 0, err.decode()[-2000:]
    assert _result(out) == _result(reference)
    assert not (tmp_path / "again.partial").exists()  # the checkpoint is gone once the result is in place


def _kill_when(process, ready, timeout=600.0):
    import time

    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended before the kill point: {process.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "the kill point was never reached"
        time.sleep(0.01)
    process.kill()  # SIGKILL: no cleanup of any kind
    process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("point", ["statistics", "planning", "fits"])
def test_a_run_killed_and_resumed_gives_the_uninterrupted_result(reference, tmp_path, point):
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    ready = {
        "statistics": lambda: (partial / "statistics.safetensors").exists(),
        "planning": lambda: (partial / "planning.json").exists(),
        "fits": lambda: len(list((partial / "fits").glob("*.safetensors"))) >= 6,
    }[point]
    _kill_when(_datd(RUN + ["--out", str(out)]), ready)
    assert not out.exists() and partial.is_dir()
    process = _datd(RUN + ["--out", str(out), "--resume"])
    _, err = process.communicate(timeout=900)
    assert process.returncode == 0, err.decode()[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["resumed"]["statistics"] is True
    if point != "statistics":
        assert report["resumed"]["planning"] is True
    if point == "fits":
        assert report["resumed"]["fits"] >= 6
    assert _result(out) == _result(reference)
    assert not partial.exists()


def test_resuming_another_run_is_refused(tmp_path):
    from datd.checkpoint import Checkpoint

    Checkpoint(tmp_path / "c").start({"config": {"target": "params=0.5"}})
    with pytest.raises(DatdError, match="another run .*differs in: config"):
        Checkpoint(tmp_path / "c", resume=True).start({"config": {"target": "params=0.4"}})
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("x")
    with pytest.raises(DatdError, match="not a datd checkpoint"):
        Checkpoint(tmp_path / "d").start({})
