"""Exported models (ONNX Runtime, TorchScript) compute what the torch model computes, at any batch size."""

import pytest
import torch
import torchvision

import datd
from datd.export import export, onnxruntime_session
from datd.inference import for_inference
from datd.models import load_model


def relative_difference(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def compressed_and_forms(compressed_resnet20):
    forms = {n: "depthwise" if m.kind == "cp" else "merge_in" if m.kind == "tucker2" else "chain"
             for n, m in compressed_resnet20.named_modules() if hasattr(m, "kind")}
    return compressed_resnet20, forms


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_compressed_cifar_resnet_exports_exactly(compressed_and_forms, format, tmp_path):
    model, forms = compressed_and_forms
    path = export(model, torch.randn(2, 3, 32, 32), tmp_path / f"m.{format}", format, forms=forms,
                  memory_format="channels_last")
    x = torch.randn(5, 3, 32, 32)  # another batch size than the export example
    with torch.no_grad():
        expected = model(x)
        run = onnxruntime_session(path) if format == "onnx" else torch.jit.load(str(path))
        assert relative_difference(run(x), expected) < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary files left


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_torchvision_resnet18_exports_exactly(format, tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    path = export(model, torch.randn(1, 3, 96, 96), tmp_path / "r18", format)
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        run = onnxruntime_session(path) if format == "onnx" else torch.jit.load(str(path))
        assert relative_difference(run(x), model(x)) < 1e-4


def test_a_failed_check_writes_nothing(compressed_and_forms, tmp_path):
    model, _ = compressed_and_forms
    target = tmp_path / "m.onnx"
    target.write_text("previous result")
    with pytest.raises(ValueError, match="differs from torch"):
        export(model, torch.randn(2, 3, 32, 32), target, "onnx", rtol=0.0)
    assert target.read_text() == "previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    with pytest.raises(ValueError, match="format"):
        export(model, torch.randn(2, 3, 32, 32), target, "tflite")


def test_saved_model_reloads_in_its_inference_form(compressed_and_forms, tmp_path):
    model, forms = compressed_and_forms
    datd.save(model, tmp_path / "m", source={"model": "cifar_resnet20"},
              inference={"memory_format": "channels_last", "forms": forms})
    fast = datd.load(tmp_path / "m", load_model("cifar_resnet20").model, inference=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert relative_difference(fast(x), model(x)) < 1e-5
        assert relative_difference(fast(x), for_inference(model, forms=forms)(x)) < 1e-5
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="inference"):
        datd.save(model, tmp_path / "bad", inference={"memory_format": "nhwc"})
