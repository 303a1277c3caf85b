"""The command line: help, bad input, and the statistics round trip (fast paths only)."""

import pytest
from click.testing import CliRunner

from datd.cli import main


def invoke(args):
    return CliRunner().invoke(main, args)


def test_help_documents_every_option():
    out = invoke(["compress", "--help"]).output
    for option in ("--model", "--weights", "--data", "--calib", "--target", "--method", "--norm", "--ranks", "--stats",
                   "--eval-data", "--out", "--device", "--seed", "--bias-correction", "--latency-batch", "--rank-multiple",
                   "--memory-format", "--latency-cache", "--measure-latency"):
        assert option in out
    assert "latency=F" in out
    for command in ("compress", "stats", "eval", "export", "demo"):
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
    (["export", "no-such-dir", "--out", "m.onnx"], "no-such-dir"),
])
def test_bad_input_exits_with_a_clear_message(args, message):
    result = invoke(args)
    assert result.exit_code == 2
    assert message in result.output


def test_stats_of_another_model_are_refused(tmp_path):
    stats = tmp_path / "r20.safetensors"
    result = invoke(["stats", "--model", "cifar_resnet20", "--data", "cifar10:test", "--calib", "16", "--out", str(stats)])
    assert result.exit_code == 0, result.output
    result = invoke(["compress", "--model", "cifar_resnet56", "--data", "cifar10:test", "--calib", "16",
                     "--stats", str(stats), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "statistics do not match the model" in result.output
    assert not (tmp_path / "out").exists()
