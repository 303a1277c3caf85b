"""Model sources: the CIFAR-10 ResNets, torchvision classifiers, timm models ('timm:<name>', optional extra
``datd[timm]``) and user callables, with their preprocessing."""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from .data import INTERPOLATIONS, Preprocessing, data_root
from .errors import DatdError, MissingFileError, reading

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_DEPTHS = (20, 32, 44, 56, 110)
CIFAR_NAMES = tuple(f"cifar_resnet{d}" for d in CIFAR_DEPTHS)
TIMM_PREFIX = "timm:"
_AUX_HEADS = ("aux1", "aux2", "AuxLogits")  # googlenet / inception_v3 training-only heads


@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode, on CPU
    name: str  # the name it was asked by
    weights: str | None  # what was loaded ('none' for random init, a path, 'DEFAULT', ...)
    preprocessing: Preprocessing
    num_classes: int


# --------------------------------------------------------------------------------------------------------------
# CIFAR-10 ResNets (He et al. 2016, CIFAR variant with the parameter-free "option A" shortcut)


class PadShortcut(nn.Module):
    """Option-A shortcut: (N, C, H, W) -> (N, C + 2·pad, ⌈H/2⌉, ⌈W/2⌉), spatial subsampling by 2 and zero
    channels added on both sides."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus shortcut: (N, in, H, W) -> (N, out, H/stride, W/stride)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = PadShortcut(out_channels // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of ``depth`` = 6n+2 layers: (N, 3, 32, 32) -> (N, num_classes) logits."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise DatdError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# --------------------------------------------------------------------------------------------------------------
# public API


def list_models() -> list[str]:
    """CIFAR ResNet names followed by all torchvision classification model names (timm models, 'timm:<name>',
    are listed by ``timm.list_models()``)."""
    return [*CIFAR_NAMES, *_torchvision_names()]


def load_model(name: str, weights: str | None = None) -> LoadedModel:
    """Build model ``name`` ('cifar_resnet56', a torchvision classifier such as 'resnet18', 'timm:<name>' or
    'package.module:callable') and load ``weights`` (None: the default for that source, 'none': random init,
    'DEFAULT' / a torchvision weights enum name / timm's pretrained tag, or a state-dict file). Returns it in eval
    mode on CPU."""
    if name in CIFAR_NAMES:
        loaded = _load_cifar(name, weights)
    elif name.startswith(TIMM_PREFIX):
        loaded = _load_timm(name, weights)
    elif ":" in name:
        loaded = _load_callable(name, weights)
    elif name in _torchvision_names():
        loaded = _load_torchvision(name, weights)
    else:
        raise DatdError(
            f"unknown model {name!r}: expected one of {', '.join(CIFAR_NAMES)}, "
            "a torchvision classification model name (e.g. resnet18, resnet50, googlenet, mobilenet_v2; "
            "see list_models()), 'timm:<name>' or 'package.module:callable'"
        )
    loaded.model.cpu().eval()
    return loaded


# --------------------------------------------------------------------------------------------------------------
# sources


def _load_cifar(name: str, weights: str | None) -> LoadedModel:
    depth = int(name.removeprefix("cifar_resnet"))
    if weights is None:
        found = sorted((data_root() / "models").glob(f"akamaster_resnet{depth}-*.th"))
        if not found:
            raise DatdError(
                f"no shipped checkpoint for {name} in {data_root() / 'models'}: "
                "pass --weights PATH (a state dict) or --weights none (random init)"
            )
        weights = str(found[0])
    if _is_none(weights):
        model = _seeded(lambda: CifarResNet(depth))
        weights = "none"
    else:
        if weights == "DEFAULT":
            raise DatdError(f"{name} has no torchvision weights: pass a state-dict path, or omit --weights")
        model = CifarResNet(depth)
        state = _read_state_dict(weights)
        _apply_state_dict(model, state, weights, name, hint=_cifar_depth_hint(state, depth))
    preprocessing = Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD, size=32)
    return LoadedModel(model, name, weights, preprocessing, num_classes=model.linear.out_features)


def _load_torchvision(name: str, weights: str | None) -> LoadedModel:
    enum = torchvision.models.get_model_weights(name)
    has_aux = name in ("googlenet", "inception_v3")
    size, resize = (299, 342) if name == "inception_v3" else (224, 256)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    state: dict[str, Tensor] | None = None
    if weights is None or _is_none(weights):
        warnings.warn(
            f"{name} has random weights (weights 'none'): its accuracy will be meaningless; "
            "pass --weights DEFAULT or --weights PATH for a trained model",
            stacklevel=3,
        )
        kwargs = {"init_weights": True} if has_aux else {}
        model = _seeded(lambda: torchvision.models.get_model(name, weights=None, **kwargs))
        weights = "none"
    elif weights in enum.__members__:
        member = enum[weights]
        try:
            model = torchvision.models.get_model(name, weights=member)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            raise RuntimeError(
                f"could not download torchvision weights {weights!r} for {name} (offline?): download them on a "
                f"machine with internet access and pass the file with --weights PATH ({exc})"
            ) from exc
        transforms = member.transforms()
        size, resize = transforms.crop_size[0], transforms.resize_size[0]
        mean, std = tuple(transforms.mean), tuple(transforms.std)
    else:
        if not Path(weights).is_file():
            raise MissingFileError(
                f"weights file not found: {weights} (torchvision weights for {name} are "
                f"{', '.join(enum.__members__)}, or 'none')"
            )
        state = _read_state_dict(weights)
        # torchvision's own googlenet/inception checkpoints expect its input re-normalisation
        kwargs = {"init_weights": False, "transform_input": True} if has_aux else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    if has_aux:  # eval-mode outputs are plain tensors and no unused layers remain
        model.aux_logits = False
        for head in _AUX_HEADS:
            if hasattr(model, head):
                setattr(model, head, None)
        if state is not None:
            state = {k: v for k, v in state.items() if k.split(".")[0] not in _AUX_HEADS}
    if state is not None:
        _apply_state_dict(model, state, weights, name)
    preprocessing = Preprocessing(mean=mean, std=std, size=size, resize=resize)  # type: ignore[arg-type]
    return LoadedModel(model, name, weights, preprocessing, num_classes=_num_classes(model, name))


def _load_timm(name: str, weights: str | None) -> LoadedModel:
    """A timm model with timm's own pretrained data config (mean, std, input size, crop, interpolation).

    weights: None or 'none': random init (with a warning); 'DEFAULT' / 'pretrained': timm's pretrained weights
    (downloaded; a clear error offline); otherwise a state-dict file."""
    try:
        import timm
        from timm.data import resolve_data_config
    except ImportError as exc:
        raise DatdError(f"model {name!r} needs timm: pip install 'datd[timm]'") from exc
    arch = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch}*")[:8]
        raise DatdError(f"unknown timm model {arch!r}" + (f" (did you mean: {', '.join(close)}?)" if close else ""))
    if weights is None or _is_none(weights):
        warnings.warn(f"{name} has random weights (weights 'none'): its accuracy will be meaningless; "
                      "pass --weights DEFAULT or --weights PATH for a trained model", stacklevel=3)
        model = _seeded(lambda: timm.create_model(arch, pretrained=False))
        weights = "none"
    elif weights in ("DEFAULT", "pretrained"):
        try:
            model = timm.create_model(arch, pretrained=True)
        except Exception as exc:  # huggingface_hub / urllib raise many types when offline
            raise RuntimeError(
                f"could not download timm's pretrained weights for {arch} (offline?): download them on a machine "
                f"with internet access and pass the file with --weights PATH ({type(exc).__name__}: {exc})"
            ) from exc
    else:
        if not Path(weights).is_file():
            raise MissingFileError(f"weights file not found: {weights} (timm weights are 'DEFAULT', or 'none')")
        model = timm.create_model(arch, pretrained=False)
        _apply_state_dict(model, _read_state_dict(weights), weights, name)
    config = resolve_data_config({}, model=model)
    size = int(config["input_size"][-1])
    crop = float(config.get("crop_pct") or 1.0)
    interpolation = config.get("interpolation", "bilinear")
    preprocessing = Preprocessing(
        mean=tuple(config["mean"]), std=tuple(config["std"]), size=size,  # type: ignore[arg-type]
        resize=max(size, int(size / crop)) if config.get("crop_mode", "center") == "center" else None,
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear",
    )
    num_classes = getattr(model, "num_classes", 0) or _num_classes(model, name)
    return LoadedModel(model, name, weights, preprocessing, num_classes=num_classes)


def _load_callable(name: str, weights: str | None) -> LoadedModel:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise DatdError(f"model {name!r}: expected 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DatdError(f"model {name!r}: cannot import module {module_name!r}: {exc}") from exc
    try:
        factory = functools.reduce(getattr, attr.split("."), module)
    except AttributeError as exc:
        raise DatdError(f"model {name!r}: module {module_name!r} has no attribute {attr!r}") from exc
    if not callable(factory):
        raise TypeError(f"model {name!r}: {attr!r} is not callable")
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r}: {attr}() returned {type(model).__name__}, expected a torch.nn.Module")
    if weights is not None:
        if _is_none(weights):
            raise DatdError(f"model {name!r}: weights 'none' is not supported for callables; omit --weights to keep "
                            "the callable's own weights")
        _apply_state_dict(model, _read_state_dict(weights), weights, name)
    preprocessing = Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return LoadedModel(model, name, weights, preprocessing, num_classes=_num_classes(model, name))


# --------------------------------------------------------------------------------------------------------------
# helpers


@functools.cache
def _torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def _is_none(weights: str) -> bool:
    return weights.lower() == "none"


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    """Run ``build()`` under torch.manual_seed(0) without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def _read_state_dict(path: str) -> dict[str, Tensor]:
    """Tensors of a state-dict file (raw, or under 'state_dict'; a DataParallel 'module.' prefix is removed)."""
    file = Path(path)
    if not file.is_file():
        raise MissingFileError(f"weights file not found: {path}")
    with reading(f"weights file {path} as a state dict (loaded with weights_only=True: pickled objects other than "
                 "tensors and containers are refused)"):
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(file)
        else:
            obj = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise DatdError(f"weights file {path} does not hold a state dict (names -> tensors, or {{'state_dict': ...}})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _apply_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str, name: str, hint: str = "") -> None:
    """Load ``state`` strictly, raising a ValueError that names ``source`` and the misfits."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in state and state[k].shape != own[k].shape]
    problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("shape mismatches, file vs model", mismatched)) if keys]
    if problems:
        raise DatdError(f"weights file {source} does not fit model {name}: {'; '.join(problems)}{hint}")
    model.load_state_dict(state, strict=True)


def _cifar_depth_hint(state: Mapping[str, Tensor], depth: int) -> str:
    blocks = {k.split(".")[1] for k in state if k.startswith("layer1.")}
    if blocks and 6 * len(blocks) + 2 != depth:
        return f" (it looks like a cifar_resnet{6 * len(blocks) + 2} checkpoint)"
    return ""


def _num_classes(model: nn.Module, name: str) -> int:
    """Outputs of the last Linear (else the last Conv2d, as in SqueezeNet) in definition order."""
    linears = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    if linears or convs:
        return (linears or convs)[-1]
    raise DatdError(f"model {name!r} has no Linear or Conv2d layer to read its number of classes from")
