"""The classification zoo end to end: every torchvision family and a dozen timm CNNs (random weights, small
inputs, few calibration images) compress to params=0.5 (and, by channel pruning alone, to macs=0.8), reload from
disk with identical outputs and export to ONNX Runtime with matching outputs. AlexNet and VGG (first classifier layers 9216 and 25088 wide: minutes to
hours of eigendecompositions on 2 cores) and the larger family members are benchmark material
(benchmarks/zoo.py), not CI."""

from __future__ import annotations

import warnings

import pytest
import torch

import datd
from datd.models import load_model

pytestmark = pytest.mark.slow

TORCHVISION = {  # one member per family, with the smallest input the architecture takes comfortably
    "resnet18": 64, "resnext50_32x4d": 64, "regnet_x_400mf": 64, "regnet_y_400mf": 64, "mobilenet_v2": 64,
    "mobilenet_v3_small": 64, "efficientnet_b0": 64, "shufflenet_v2_x0_5": 64, "mnasnet0_5": 64,
    "squeezenet1_1": 64, "densenet121": 64, "googlenet": 64, "inception_v3": 96, "convnext_tiny": 64,
}
TIMM = {
    "timm:resnet18d": 64, "timm:efficientnet_b0": 64, "timm:mobilenetv3_small_100": 64, "timm:regnety_002": 64,
    "timm:ghostnet_100": 64, "timm:mixnet_s": 64, "timm:rexnet_100": 64, "timm:dla34": 64,
    "timm:convnext_atto": 64, "timm:lcnet_050": 64, "timm:resnest14d": 64, "timm:densenet121": 64,
}
AUTO = ["regnet_x_400mf", "shufflenet_v2_x0_5", "squeezenet1_1", "timm:regnety_002"]
# channel pruning alone: every family whose chains (producer → channel-wise ops → consumer) take different shapes —
# inverted residuals with depthwise convs, squeeze-excitation MLPs, ConvNeXt's Linear MLPs, DenseNet and Inception
# branches, a classifier behind global pooling
# (macs target: where the chains hold little of the compute, what pruning alone can reach)
PRUNE = {"resnet18": 0.8, "mobilenet_v2": 0.8, "mobilenet_v3_small": 0.9, "efficientnet_b0": 0.9,
         "shufflenet_v2_x0_5": 0.8, "mnasnet0_5": 0.8, "squeezenet1_1": 0.95, "densenet121": 0.8, "googlenet": 0.8,
         "inception_v3": 0.8, "convnext_tiny": 0.8, "timm:ghostnet_100": 0.95, "timm:convnext_atto": 0.8}
FAST = dict(candidates=(0.25, 0.6), candidate_iter=2, max_iter=2, sensitivity_images=8, probe_images=8,
            probe_rounds=1, measure_latency=False, progress=False)


def _cases() -> list:
    """Every model with the closed-form Σ-SVD (fast: surgery, reload and export of every layer kind), and the
    smaller ones with the default method 'auto' too (Tucker-2 and CP on grouped and strided kernels; the 1×k
    kernels of Inception are covered by tests/test_layers.py)."""
    cases = [pytest.param(name, size, "svd", id=f"{name}-svd") for name, size in {**TORCHVISION, **TIMM}.items()]
    cases += [pytest.param(name, TORCHVISION.get(name) or TIMM[name], "auto", id=f"{name}-auto") for name in AUTO]
    cases += [pytest.param(name, TORCHVISION.get(name) or TIMM[name], "prune", id=f"{name}-prune") for name in PRUNE]
    return cases


@pytest.mark.parametrize("name, size, method", _cases())
def test_zoo_compresses_reloads_and_exports(name: str, size: int, method: str, tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        model = load_model(name, "none").model
        base = load_model(name, "none").model
    torch.manual_seed(0)
    images = torch.randn(8, 3, size, size)
    target = f"macs={PRUNE[name]}" if method == "prune" else "params=0.5"
    compressed, report = datd.compress(model, [images[:4], images[4:]], target=target, method=method, **FAST)
    metric, fraction = target.split("=")
    assert report[f"{metric}_ratio"] <= float(fraction) + 1e-9
    if method != "prune":  # nor far below it: all-zero predicted damages once left Inception v3 at params 0.008
        assert report[f"{metric}_ratio"] >= 0.8 * float(fraction)
    assert any("method" in layer for layer in report["layers"])
    for layer in report["layers"]:
        if "skipped" in layer:
            assert layer["skipped"]  # a reason for every layer left alone
    datd.save(compressed, tmp_path / "model", inference=report["inference"])
    reloaded = datd.load(tmp_path / "model", base)
    with torch.no_grad():
        assert torch.equal(reloaded(images[:2]), compressed(images[:2]))
    datd.export(compressed, images[:2], tmp_path / "model.onnx", forms=report["inference"]["forms"])
