"""Test-wide settings: latency measurements go to a per-session cache, never to the user's."""

import pytest
import torch

import datd


@pytest.fixture(autouse=True, scope="session")
def _private_latency_cache(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv("DATD_CACHE_DIR", str(tmp_path_factory.mktemp("datd-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def compressed_resnet20():
    """The shipped CIFAR ResNet-20 quickly compressed to params=0.4 (random calibration images, short fits):
    a real architecture with Tucker-2, CP and low-rank layers for the inference-form and export tests."""
    from datd.models import load_model

    model = load_model("cifar_resnet20").model
    torch.manual_seed(0)
    images = torch.randn(48, 3, 32, 32)
    compressed, _ = datd.compress(model, [images[:24], images[24:]], target="params=0.4", candidates=(0.3, 0.6),
                                  candidate_iter=2, max_iter=2, sensitivity=False, measure_latency=False, progress=False)
    return compressed


@pytest.fixture
def compress_resnet20_cli():
    """``run(out, target)``: `datd compress` of the shipped ResNet-20 on 1024 CIFAR-10 training images into ``out``
    (no latency measurement, a short evaluation): a real compressed-model directory for the CLI tests."""
    from click.testing import CliRunner

    from datd.cli import main

    def run(out, target: str) -> None:
        result = CliRunner().invoke(main, ["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--calib", "1024",
                                           "--target", target, "--no-measure-latency", "--eval-limit", "100",
                                           "--out", str(out)])
        assert result.exit_code == 0, result.output

    return run
