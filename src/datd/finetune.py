"""Optional distillation: ``distill(student, teacher, data, epochs=N)`` fine-tunes a compressed model to
reproduce the original one's outputs, for users who have the time (datd's results stand without it).

The loss is the KL divergence KL(p_teacher ‖ p_student) of the softened outputs (temperature T, scaled by T²),
plus, when the batches carry labels and ``label_weight`` > 0, that weight times the cross-entropy with the
labels. Adam with a cosine learning-rate decay over all steps; BatchNorm statistics stay frozen (eval mode:
a small unlabelled set would only add noise to them), their affine parameters train. Each epoch sees the
images in an order seeded by (seed, epoch), so a run resumed from its checkpoint (written atomically after every
epoch: model, optimizer and schedule, ``weights_only``-loadable) ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .errors import DatdError, reading
from .io import atomic_path
from .stats import batch_inputs

CHECKPOINT_FORMAT = "datd-finetune/1"


def _freeze_batchnorm(model: nn.Module) -> None:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def distill(student: nn.Module, teacher: nn.Module, data: DataLoader, *, epochs: int = 1, lr: float = 1e-4,
            temperature: float = 1.0, label_weight: float = 0.0, mirror: bool = True, seed: int = 0,
            device: str | torch.device = "cpu",
            checkpoint: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
            on_epoch: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Fine-tune ``student`` in place (epochs over ``data``'s dataset, reshuffled each epoch, its batch size);
    return one {"epoch", "loss", "lr"} per epoch run. ``mirror``: each image is flipped left-right with
    probability ½ (the same input for both models; off for data whose meaning has a side, like text or digits).
    ``checkpoint``: a file written after every epoch;
    ``resume``: continue from it (it must be of the same number of epochs and settings)."""
    if epochs < 1 or lr <= 0 or temperature <= 0 or label_weight < 0:
        raise DatdError("distillation needs epochs >= 1, lr > 0, temperature > 0 and label_weight >= 0")
    device = torch.device(device)
    student.to(device)
    teacher.to(device).eval()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    steps = epochs * len(data)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    settings = {"epochs": epochs, "lr": lr, "temperature": temperature, "label_weight": label_weight, "seed": seed,
                "mirror": mirror, "batches": len(data)}
    history: list[dict] = []
    start = 0
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        with reading(f"the fine-tuning checkpoint {checkpoint}"):
            saved = torch.load(checkpoint, map_location=device, weights_only=True)
            if saved.get("format") != CHECKPOINT_FORMAT or saved.get("settings") != settings:
                raise DatdError(f"{checkpoint} is a checkpoint of another fine-tuning run; run without --resume to "
                                "start over")
            student.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["schedule"])
            start, history = int(saved["epoch"]), list(saved["history"])
    for epoch in range(start, epochs):
        torch.manual_seed(seed * 1_000_003 + epoch)  # dropout and anything else random in the model, per epoch
        order = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        loader = DataLoader(data.dataset, batch_size=data.batch_size, shuffle=True, generator=order,
                            num_workers=data.num_workers)
        _freeze_batchnorm(student)
        total = seen = 0.0
        for batch in tqdm(loader, desc=f"distill {epoch + 1}/{epochs}", unit="batch", disable=not progress, leave=False):
            x = batch_inputs(batch).to(device)
            if mirror:
                flip = (torch.rand(x.shape[0], generator=order) < 0.5).to(device)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            with torch.no_grad():
                target = F.log_softmax(teacher(x) / temperature, dim=1)
            logits = student(x)
            loss = F.kl_div(F.log_softmax(logits / temperature, dim=1), target, log_target=True,
                            reduction="batchmean") * temperature ** 2
            if label_weight and isinstance(batch, (tuple, list)) and len(batch) > 1:
                loss = loss + label_weight * F.cross_entropy(logits, batch[1].to(device))
            if not torch.isfinite(loss):
                raise DatdError(f"the distillation loss became {loss.item()} in epoch {epoch + 1}: lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * x.shape[0]
            seen += x.shape[0]
        history.append({"epoch": epoch + 1, "loss": total / seen, "lr": optimizer.param_groups[0]["lr"]})
        if checkpoint is not None:
            with atomic_path(checkpoint) as tmp:
                torch.save({"format": CHECKPOINT_FORMAT, "settings": settings, "epoch": epoch + 1, "history": history,
                            "model": student.state_dict(), "optimizer": optimizer.state_dict(),
                            "schedule": schedule.state_dict()}, tmp)
        if on_epoch is not None:
            on_epoch(epoch + 1, history[-1])
    student.eval()
    return history


def mean_kl(student: nn.Module, teacher: nn.Module, batches, *, device: str | torch.device = "cpu") -> float:
    """Mean KL(p_teacher ‖ p_student) per image (nats) over ``batches``: how far the student is from the teacher."""
    total = seen = 0.0
    student.eval(), teacher.eval()
    with torch.no_grad():
        for batch in batches:
            x = batch_inputs(batch).to(device)
            total += F.kl_div(F.log_softmax(student(x), 1), F.log_softmax(teacher(x), 1), log_target=True,
                              reduction="sum").item()
            seen += x.shape[0]
    return total / seen


__all__ = ["distill", "mean_kl"]
