"""The command line: help, bad input, and the statistics round trip (fast paths only)."""

import pytest
import torch
from click.testing import CliRunner

from datd.cli import main
from datd.stats import Statistics


def invoke(args):
    return CliRunner().invoke(main, args)


def test_help_documents_every_option():
    out = invoke(["compress", "--help"]).output
    for option in ("--model", "--weights", "--data", "--calib", "--target", "--method", "--norm", "--ranks", "--stats",
                   "--eval-data", "--out", "--device", "--seed", "--bias-correction", "--latency-batch", "--rank-multiple",
                   "--memory-format", "--latency-cache", "--measure-latency", "--probe-images", "--shrinkage",
                   "--propagate", "--propagate-residual", "--fit-budget", "--positions", "--overwrite", "--resume"):
        assert option in out
    assert "--positions" in invoke(["stats", "--help"]).output
    assert "latency=F" in out
    assert "--debug" in invoke(["--help"]).output
    for command in ("compress", "stats", "eval", "export", "quantize", "finetune", "demo"):
        assert command in invoke(["--help"]).output
    out = invoke(["export", "--help"]).output
    for option in ("--format", "--out", "--input-size", "onnx", "torchscript"):
        assert option in out


@pytest.mark.parametrize("args, message", [
    (["compress", "--model", "cifar_resnet20", "--data", "nowhere.npz"], "nowhere.npz"),
    (["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--target", "params=2"], "target"),
    (["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--weights", "missing.pth"], "missing.pth"),
    (["compress", "--model", "not_a_model", "--data", "cifar10"], "not_a_model"),
    (["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--stats", "missing.safetensors"], "missing.safetensors"),
    (["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--ranks", "plan-missing.json"], "plan file"),
    (["eval", "--data", "cifar10"], "exactly one of --model or --compressed"),
    (["eval", "--compressed", "no-such-dir", "--data", "cifar10"], "no-such-dir"),
    (["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--device", "cuda:7"], "CUDA"),
    (["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--target", "latency=0.5", "--ranks", "uniform"],
     "latency target needs ranks='auto'"),
    (["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--rank-multiple", "-2"], "rank_multiple"),
    (["compress", "--model", "cifar_resnet20", "--data", "cifar10", "--shrinkage", "lots"], "shrinkage must be"),
    (["export", "no-such-dir", "--out", "m.onnx"], "no-such-dir"),
])
def test_bad_input_exits_with_a_clear_message(args, message):
    result = invoke(args)
    assert result.exit_code == 2
    assert message in result.output


def test_stats_dry_run_prints_the_sizes_and_writes_nothing(tmp_path):
    result = invoke(["stats", "--model", "cifar_resnet20", "--data", "cifar10:test", "--calib", "8", "--dry-run",
                     "--out", str(tmp_path / "s.safetensors")])
    assert result.exit_code == 0, result.output
    assert "layer3.2.conv2" in result.output and "MiB of float64 sums" in result.output
    assert not (tmp_path / "s.safetensors").exists()


def test_stats_from_drawn_positions(tmp_path):
    """--positions F: the file says so, the first stage's Σ counts F of its 32×32 positions, and a bad fraction is a
    clear error."""
    path = tmp_path / "drawn.safetensors"
    result = invoke(["stats", "--model", "cifar_resnet20", "--data", "cifar10:test", "--calib", "16",
                     "--positions", "0.125", "--out", str(path)])
    assert result.exit_code == 0, result.output
    drawn = Statistics.load(path)
    assert "0.125 of each conv's positions drawn (seed 0)" in drawn.description
    assert drawn["conv1"].count == 16 * 128 and drawn["layer3.2.conv2"].count == 16 * 64  # 8×8 maps stay whole
    result = invoke(["stats", "--model", "cifar_resnet20", "--data", "cifar10:test", "--calib", "16",
                     "--positions", "1.5", "--out", str(tmp_path / "bad.safetensors")])
    assert result.exit_code == 2 and "positions" in result.output and not (tmp_path / "bad.safetensors").exists()


def test_stats_of_another_model_are_refused(tmp_path):
    stats = tmp_path / "r20.safetensors"
    result = invoke(["stats", "--model", "cifar_resnet20", "--data", "cifar10:test", "--calib", "16", "--out", str(stats)])
    assert result.exit_code == 0, result.output
    result = invoke(["compress", "--model", "cifar_resnet56", "--data", "cifar10:test", "--calib", "16",
                     "--stats", str(stats), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "statistics do not match the model" in result.output
    assert not (tmp_path / "out").exists()


OWN_NORMALIZATION = """
    import torch
    from torch import nn
    from datd.models import load_model

    MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # what this user's model was trained with


    class Renormalized(nn.Module):
        '''The shipped ResNet-20 behind an input affine: a model that expects CIFAR-10's own mean/std.'''

        def __init__(self):
            super().__init__()
            self.net = load_model("cifar_resnet20").model
            shipped = load_model("cifar_resnet20").preprocessing
            self.register_buffer("scale", torch.tensor(STD).div(torch.tensor(shipped.std)).view(1, 3, 1, 1))
            self.register_buffer("shift", torch.tensor(MEAN).sub(torch.tensor(shipped.mean))
                                 .div(torch.tensor(shipped.std)).view(1, 3, 1, 1))

        def forward(self, x):
            return self.net(x * self.scale + self.shift)


    def make():
        return Renormalized().eval()
"""


@pytest.mark.slow
def test_own_normalization_on_the_command_line_matches_the_models_own_evaluation(tmp_path, monkeypatch):
    import textwrap

    import numpy as np

    from datd.data import data_root

    (tmp_path / "datd_own_norm.py").write_text(textwrap.dedent(OWN_NORMALIZATION))
    monkeypatch.syspath_prepend(str(tmp_path))
    import datd_own_norm

    # the model's own evaluation script: its normalization, by hand, on the first 500 test images
    with np.load(data_root() / "cifar10" / "test.npz") as archive:
        x, y = archive["x"][:500], archive["y"][:500]
    inputs = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - torch.tensor(datd_own_norm.MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(datd_own_norm.STD).view(1, 3, 1, 1)
    with torch.no_grad():
        own = float((datd_own_norm.make()(inputs).argmax(1).numpy() == y).mean())
    mean, std = ",".join(map(str, datd_own_norm.MEAN)), ",".join(map(str, datd_own_norm.STD))
    result = invoke(["eval", "--model", "datd_own_norm:make", "--mean", mean, "--std", std, "--size", "32",
                     "--data", "cifar10:test", "--limit", "500"])
    assert result.exit_code == 0, result.output
    assert f"accuracy  {100 * own:.2f}%" in result.output
    wrong = invoke(["eval", "--model", "datd_own_norm:make", "--data", "cifar10:test", "--limit", "500"])
    assert f"accuracy  {100 * own:.2f}%" not in wrong.output  # ImageNet's mean/std at native size: not the same


def test_fit_budget_option_scales_or_lifts_the_budgets():
    from datd.cli import DEFAULTS, _budgets
    from datd.errors import DatdError

    assert _budgets("none") == {"candidate_budget": None, "fit_budget": None}
    assert _budgets("2") == {"candidate_budget": 2 * DEFAULTS.candidate_budget, "fit_budget": 2 * DEFAULTS.fit_budget}
    for bad in ("0", "-1", "lots"):
        with pytest.raises(DatdError, match="--fit-budget"):
            _budgets(bad)
