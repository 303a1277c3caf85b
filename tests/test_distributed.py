"""torchrun: two local processes (gloo) give the single-process statistics and the same compressed model."""

import json
import os
import subprocess
import sys

import pytest
import torch

from datd.stats import Statistics

COMMON = ["--model", "cifar_resnet20", "--data", "cifar10", "--calib", "320", "--batch-size", "64"]


def _run(args, processes=1):
    # one thread per process in both runs, so that each batch's float32 products come from the same kernel
    # configuration in both and only the order of the float64 sums differs
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                "-m", "datd"] if processes > 1 else [sys.executable, "-m", "datd"]
    result = subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_processes_give_the_single_process_statistics_and_model(tmp_path):
    _run(["stats", *COMMON, "--out", str(tmp_path / "one.safetensors")])
    _run(["stats", *COMMON, "--out", str(tmp_path / "two.safetensors")], processes=2)
    one, two = Statistics.load(tmp_path / "one.safetensors"), Statistics.load(tmp_path / "two.safetensors")
    assert two.num_images == one.num_images == 320 and sorted(two) == sorted(one)
    for name in one:
        a, b = one[name], two[name]
        assert (a.count, a.count_half, a.input_hw) == (b.count, b.count_half, b.input_hw)
        for key in ("sigma", "mean", "sigma_half", "mean_half", "sigma_pooled"):
            x, y = getattr(a, key), getattr(b, key)
            if x is None:
                assert y is None
                continue
            assert (torch.linalg.norm(x - y) / torch.linalg.norm(x)).item() <= 1e-10, (name, key)

    run = ["compress", *COMMON, "--target", "params=0.4", "--no-measure-latency", "--eval-limit", "100"]
    _run(run + ["--out", str(tmp_path / "one")])
    _run(run + ["--out", str(tmp_path / "two")], processes=2)
    plan = [json.loads((tmp_path / d / "plan.json").read_text())["layers"] for d in ("one", "two")]
    assert plan[0] == plan[1]
    # factors are unique only up to signs and rotations within equal singular values: compare what the models compute
    import numpy as np

    from datd import io
    from datd.data import data_root
    from datd.models import load_model

    models = [io.load(tmp_path / d, load_model("cifar_resnet20").model) for d in ("one", "two")]
    with np.load(data_root() / "cifar10" / "test.npz") as archive:
        x = torch.from_numpy(archive["x"][:64]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        logits = [m(x) for m in models]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-3, atol=1e-4 * logits[0].abs().max().item())
    assert json.loads((tmp_path / "one" / "report.json").read_text())["accuracy_after"] == \
        json.loads((tmp_path / "two" / "report.json").read_text())["accuracy_after"]
    assert not (tmp_path / "two.partial").exists()
