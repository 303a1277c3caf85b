"""Data sets and loaders: specs, caching, seeded calibration subsets, preprocessing, label-space checks."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datd.data import ImageDataset, calibration_loader, data_root, eval_label_check, eval_loader, load_images
from datd.data import Preprocessing

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR = Preprocessing(MEAN, STD, size=32)


def manual(images: np.ndarray, size: tuple[int, int] | None = None, crop: int | None = None) -> torch.Tensor:
    """Reference preprocessing of (N, H, W, 3) uint8: [0, 1] floats, optional bilinear resize and center crop,
    normalisation."""
    x = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255
    if size is not None:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    if crop is not None:
        top, left = round((x.shape[2] - crop) / 2), round((x.shape[3] - crop) / 2)
        x = x[:, :, top:top + crop, left:left + crop]
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def first_batch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(loader))


def test_data_root(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DATD_DATA", raising=False)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert (data_root() / "cifar10" / "test.npz").is_file()  # fails (not skips) when the shared data is missing
    monkeypatch.setenv("DATD_DATA", str(tmp_path))
    assert data_root() == tmp_path.resolve()
    monkeypatch.setenv("DATD_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="DATD_DATA"):
        data_root()
    monkeypatch.delenv("DATD_DATA")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="set DATD_DATA"):
        data_root()


def test_cifar_specs_and_cache() -> None:
    test = load_images("cifar10", "eval")
    assert test.description == "cifar10 test (10000 images)" and test.label_space == "cifar10"
    assert test.images.shape == (10000, 32, 32, 3) and test.images.dtype == np.uint8
    assert test.labels.dtype == np.int64 and set(np.unique(test.labels)) == set(range(10))
    for split in ("calib", "eval"):
        again = load_images("cifar10:test", split)
        assert again.images is test.images  # decoded once per process
    with pytest.raises(ValueError, match="read-only"):
        test.images[0, 0, 0, 0] = 1


def test_tinyimagenet32() -> None:
    tiny = load_images("tinyimagenet32", "calib")
    assert tiny.images.shape == (10000, 32, 32, 3) and tiny.label_space == "tinyimagenet200"
    assert tiny.labels.min() == 0 and tiny.labels.max() == 199
    assert load_images("tinyimagenet32", "eval").images is tiny.images


def test_eval_loader_fast_path_and_normalisation() -> None:
    images = load_images("cifar10:test", "eval")  # decode first: the timing is about conversion
    start = time.perf_counter()
    loader = eval_loader("cifar10", CIFAR, batch_size=500)
    batches = list(loader)
    assert time.perf_counter() - start < 1.0
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (10000, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, torch.tensor(images.labels))  # in order
    torch.testing.assert_close(x[:5], manual(images.images[:5]), rtol=0, atol=1e-6)
    limited = eval_loader("cifar10", CIFAR, limit=100)
    assert len(limited.dataset) == 100 and "first 100" in limited.dataset.image_set.description


def test_resize_straight() -> None:
    p = Preprocessing(MEAN, STD, size=64)
    x, _ = first_batch(eval_loader("cifar10:test", p, batch_size=4, limit=4))
    images = load_images("cifar10:test", "eval").images[:4]
    assert x.shape == (4, 3, 64, 64)
    torch.testing.assert_close(x, manual(images, size=(64, 64)), rtol=0, atol=1e-5)


def test_resize_shorter_side_then_center_crop(tmp_path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 60, 3), dtype=np.uint8)
    np.savez(tmp_path / "wide.npz", x=images)
    p = Preprocessing(MEAN, STD, size=32, resize=36)
    x, labels = first_batch(calibration_loader(str(tmp_path / "wide.npz"), p, 3, seed=0))
    order = np.random.default_rng(0).permutation(3)
    assert x.shape == (3, 3, 32, 32) and labels.tolist() == [-1, -1, -1]
    # shorter side 40 -> 36, longer 60 -> int(36 * 60 / 40) = 54, then the central 32x32
    torch.testing.assert_close(x, manual(images[order], size=(36, 54), crop=32), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="smaller than the crop"):
        ImageDataset(load_images(str(tmp_path / "wide.npz"), "eval"), Preprocessing(MEAN, STD, size=32, resize=30))


def test_calibration_loader_is_seeded() -> None:
    def images(seed: int) -> torch.Tensor:
        return torch.cat([x for x, _ in calibration_loader("cifar10:test", CIFAR, 50, batch_size=16, seed=seed)])

    a, b, c = images(0), images(0), images(1)
    assert a.shape == (50, 3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    chosen = np.random.default_rng(0).permutation(10000)[:50]
    raw = load_images("cifar10:test", "calib").images
    torch.testing.assert_close(a[:5], manual(raw[chosen[:5]]), rtol=0, atol=1e-6)
    assert len(calibration_loader("cifar10:test", CIFAR, 50, batch_size=16)) == 4
    with pytest.raises(ValueError, match="asked for 10001 calibration images"):
        calibration_loader("cifar10:test", CIFAR, 10001)


def test_calibration_split_of_cifar10_is_train() -> None:
    loader = calibration_loader("cifar10", CIFAR, 10)
    assert loader.dataset.image_set.description.startswith("cifar10 train (50000 images)")
    with pytest.raises(ValueError, match="has only 50000"):
        calibration_loader("cifar10", CIFAR, 50001)


def test_imagefolder_imagenet_sample() -> None:
    spec = f"imagefolder:{data_root() / 'imagenet-sample' / 'val'}"
    folder = load_images(spec, "eval")
    assert folder.label_space == "imagenet1k" and len(folder) == 1000
    assert np.array_equal(folder.labels, np.arange(1000))
    assert folder.images[0].parent.name == "n01440764"
    loader = eval_loader(spec, Preprocessing(MEAN, STD, size=224, resize=256), batch_size=4, limit=4,
                         num_classes=1000)
    x, y = first_batch(loader)
    assert x.shape == (4, 3, 224, 224) and y.tolist() == [0, 1, 2, 3]
    with Image.open(folder.images[1]) as img:
        raw = np.asarray(img.convert("RGB"))[None]
    torch.testing.assert_close(x[1:2], manual(raw), rtol=0, atol=1e-6)
    # resize + crop on real images: shorter side 224 -> 180, central 160
    x, _ = first_batch(eval_loader(spec, Preprocessing(MEAN, STD, size=160, resize=180), batch_size=2, limit=2))
    torch.testing.assert_close(x[1:2], manual(raw, size=(180, 180), crop=160), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="not in the model's label space"):
        eval_label_check(folder, 10)


def test_imagefolder_small(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for cls, count in (("dog", 2), ("cat", 1)):
        (tmp_path / cls).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    folder = load_images(f"imagefolder:{tmp_path}", "calib")
    assert [p.name for p in folder.images] == ["0.png", "0.png", "1.png"]
    assert folder.labels.tolist() == [0, 1, 1] and folder.label_space is None  # cat = 0, dog = 1
    x, y = ImageDataset(folder, Preprocessing(MEAN, STD))[0]  # size None: native size, greyscale -> RGB
    assert x.shape == (3, 20, 24) and y == 0
    eval_label_check(folder, 2)
    with pytest.raises(ValueError, match="labels go up to 1, the model has 1 outputs"):
        eval_label_check(folder, 1)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_images(f"imagefolder:{tmp_path / 'missing'}", "eval")
    with pytest.raises(ValueError, match="no class subfolders"):
        load_images(f"imagefolder:{tmp_path / 'cat'}", "eval")


def test_npz_with_and_without_labels(tmp_path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "unlabelled.npz", x=images)
    np.savez(tmp_path / "labelled.npz", x=images, y=np.arange(6, dtype=np.int32))
    unlabelled = load_images(str(tmp_path / "unlabelled.npz"), "calib")
    assert unlabelled.labels is None and unlabelled.label_space is None and len(unlabelled) == 6
    x, y = first_batch(calibration_loader(str(tmp_path / "unlabelled.npz"), CIFAR, 6))
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [-1] * 6
    with pytest.raises(ValueError, match="no labels"):
        eval_loader(str(tmp_path / "unlabelled.npz"), CIFAR)
    x, y = first_batch(eval_loader(str(tmp_path / "labelled.npz"), CIFAR, num_classes=6))
    assert y.dtype == torch.int64 and y.tolist() == list(range(6))
    torch.testing.assert_close(x, manual(images), rtol=0, atol=1e-6)


def test_bad_specs(tmp_path) -> None:
    for spec in ("mnist", "cifar10:val", "cifar100"):
        with pytest.raises(ValueError, match="unknown data spec"):
            load_images(spec, "eval")
    with pytest.raises(ValueError, match="unknown split"):
        load_images("cifar10", "train")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_images(str(tmp_path / "missing.npz"), "eval")
    x = np.zeros((2, 8, 8, 3), np.uint8)
    bad = {
        "no_x.npz": {"images": x},
        "grey.npz": {"x": np.zeros((2, 8, 8), np.uint8)},
        "float.npz": {"x": x.astype(np.float32)},
        "short_y.npz": {"x": x, "y": np.zeros(3, np.int64)},
        "negative_y.npz": {"x": x, "y": np.array([0, -1])},
    }
    messages = {"no_x.npz": "no array 'x'", "grey.npz": "'x' must be", "float.npz": "'x' must be",
                "short_y.npz": "'y' must be", "negative_y.npz": "negative labels"}
    for name, arrays in bad.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=messages[name]):
            load_images(str(tmp_path / name), "eval")
    (tmp_path / "text.npz").write_text("not a zip archive")
    with pytest.raises(ValueError, match="could not read .*text.npz"):
        load_images(str(tmp_path / "text.npz"), "eval")


def test_label_space_checks() -> None:
    with pytest.raises(ValueError, match="labels of tinyimagenet32 .*not in the model's label space"):
        eval_loader("tinyimagenet32", CIFAR, num_classes=10)
    eval_label_check(load_images("cifar10", "eval"), 10)
    with pytest.raises(ValueError, match="labels of cifar10 test .*not in the model's label space"):
        eval_label_check(load_images("cifar10", "eval"), 1000)
