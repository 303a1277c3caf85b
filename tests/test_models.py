"""Model sources: CIFAR ResNets with the shipped checkpoints, torchvision classifiers, user callables."""

from __future__ import annotations

import re
import textwrap
import urllib.error
import warnings

import pytest
import torch
import torchvision
from torch import nn

from datd.data import data_root, eval_loader
from datd.models import CifarResNet, LoadedModel, PadShortcut, list_models, load_model

BLOCK_KEY = re.compile(r"layer[123]\.\d+\.(conv1|bn1|conv2|bn2)\.\w+")
TOP_KEY = re.compile(r"(conv1|bn1|linear)\.\w+")


@torch.inference_mode()
def top1_correct(loaded: LoadedModel, spec: str) -> tuple[int, int]:
    correct = total = 0
    for x, y in eval_loader(spec, loaded.preprocessing, num_classes=loaded.num_classes):
        correct += int((loaded.model(x).argmax(1) == y).sum())
        total += len(y)
    return correct, total


def checkpoint(depth: int) -> str:
    (path,) = (data_root() / "models").glob(f"akamaster_resnet{depth}-*.th")
    return str(path)


def test_shipped_resnet20_accuracy() -> None:
    loaded = load_model("cifar_resnet20")
    assert loaded.weights == checkpoint(20)
    assert loaded.num_classes == 10 and not loaded.model.training
    assert top1_correct(loaded, "cifar10") == (9173, 10000)  # 91.73 %, as published


@pytest.mark.slow
def test_shipped_resnet56_accuracy() -> None:
    assert top1_correct(load_model("cifar_resnet56"), "cifar10") == (9339, 10000)  # 93.39 %


@pytest.mark.parametrize("depth, blocks", [(20, 3), (56, 9)])
def test_state_dict_names_match_readme_and_checkpoint(depth: int, blocks: int) -> None:
    model = CifarResNet(depth)
    names = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    assert all(TOP_KEY.fullmatch(k) or BLOCK_KEY.fullmatch(k) for k in names)
    assert {k.split(".")[1] for k in names if k.startswith("layer3.")} == {str(i) for i in range(blocks)}
    stored = torch.load(checkpoint(depth), map_location="cpu", weights_only=True)["state_dict"]
    assert {k.removeprefix("module.") for k in stored} == set(names)
    if depth == 20:
        assert sum(p.numel() for p in model.parameters()) == 269_722


def test_pad_shortcut() -> None:
    x = torch.randn(2, 16, 32, 32)
    out = PadShortcut(8)(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_cifar_model_prints_and_scripts() -> None:
    model = load_model("cifar_resnet20", "none").model
    text = repr(model)
    assert "PadShortcut(pad=8)" in text and "PadShortcut(pad=16)" in text and "Lambda" not in text
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, but must still work
        scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_random_init_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = load_model("cifar_resnet32", "none")
    after = torch.rand(3)
    b = load_model("cifar_resnet32", "none")
    assert torch.equal(after, expected)
    assert a.weights == "none"
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)


def test_checkpoint_formats(tmp_path) -> None:
    reference = load_model("cifar_resnet20", "none").model
    state = reference.state_dict()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x)
    files = {
        "raw.pt": state,
        "wrapped.th": {"state_dict": {f"module.{k}": v for k, v in state.items()}, "best_prec1": 1.0},
    }
    for file_name, obj in files.items():
        torch.save(obj, tmp_path / file_name)
        loaded = load_model("cifar_resnet20", str(tmp_path / file_name))
        assert loaded.weights == str(tmp_path / file_name)
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(x), expected)


def test_bad_weights_give_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="weights file not found: .*nope.th"):
        load_model("cifar_resnet20", str(tmp_path / "nope.th"))
    with pytest.raises(ValueError, match="does not fit model cifar_resnet20.*looks like a cifar_resnet56"):
        load_model("cifar_resnet20", checkpoint(56))
    torch.save(CifarResNet(20), tmp_path / "pickled_module.pt")  # a full pickle: refused by weights_only
    with pytest.raises(ValueError, match="pickled_module.pt.*weights_only=True"):
        load_model("cifar_resnet20", str(tmp_path / "pickled_module.pt"))
    torch.save({"a": 1}, tmp_path / "not_a_state_dict.pt")
    with pytest.raises(ValueError, match="not_a_state_dict.pt does not hold a state dict"):
        load_model("cifar_resnet20", str(tmp_path / "not_a_state_dict.pt"))


def test_missing_shipped_checkpoint(tmp_path, monkeypatch) -> None:
    (tmp_path / "models").mkdir()
    monkeypatch.setenv("DATD_DATA", str(tmp_path))
    with pytest.raises(ValueError, match="no shipped checkpoint for cifar_resnet20.*--weights PATH.*--weights none"):
        load_model("cifar_resnet20")


def test_unknown_model_names() -> None:
    for name in ("resnet_cifar20", "cifar_resnet21", "fasterrcnn_resnet50_fpn"):
        with pytest.raises(ValueError, match="unknown model"):
            load_model(name)


def test_list_models() -> None:
    names = list_models()
    assert names[:5] == ["cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "cifar_resnet110"]
    assert {"resnet18", "resnet50", "googlenet", "mobilenet_v2", "inception_v3"} <= set(names)
    assert "fasterrcnn_resnet50_fpn" not in names


@pytest.mark.parametrize("name, size", [("resnet18", 224), ("googlenet", 224), ("squeezenet1_1", 224),
                                        ("inception_v3", 299)])
def test_torchvision_random_init(name: str, size: int) -> None:
    with pytest.warns(UserWarning, match="accuracy will be meaningless"):
        loaded = load_model(name)
    assert loaded.weights == "none" and loaded.num_classes == 1000 and not loaded.model.training
    p = loaded.preprocessing
    assert (p.mean, p.std, p.size) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), size)
    with torch.no_grad():
        out = loaded.model(torch.randn(2, 3, size, size))
    assert type(out) is torch.Tensor and out.shape == (2, 1000)


def test_default_weights_offline(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    message = re.escape("could not download torchvision weights 'DEFAULT' for resnet18 (offline?)")
    with pytest.raises(RuntimeError, match=message + ".*--weights PATH"):
        load_model("resnet18", "DEFAULT")
    with pytest.raises(FileNotFoundError, match="IMAGENET1K_V1"):
        load_model("resnet18", "IMAGENET1K_V9")


def test_torchvision_weights_from_path(tmp_path) -> None:
    torch.manual_seed(1)
    source = torchvision.models.get_model("googlenet", weights=None, aux_logits=True, init_weights=True)
    torch.save(source.state_dict(), tmp_path / "googlenet.pth")  # with aux-head keys, like torchvision's files
    loaded = load_model("googlenet", str(tmp_path / "googlenet.pth"))
    assert loaded.model.transform_input and loaded.model.aux1 is None
    torch.testing.assert_close(loaded.model.fc.weight, source.fc.weight)
    with pytest.raises(ValueError, match="does not fit model resnet18"):
        load_model("resnet18", str(tmp_path / "googlenet.pth"))


FACTORY_MODULE = """
    from torch import nn

    def make():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7))

    def not_a_module():
        return 3

    VALUE = 5
"""


def test_callable_models(tmp_path, monkeypatch) -> None:
    (tmp_path / "datd_test_factory.py").write_text(textwrap.dedent(FACTORY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model("datd_test_factory:make")
    assert loaded.num_classes == 7 and loaded.weights is None and loaded.preprocessing.size is None
    assert isinstance(loaded.model, nn.Sequential) and not loaded.model.training

    state = {k: torch.full_like(v, 0.5) for k, v in loaded.model.state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    reloaded = load_model("datd_test_factory:make", str(tmp_path / "w.pt"))
    assert bool((reloaded.model[3].weight == 0.5).all())

    with pytest.raises(TypeError, match="returned int, expected a torch.nn.Module"):
        load_model("datd_test_factory:not_a_module")
    with pytest.raises(TypeError, match="not callable"):
        load_model("datd_test_factory:VALUE")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_model("datd_test_factory:missing")
    with pytest.raises(ValueError, match="cannot import module 'datd_no_such_module'"):
        load_model("datd_no_such_module:make")


def test_timm_models_by_name(monkeypatch, tmp_path) -> None:
    import timm  # the optional extra datd[timm]; `make test` installs it


    with pytest.warns(UserWarning, match="accuracy will be meaningless"):
        loaded = load_model("timm:resnet18", "none")
    p = loaded.preprocessing
    # timm's pretrained config for resnet18 (a1_in1k): ImageNet mean/std, 224 crop at crop_pct 0.95, bicubic
    assert (p.mean, p.std, p.size, p.resize, p.interpolation) == (
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224, 235, "bicubic")
    assert loaded.num_classes == 1000 and not loaded.model.training
    again = load_model("timm:resnet18", "none").model
    for a, b in zip(loaded.model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)  # random init is seeded
    torch.save(loaded.model.state_dict(), tmp_path / "w.pth")
    assert load_model("timm:resnet18", str(tmp_path / "w.pth")).weights == str(tmp_path / "w.pth")
    with pytest.raises(ValueError, match="does not fit model timm:resnet34"):
        load_model("timm:resnet34", str(tmp_path / "w.pth"))
    with pytest.raises(ValueError, match="unknown timm model 'resnet_nonexistent'"):
        load_model("timm:resnet_nonexistent")

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    with pytest.raises(RuntimeError, match=r"could not download timm's pretrained weights for resnet18 \(offline\?\)"):
        load_model("timm:resnet18", "DEFAULT")
