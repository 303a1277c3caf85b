"""The product on real models and data: the CLI, the demo's default, reloading, ImageNet architectures."""

import json
import re

import pytest
import torch
from click.testing import CliRunner

import datd
from datd.cli import main
from datd.data import calibration_loader, eval_loader
from datd.models import load_model

pytestmark = pytest.mark.slow
IMAGENET = "imagefolder:../shared/data/imagenet-sample/val"


def run(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_compresses_resnet20_and_the_reload_scores_the_same(tmp_path):
    out = tmp_path / "r20"
    printed = run(["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--target", "params=0.5",
                   "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    # default (auto method, auto ranks, Σ-norm, bias correction); issue #3 asks for >= 86.0 %
    assert report["accuracy_before"] == pytest.approx(0.9173)
    assert report["accuracy_after"] >= 0.90
    assert report["params_after"] <= 0.5 * report["params_before"]
    for key in ("macs_before", "macs_after", "seconds", "config", "versions", "layers"):
        assert key in report
    assert all(("skipped" in l) or {"ranks", "sigma_error", "params_after"} <= set(l) for l in report["layers"])
    for name in ("report.md", "plan.json", "config.json", "model.safetensors", "layers.png", "accuracy.png"):
        assert (out / name).is_file()
    assert f"{100 * report['accuracy_after']:.2f}%" in printed and "report.md" in printed
    evaluated = run(["eval", "--compressed", str(out), "--data", "cifar10"])
    assert re.search(rf"accuracy\s+{100 * report['accuracy_after']:.2f}%", evaluated), evaluated
    # params targets report the measured latency too, and the model exports in its inference form
    assert report["latency"]["original_s"] > 0 and "latency" in printed
    printed = run(["export", str(out), "--format", "onnx", "--out", str(tmp_path / "r20.onnx")])
    assert (tmp_path / "r20.onnx").is_file() and "checked against torch" in printed
    # the plan can be read back: same layers, same ranks, same model
    again = tmp_path / "again"
    run(["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--ranks", str(out / "plan.json"),
         "--out", str(again), "--eval-limit", "500"])
    assert json.loads((again / "plan.json").read_text())["layers"] == json.loads((out / "plan.json").read_text())["layers"]


def test_latency_target_on_resnet20(tmp_path):
    out = tmp_path / "fast"
    printed = run(["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--target", "latency=0.85",
                   "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    lat = report["latency"]
    assert "faster" in printed and 1 <= len(lat["rounds"]) <= 4
    # whatever the machine measured, the returned model is never slower than the original
    assert lat["ratio"] < 1 or report["params_after"] == report["params_before"]
    # How much a latency budget costs in accuracy depends on the machine: what a layer's options save in time is
    # measured there. At latency=0.85 the development machines measured 88.5 % (Intel Xeon, AVX-512; 89.5 %
    # with --no-prune) and 91.0 % (AMD EPYC), a CI machine 85.3 %. The bound is the no-collapse rule of the
    # accuracy benchmark (a drop of at most ~9 points from 91.73 % at a latency cut of 15 %). A loaded machine
    # once broke it: its first plan measured 0.64-0.72 and the old budget correction (one plan's scale through a
    # noisy reference) kept that plan (85.9 %, MACs 0.38); the rounds now bracket the target with the measured
    # ratios (with one core kept busy: 90.4 % at 0.855, MACs 0.75).
    assert report["accuracy_after"] >= 0.83
    fast = datd.load(out, load_model("cifar_resnet20").model, inference=True)
    slow = datd.load(out, load_model("cifar_resnet20").model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fast(x), slow(x), rtol=1e-4, atol=1e-4)


def test_resnet56_default_keeps_its_accuracy_at_half_the_parameters():
    loaded = load_model("cifar_resnet56")
    calib = calibration_loader("cifar10", loaded.preprocessing, 2048)
    evaluation = eval_loader("cifar10", loaded.preprocessing, num_classes=10)
    _, report = datd.compress(loaded.model, calib, target="params=0.5", eval_data=evaluation, progress=False)
    assert report["accuracy_before"] == pytest.approx(0.9339)
    assert report["accuracy_after"] >= 0.905  # issue #3's acceptance bound (measured: 93.1 %)
    assert report["params_after"] <= 0.5 * report["params_before"]


def test_statistics_from_another_dataset_transfer(tmp_path):
    stats = tmp_path / "tiny.safetensors"
    run(["stats", "--model", "cifar_resnet20", "--data", "tinyimagenet32", "--calib", "512", "--out", str(stats)])
    accuracy = {}
    for norm in ("sigma", "frobenius"):
        out = tmp_path / norm
        run(["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--calib", "512", "--stats", str(stats),
             "--method", "tucker2", "--ranks", "uniform", "--norm", norm, "--out", str(out), "--eval-limit", "2000"])
        report = json.loads((out / "report.json").read_text())
        assert report["statistics"]["num_images"] == 512 and "tinyimagenet" in report["statistics"]["description"]
        accuracy[norm] = report["accuracy_after"]
    # Σ from Tiny-ImageNet (not the model's data) still beats the data-free fit by far
    assert accuracy["sigma"] > 0.7 and accuracy["sigma"] > accuracy["frobenius"] + 0.1, accuracy


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "googlenet"])
def test_imagenet_architectures_compress_end_to_end(name, tmp_path):
    out = tmp_path / name
    run(["compress", "--model", name, "--weights", "none", "--data", IMAGENET, "--calib", "8", "--batch-size", "4",
         "--method", "svd", "--target", "params=0.6", "--eval-limit", "8", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] <= 0.6 * report["params_before"]
    compressed = [l for l in report["layers"] if "skipped" not in l]
    if name != "resnet18":
        assert any(l["shape"][2:] == [1, 1] for l in compressed)  # 1×1 convs are compressed too
    if name == "googlenet":
        assert any(".branch" in l["name"] for l in compressed)
    reloaded = datd.load(out, load_model(name, "none").model)
    x = torch.randn(1, 3, 224, 224)
    assert reloaded(x).shape == (1, 1000)
