"""Measured damage: what replacing one layer's weight really costs the model's predictions.

The planner's damage is a second-order prediction, ½ Σ_c f_c E_cc (``datd.fitting``), exact in the limit of
small output errors. Large errors leave that limit: units saturate or wake up (ReLU6, ReLU), narrow bottlenecks
pass errors on undamped, and the prediction can be far below the truth (MobileNetV2's last 1×1 layers at
40 % relative Σ-error: predicted harmless, measured ruinous). A ``DamageProbe`` measures the quantity the
prediction approximates, the mean KL divergence KL(p ‖ p̃) per image between the original model's class
probabilities p and those of the model with one layer's weight (and bias) replaced, on a fixed set of
calibration images. With Fisher sensitivities from labels sampled from the model (``datd.sensitivity``),
½ eᵀ F e is the second-order expansion of exactly this KL, so the two are in the same unit (nats per image).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .stats import batch_inputs


class DamageProbe:
    """KL(p ‖ p̃) per image (nats) of ``model`` with one layer replaced, on up to ``images`` calibration images
    (the first ones of ``batches``), in float64 on the model's device. Costs one forward pass over those images
    per call."""

    def __init__(self, model: nn.Module, batches: Iterable, images: int = 64, device: torch.device | str | None = None):
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.inputs: list[Tensor] = []
        seen = 0
        for batch in batches:
            x = batch_inputs(batch)[: images - seen]
            if x.shape[0] == 0:
                break
            self.inputs.append(x)
            seen += x.shape[0]
            if seen >= images:
                break
        if seen == 0:
            raise ValueError("the calibration data yielded no images for the damage probe")
        self.images = seen
        self.reference = [self._log_probs(x) for x in self.inputs]

    def _log_probs(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            out = self.model(x.to(self.device))
        return torch.log_softmax(out.double().flatten(1), dim=1)

    def __call__(self, module: nn.Module, weight: Tensor, bias: Tensor | None) -> float:
        """Mean KL(p ‖ p̃) when ``module`` (a Conv2d or Linear of the model) computes with ``weight`` (its
        shape) and ``bias`` instead of its own (every call of it, if it is called more than once)."""
        return self.measure(module, weight, bias)[0]

    def lower_bound(self, module: nn.Module, weight: Tensor, bias: Tensor | None, z: float = 2.0) -> float:
        """The mean KL less ``z`` standard errors of the mean over the probe images (≥ 0): what the probe
        images show beyond their own sampling noise."""
        mean, error = self.measure(module, weight, bias)
        return max(mean - z * error, 0.0)

    def measure(self, module: nn.Module, weight: Tensor, bias: Tensor | None) -> tuple[float, float]:
        """(mean KL, standard error of that mean over the probe images) with ``module`` replaced."""
        weight = weight.to(module.weight.dtype).reshape(module.weight.shape)
        bias = None if bias is None else bias.to(module.weight.dtype)

        def replace(mod: nn.Module, args: tuple, output: Tensor) -> Tensor:
            if isinstance(mod, nn.Conv2d):
                return mod._conv_forward(args[0], weight, bias)
            return F.linear(args[0], weight, bias)

        handle = module.register_forward_hook(replace)
        try:
            per_image = torch.cat([(log_p.exp() * (log_p - self._log_probs(x))).sum(dim=1)
                                   for x, log_p in zip(self.inputs, self.reference)])
        finally:
            handle.remove()
        error = float(per_image.std() / per_image.numel() ** 0.5) if per_image.numel() > 1 else 0.0
        return max(float(per_image.mean()), 0.0), error
