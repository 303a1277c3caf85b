"""Measuring a model: top-1 accuracy, parameters, multiply-accumulates (latency: ``datd.latency``)."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


def count_params(model: nn.Module) -> int:
    """All parameters of ``model`` (shared tensors once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def module_macs(module: nn.Module, output: Tensor) -> int:
    """Multiply-accumulates of one Conv2d/Linear call that produced ``output`` (all samples)."""
    if isinstance(module, nn.Conv2d):
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        return output.numel() * per_output
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


@torch.no_grad()
def count_macs(model: nn.Module, example: Tensor) -> int:
    """Conv2d + Linear multiply-accumulates per sample for an input like ``example`` (N, …), measured with
    forward hooks (other layers — BN, ReLU, pooling, additions — are not counted)."""
    total = 0

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        nonlocal total
        total += module_macs(module, output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total // example.shape[0]


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable, *, device: str | torch.device = "cpu", progress: bool = True) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (eval mode) over (input, label) batches."""
    was_training = model.training
    model.eval()
    correct = seen = 0
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    try:
        for inputs, labels in tqdm(batches, total=total, desc="evaluate", unit="batch", disable=not progress, leave=False):
            logits = model(inputs.to(device))
            correct += int((logits.argmax(dim=1).cpu() == labels).sum())
            seen += labels.shape[0]
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("no evaluation data")
    return correct / seen
