"""Optional distillation: it brings the compressed model closer to the original, and resumes bit-identically."""

import copy

import pytest
import torch
import torch.nn.functional as F

from datd.data import calibration_loader
from datd.errors import DatdError
from datd.finetune import distill, mean_kl
from datd.models import load_model


@pytest.fixture(scope="module")
def setup():
    teacher = load_model("cifar_resnet20")
    data = calibration_loader("cifar10:test", teacher.preprocessing, 128, batch_size=32)
    return teacher.model, data


class Stop(Exception):
    pass


def test_distillation_brings_the_student_closer_and_resumes_bit_identically(compressed_resnet20, setup, tmp_path):
    teacher, data = setup
    student = copy.deepcopy(compressed_resnet20).eval()
    before = mean_kl(student, teacher, data)
    history = distill(student, teacher, data, epochs=2, lr=1e-3, checkpoint=tmp_path / "a.pt", progress=False)
    assert [h["epoch"] for h in history] == [1, 2] and history[1]["loss"] < history[0]["loss"]
    assert mean_kl(student, teacher, data) < 0.8 * before

    def stop(epoch, _):
        if epoch == 1:
            raise Stop  # killed after the first epoch's checkpoint
    interrupted = copy.deepcopy(compressed_resnet20)
    with pytest.raises(Stop):
        distill(interrupted, teacher, data, epochs=2, lr=1e-3, checkpoint=tmp_path / "b.pt", progress=False,
                on_epoch=stop)
    resumed = copy.deepcopy(compressed_resnet20)
    again = distill(resumed, teacher, data, epochs=2, lr=1e-3, checkpoint=tmp_path / "b.pt", resume=True,
                    progress=False)
    assert again == history
    for (name, a), b in zip(student.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_bad_distillation_settings_and_foreign_checkpoints_are_refused(compressed_resnet20, setup, tmp_path):
    teacher, data = setup
    student = copy.deepcopy(compressed_resnet20)
    with pytest.raises(DatdError, match="epochs >= 1"):
        distill(student, teacher, data, epochs=0)
    distill(student, teacher, data, epochs=1, checkpoint=tmp_path / "c.pt", progress=False)
    with pytest.raises(DatdError, match="another fine-tuning run"):
        distill(student, teacher, data, epochs=3, checkpoint=tmp_path / "c.pt", resume=True, progress=False)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DatdError, match="cannot read"):
        distill(student, teacher, data, epochs=1, checkpoint=tmp_path / "bad.pt", resume=True, progress=False)


@pytest.mark.slow
def test_datd_finetune_brings_a_compressed_resnet20_closer_to_the_original(tmp_path, compress_resnet20_cli):
    import json

    from click.testing import CliRunner

    from datd.cli import main

    out = tmp_path / "r20"
    compress_resnet20_cli(out, "params=0.25")
    before = (out / "model.safetensors").read_bytes()
    result = CliRunner().invoke(main, ["finetune", str(out), "--data", "cifar10", "--calib", "1024", "--epochs", "2",
                                       "--eval-limit", "2000"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r20-finetuned" / "finetune.json").read_text())
    assert report["kl_after"] < report["kl_before"]  # held-out images: closer to the original
    assert report["accuracy_after"] >= report["accuracy_before"] - 0.005
    assert (out / "model.safetensors").read_bytes() == before  # the no-fine-tuning result is left as it was
    assert not (tmp_path / "r20-finetuned.partial").exists()
