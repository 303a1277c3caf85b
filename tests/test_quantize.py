"""int8 on top: ONNX Runtime static quantization of compressed models."""

import json

import pytest
import torch
from click.testing import CliRunner

import datd
from datd.cli import main
from datd.errors import DatdError
from datd.export import OnnxModel
from datd.models import load_model
from datd.inference import form_names
from datd.layers import FACTORIZED_TYPES
from datd.quantize import int8_forms, quantize


@pytest.fixture(scope="module")
def compressed():
    model = load_model("cifar_resnet20").model
    torch.manual_seed(0)
    images = torch.randn(64, 3, 32, 32)
    return datd.compress(model, [images[:32], images[32:]], target="params=0.5", candidates=(0.3, 0.6),
                         candidate_iter=2, max_iter=2, sensitivity=False, probe_images=0, measure_latency=False,
                         progress=False)


def test_the_int8_model_computes_what_the_float_model_does(compressed, tmp_path):
    model, report = compressed
    torch.manual_seed(1)
    calib = [torch.randn(32, 3, 32, 32) for _ in range(4)]
    path = quantize(model, calib, tmp_path / "m.int8.onnx", images=128, **report["inference"])
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
    got = OnnxModel(path)(x)
    assert got.shape == expected.shape
    assert ((got - expected).norm() / expected.norm()).item() < 0.1  # int8 rounding, not a different function
    assert path.stat().st_size < 0.6 * sum(p.numel() * 4 for p in model.parameters())  # int8 weights (+ scales)


def test_int8_forms_are_measured_per_layer_type_and_keep_the_function(tmp_path):
    torch.manual_seed(0)
    images = torch.randn(32, 3, 32, 32)
    model, report = datd.compress(load_model("cifar_resnet20").model, [images], target="params=0.5", method="cp",
                                  candidates=(0.3, 0.6), candidate_iter=2, max_iter=2, sensitivity=False,
                                  probe_images=0, measure_latency=False, progress=False)
    factorized = {n: m for n, m in model.named_modules() if isinstance(m, FACTORIZED_TYPES)}
    kinds = {type(m).__name__: form_names(m) for m in factorized.values() if len(form_names(m)) > 1}
    assert kinds, "the fixture should hold layers with several execution forms"
    torch.manual_seed(2)
    calib = [torch.randn(32, 3, 32, 32) for _ in range(4)]
    forms, trials = int8_forms(model, calib, images=16, batch=8, repeats=3, size_slack=0.05, **report["inference"])
    assert set(forms) == set(factorized) and all(f in form_names(factorized[n]) for n, f in forms.items())
    # every type was tried in each of its forms but those that would grow the model by more than 5%: a CP layer
    # merged into one k×k conv holds S·R·k² weights instead of (S + 2k)·R
    assert {t["type"] for t in trials} == set(kinds)
    for t in trials:
        assert (set(t["seconds"]) - {"best"}) | set(t["too_large"]) == set(kinds[t["type"]]) - {"chain"}  # from chain
        assert all(s > 0 for s in t["seconds"].values()) and set(t["errors"]) == set(t["seconds"])
    assert "merge_in" in next(t for t in trials if t["type"] == "CPConv2d")["too_large"]
    assert "merge_in" not in forms.values()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
    path = quantize(model, calib, tmp_path / "m.int8.onnx", images=128, forms=forms,
                    memory_format=report["inference"]["memory_format"])
    assert ((OnnxModel(path)(x) - expected).norm() / expected.norm()).item() < 0.1  # int8 rounding only


def test_bad_quantization_settings_are_refused(compressed, tmp_path):
    model, _ = compressed
    with pytest.raises(DatdError, match="calibration method"):
        quantize(model, [torch.randn(4, 3, 32, 32)], tmp_path / "m.onnx", method="magic")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_int8_resnet20_stays_within_a_point_of_the_float_compressed_model(tmp_path, compress_resnet20_cli):
    out = tmp_path / "r20"
    compress_resnet20_cli(out, "params=0.5")
    result = CliRunner().invoke(main, ["quantize", str(out), "--data", "cifar10"])  # the full test set: ±0.4 on 2000
    assert result.exit_code == 0, result.output
    report = json.loads((out / "quantized.json").read_text())
    accuracy = report["accuracy"]
    assert accuracy["float"] > 0.88 and abs(accuracy["int8"] - accuracy["float"]) <= 0.01
    # a model compressed for size is quantized in forms that keep its size (no merged factors): int8 weights
    assert report["forms"]["choice"] == "compact" and report["forms"]["trials"]
    assert report["bytes"] < 0.6 * report["bytes_float"]
    assert report["latency"]["int8_s"] > 0 and (out / "model.int8.onnx").is_file()
