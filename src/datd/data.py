"""Data sets (CIFAR-10, Tiny-ImageNet-32, image folders, .npz files) and calibration / evaluation loaders."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode

from .errors import DatdError, MissingFileError
from .stats import check_calibration_size

SPLITS = ("calib", "eval")
_IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}
_WNID = re.compile(r"n\d{8}")
_LABEL_SPACE_CLASSES = {"cifar10": 10, "tinyimagenet200": 200, "imagenet1k": 1000}
_EAGER_LIMIT = 2**27  # in-memory arrays up to this many values are normalised once, up front (512 MiB float32)
_SPEC_HELP = "cifar10, cifar10:train, cifar10:test, tinyimagenet32, imagefolder:PATH, or a path to an .npz file"


INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  "nearest": InterpolationMode.NEAREST}


@dataclass(frozen=True)
class Preprocessing:
    """How raw RGB uint8 images become model inputs: resize (the shorter side to ``resize``, then a center crop
    of ``size``; or straight to size×size when ``resize`` is None; nothing when ``size`` is None) with
    ``interpolation``, scale to [0, 1], subtract ``mean`` and divide by ``std`` per channel."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: int | None = None
    resize: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise DatdError(f"preprocessing needs three means and three positive stds, got mean={self.mean}, "
                            f"std={self.std}")
        if self.size is not None and self.size < 1 or self.resize is not None and self.resize < 1:
            raise DatdError(f"preprocessing sizes must be positive, got size={self.size}, resize={self.resize}")
        if self.size is not None and self.resize is not None and self.resize < self.size:
            raise DatdError(f"preprocessing resize={self.resize} is smaller than the crop size={self.size}")
        if self.interpolation not in INTERPOLATIONS:
            raise DatdError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")


def data_root() -> Path:
    """The data directory: $DATD_DATA if set, else ../shared/data relative to the working directory."""
    env = os.environ.get("DATD_DATA")
    root = Path(env) if env else Path.cwd() / ".." / "shared" / "data"
    if not root.is_dir():
        where = f"DATD_DATA={env}" if env else f"{root.resolve()} (../shared/data from the working directory)"
        raise MissingFileError(
            f"data directory not found: {where}; set DATD_DATA to the folder holding cifar10/, tinyimagenet/, "
            "models/ and imagenet-sample/"
        )
    return root.resolve()


@dataclass
class ImageSet:
    images: np.ndarray | list[Path]  # (N, H, W, 3) uint8 RGB, or image file paths (loaded lazily with PIL)
    labels: np.ndarray | None  # (N,) int64, or None
    description: str  # e.g. "cifar10 train (50000 images)"
    label_space: str | None  # "cifar10", "imagenet1k", "tinyimagenet200", or None when unknown

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: np.ndarray, note: str) -> ImageSet:
        """The images at ``indices`` (K,), in that order; ``note`` is appended to the description."""
        images = self.images[indices] if isinstance(self.images, np.ndarray) else [self.images[i] for i in indices]
        labels = None if self.labels is None else self.labels[indices]
        return ImageSet(images, labels, f"{self.description} [{note}]", self.label_space)


def load_images(spec: str, split: str) -> ImageSet:
    """The ``split`` ('calib' or 'eval') of data set ``spec`` (see _SPEC_HELP)."""
    if split not in SPLITS:
        raise DatdError(f"unknown split {split!r}: expected 'calib' or 'eval'")
    if spec == "cifar10":
        part = "train" if split == "calib" else "test"
        return _npz_set(data_root() / "cifar10" / f"{part}.npz", f"cifar10 {part}", "cifar10")
    if spec in ("cifar10:train", "cifar10:test"):
        part = spec.split(":")[1]
        return _npz_set(data_root() / "cifar10" / f"{part}.npz", f"cifar10 {part}", "cifar10")
    if spec == "tinyimagenet32":
        return _npz_set(data_root() / "tinyimagenet" / "val_32x32.npz", "tinyimagenet32 val", "tinyimagenet200")
    if spec.startswith("imagefolder:"):
        return _image_folder(Path(spec.removeprefix("imagefolder:")))
    if spec.endswith(".npz") or Path(spec).is_file():
        return _npz_set(Path(spec), spec, None)
    raise DatdError(f"unknown data spec {spec!r}: expected {_SPEC_HELP}")


class ImageDataset(Dataset):
    """Items ``(x, label)``: x float32 (3, h, w) normalised per ``preprocessing``, label an int (-1 when the
    set has no labels)."""

    def __init__(self, image_set: ImageSet, preprocessing: Preprocessing) -> None:
        p = preprocessing
        self.image_set = image_set
        self.preprocessing = preprocessing
        self._mean = torch.tensor(p.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(p.std, dtype=torch.float32).view(3, 1, 1)
        images = image_set.images
        self._ready: Tensor | None = None  # (N, 3, H, W) normalised, when converted up front
        if (isinstance(images, np.ndarray) and images.size <= _EAGER_LIMIT
                and (p.size is None or images.shape[1:3] == (p.size, p.size))):
            self._ready = self._normalize(_to_float(images))

    def __len__(self) -> int:
        return len(self.image_set)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        labels = self.image_set.labels
        label = -1 if labels is None else int(labels[index])
        if self._ready is not None:
            return self._ready[index], label
        image = self.image_set.images[index]
        if isinstance(image, Path):
            with Image.open(image) as img:
                image = np.asarray(img.convert("RGB"))
        return self._normalize(self._resize(_to_float(image))), label

    def _resize(self, x: Tensor) -> Tensor:
        """(3, H, W) -> (3, size, size): shorter side to `resize` then center crop, or straight to size×size."""
        size, resize = self.preprocessing.size, self.preprocessing.resize
        mode = INTERPOLATIONS[self.preprocessing.interpolation]
        if size is None or x.shape[-2:] == (size, size):
            return x
        if resize is None:
            return TF.resize(x, [size, size], interpolation=mode, antialias=True)
        return TF.center_crop(TF.resize(x, [resize], interpolation=mode, antialias=True), [size, size])

    def _normalize(self, x: Tensor) -> Tensor:
        return x.sub_(self._mean).div_(self._std)


def calibration_loader(spec: str, preprocessing: Preprocessing, num_images: int, *, batch_size: int = 128,
                       seed: int = 0) -> DataLoader:
    """Batches (x (B, 3, h, w), labels (B,)) of ``num_images`` images drawn from the calibration split with
    numpy.random.default_rng(seed).permutation."""
    image_set = load_images(spec, "calib")
    check_calibration_size(num_images)
    if num_images > len(image_set):
        raise DatdError(f"asked for {num_images} calibration images but {image_set.description} has only "
                        f"{len(image_set)}")
    indices = np.random.default_rng(seed).permutation(len(image_set))[:num_images]
    chosen = image_set.subset(indices, f"random {num_images}, seed {seed}")
    return DataLoader(ImageDataset(chosen, preprocessing), batch_size=batch_size, shuffle=False)


def eval_loader(spec: str, preprocessing: Preprocessing, *, batch_size: int = 256, limit: int | None = None,
                num_classes: int | None = None) -> DataLoader:
    """Batches (x (B, 3, h, w), labels (B,)) of the evaluation split in order (the first ``limit`` images if
    given). With ``num_classes`` the labels are checked against the model's label space (eval_label_check).
    The ImageSet is at ``loader.dataset.image_set``."""
    image_set = load_images(spec, "eval")
    if image_set.labels is None:
        raise DatdError(f"{image_set.description} has no labels (no 'y' array): it cannot be used for evaluation")
    if num_classes is not None:
        eval_label_check(image_set, num_classes)
    if limit is not None:
        if limit < 1:
            raise DatdError(f"limit must be >= 1, got {limit}")
        if limit < len(image_set):
            image_set = image_set.subset(np.arange(limit), f"first {limit}")
    return DataLoader(ImageDataset(image_set, preprocessing), batch_size=batch_size, shuffle=False)


def eval_label_check(image_set: ImageSet, num_classes: int) -> None:
    """Raise ValueError unless the labels of ``image_set`` index the outputs of a ``num_classes``-way model:
    a known label space needs its own class count (cifar10: 10, tinyimagenet200: 200, imagenet1k: 1000), an
    unknown one needs max label < num_classes."""
    if image_set.labels is None:
        raise DatdError(f"{image_set.description} has no labels: it cannot be used for evaluation")
    expected = _LABEL_SPACE_CLASSES.get(image_set.label_space or "")
    if expected is not None:
        if expected != num_classes:
            raise DatdError(
                f"labels of {image_set.description} are not in the model's label space: they are "
                f"{image_set.label_space} classes ({expected}), the model has {num_classes} outputs"
            )
    elif len(image_set.labels) and int(image_set.labels.max()) >= num_classes:
        raise DatdError(
            f"labels of {image_set.description} are not in the model's label space: labels go up to "
            f"{int(image_set.labels.max())}, the model has {num_classes} outputs"
        )


# --------------------------------------------------------------------------------------------------------------
# helpers


def _to_float(images: np.ndarray) -> Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 in [0, 1] (a new tensor)."""
    chw = np.moveaxis(images, -1, -3)
    return torch.from_numpy(np.ascontiguousarray(chw, dtype=np.float32)).div_(255)


def _npz_set(path: Path, name: str, label_space: str | None) -> ImageSet:
    if not path.is_file():
        raise MissingFileError(f"data file not found: {path}")
    resolved = path.resolve()
    images, labels = _read_npz(str(resolved), resolved.stat().st_mtime_ns)
    return ImageSet(images, labels, f"{name} ({len(images)} images)", label_space)


@functools.lru_cache(maxsize=4)
def _read_npz(path: str, mtime_ns: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Decoded, read-only ``x`` (N, H, W, 3) uint8 and ``y`` (N,) int64 or None; cached per file version."""
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DatdError(f"could not read {path} as an .npz file: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatdError(f"{path} is not an .npz archive (expected arrays 'x' and optionally 'y')")
    with archive:
        if "x" not in archive.files:
            raise DatdError(f"{path} has no array 'x' (it has: {', '.join(archive.files) or 'nothing'})")
        images = archive["x"]
        labels = archive["y"] if "y" in archive.files else None
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DatdError(f"{path}: 'x' must be (N, H, W, 3) uint8 RGB, got {images.shape} {images.dtype}")
    if labels is not None:
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise DatdError(f"{path}: 'y' must be ({len(images)},) integers, got {labels.shape} {labels.dtype}")
        if len(labels) and labels.min() < 0:
            raise DatdError(f"{path}: 'y' has negative labels")
        labels = labels.astype(np.int64)
        labels.setflags(write=False)
    images.setflags(write=False)
    return images, labels


def _image_folder(root: Path) -> ImageSet:
    """ROOT/<class>/**/<image>: sorted class folders are labels 0..C-1, images sorted within each class."""
    if not root.is_dir():
        raise MissingFileError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatdError(f"{root} has no class subfolders (expected ROOT/<class>/<image files>)")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(f for f in (root / name).rglob("*") if f.suffix.lower() in _IMAGE_EXTENSIONS and f.is_file())
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DatdError(f"{root} has no image files ({', '.join(sorted(_IMAGE_EXTENSIONS))}) in its class folders")
    imagenet = len(classes) == 1000 and all(_WNID.fullmatch(c) for c in classes)
    description = f"imagefolder {root} ({len(paths)} images, {len(classes)} classes)"
    return ImageSet(paths, np.array(labels, dtype=np.int64), description, "imagenet1k" if imagenet else None)
