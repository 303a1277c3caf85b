"""How much an error in each layer's output hurts the model's predictions (no labels needed).

For a perturbation δ of a layer's output y, the expected KL divergence between the model's original and
perturbed predictive distributions is, to second order, ½ δᵀ F δ with F the Fisher information of the
model's own predictive distribution w.r.t. y: F = E_{ŷ ~ p(·|x)}[g gᵀ], g = ∇_y log p(ŷ | x). We keep the
diagonal summed over spatial positions, per output channel c:

    f_c = E_x Σ_positions E_ŷ[g_{c,pos}²]       (estimated with one sampled ŷ per image, seeded)

so that a compressed layer whose per-position output error has covariance E (= (W − W̃) Σ (W − W̃)ᵀ, see
MISSION.md) is predicted to cost ½ Σ_c f_c E_cc nats per image. These predictions make the errors of
different layers comparable, which is what a global rank allocation needs.

That sum treats the errors at different positions of one image as independent. They are not: an error
e_p = (W − W̃) x_p follows the inputs, which share much of their content across an image, and a layer that
feeds a global pooling sees the gradients g_p of all its positions alike, so (Σ_p g_p e_p)² can be P times
Σ_p g_p² e_p². Splitting each image's error into its mean over positions ē and the rest ẽ_p (and its
gradients likewise), the second-order damage per channel is

    ½ ( A_c E[ē_c²] + B_c E[ẽ_c²] ),   A_c = E(Σ_p g_cp)²,   B_c = E Σ_p g_cp² − A_c / P,

with E[ē ēᵀ] and E[ẽ ẽᵀ] from the pooled input moment Σ̄ (``LayerStats.sigma_pooled``) and Σ − Σ̄. A channel
whose gradients are the same at every position (before a global pooling) has B_c = 0 and A_c = P·f_c; one
whose gradients are independent across positions has A_c ≈ f_c ≈ B_c, the old prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .stats import batch_inputs


@dataclass
class Sensitivity:
    """Per-output-channel weights (T,) float64 of a layer's predicted damage: ``total`` f_c (errors at
    independent positions), ``pooled`` A_c (for the per-image mean of the error) and ``spread`` B_c (for its
    variation over positions)."""

    total: Tensor
    pooled: Tensor
    spread: Tensor

    @classmethod
    def uniform(cls, channels: int, device: torch.device | str | None = None) -> "Sensitivity":
        """All ones: the plain mean squared output error."""
        ones = torch.ones(channels, dtype=torch.float64, device=device)
        return cls(ones, ones, ones)

    @classmethod
    def relative(cls, channels: int, energy: float, device: torch.device | str | None = None) -> "Sensitivity":
        """All 1 / ``energy`` (the layer's E‖W x‖² per position): the damage becomes half the squared relative output
        error, comparable across layers of any scale. The fallback where the Fisher carries no information
        (``uninformative``)."""
        if energy <= 0:
            return cls.uniform(channels, device)
        weights = torch.full((channels,), 1.0 / energy, dtype=torch.float64, device=device)
        return cls(weights, weights, weights)

    @classmethod
    def measured(cls, total: Tensor, pooled: Tensor, positions: int) -> "Sensitivity":
        return cls(total, pooled, (total - pooled / positions).clamp_min(0))

    def chunk(self, groups: int) -> list["Sensitivity"]:
        """Per-group slices over consecutive output channels."""
        return [Sensitivity(*parts) for parts in zip(*(w.chunk(groups) for w in (self.total, self.pooled, self.spread)))]

    def to(self, device: torch.device | str) -> "Sensitivity":
        return Sensitivity(self.total.to(device), self.pooled.to(device), self.spread.to(device))


def uninformative(measured: dict[str, Sensitivity]) -> bool:
    """True when the measured sensitivities cannot rank any layer's errors: all zero (the model's predictions are
    certain on every sensitivity image, so log p(ŷ | x) has no gradient, as in a network with random weights whose
    logits reach 1e8) or not finite."""
    totals = [float(s.total.sum()) for s in measured.values()]
    return bool(totals) and (not all(map(math.isfinite, totals)) or max(totals) <= 0.0)


def output_sensitivity(
    model: nn.Module,
    batches: Iterable,
    layers: dict[str, nn.Module],
    *,
    max_images: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Sensitivity]:
    """Per-output-channel Fisher sensitivities (``Sensitivity``) for each of ``layers`` (name -> module of
    ``model``), from up to ``max_images`` calibration images."""
    device = device if device is not None else next(model.parameters()).device
    with SensitivityMeter(model, layers, seed=seed) as meter:
        for batch in tqdm(batches, desc="sensitivity", unit="batch", disable=not progress, leave=False):
            x = batch_inputs(batch)
            if max_images is not None:
                x = x[: max_images - meter.images]
            if x.shape[0] == 0:
                break
            meter.step(x.to(device))
            if max_images is not None and meter.images >= max_images:
                break
    return meter.result()


class SensitivityMeter:
    """``output_sensitivity`` for a caller that chooses the batches (``datd.calibration``: the statistics and the
    sensitivities in one pass): within ``with``, ``step(x)`` runs the model forward and backward on x and adds its
    images' squared gradients; ``result()`` after the last. Forward passes run by others meanwhile without
    gradients (``torch.no_grad``) are not counted."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], *, seed: int = 0):
        self.model, self.layers = model, layers
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.sums = {name: torch.zeros(module.weight.shape[0], dtype=torch.float64) for name, module in layers.items()}
        self.pooled = {name: torch.zeros_like(s) for name, s in self.sums.items()}
        self.positions: dict[str, int] = {}
        self.images = 0
        self._handles: list = []
        self._trainable: list[nn.Parameter] = []
        self._was_training = model.training

    def _hook(self, name: str):
        sums, pooled, positions = self.sums[name], self.pooled[name], self.positions

        def forward_hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not output.requires_grad:  # a forward pass without gradients (another pass's images)
                return

            def grad_hook(grad: Tensor) -> None:
                # float32 reductions (cascaded sums, ~1e-7 relative), float64 totals: no float64 or channels-last
                # copy of the gradient (those copies cost about one forward pass on ResNet-50: 3.9× → 2.9×)
                g = grad.detach()
                g = (g if g.dim() > 1 else g[None]).to(torch.promote_types(g.dtype, torch.float32))
                if isinstance(module, nn.Conv2d):  # (N, T, H, W): positions are the last two dims
                    dims, per_image = (0, 2, 3), g.sum(dim=(2, 3))
                    count = g.shape[2] * g.shape[3]
                else:  # (N, …, T): positions are the middle dims
                    g = g.reshape(g.shape[0], -1, g.shape[-1])
                    dims, per_image, count = (0, 1), g.sum(dim=1), g.shape[1]
                pooled_sq = per_image.double().square().sum(dim=0).cpu()
                # one position: the same float64 sums, so total == pooled and the spread is exactly 0
                sums.add_(pooled_sq if count == 1 else g.square().sum(dim=dims).double().cpu())
                pooled.add_(pooled_sq)
                positions[name] = count

            output.register_hook(grad_hook)

        return forward_hook

    def __enter__(self) -> "SensitivityMeter":
        self._was_training = self.model.training
        self.model.eval()
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
        # only the gradients of layer outputs are needed: the parameters' (a weight gradient per layer, a third of the
        # backward pass) are not computed
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        for p in self._trainable:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for p in self._trainable:
            p.requires_grad_(True)
        self._handles, self._trainable = [], []
        self.model.zero_grad(set_to_none=True)
        self.model.train(self._was_training)

    def step(self, x: Tensor) -> None:
        """Forward and backward on the images ``x`` (on the model's device): one sampled label per image, seeded."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # so that the output hooks fire with the parameters frozen
            log_p = torch.log_softmax(self.model(x).double(), dim=1)
            sampled = torch.multinomial(log_p.detach().exp().cpu(), 1, generator=self.gen).to(log_p.device)
            self.model.zero_grad(set_to_none=True)
            log_p.gather(1, sampled).sum().backward()
        self.images += x.shape[0]

    def result(self) -> dict[str, Sensitivity]:
        if self.images == 0:
            raise ValueError("the calibration data yielded no images for the sensitivity pass")
        return {name: Sensitivity.measured(s / self.images, self.pooled[name] / self.images,
                                           self.positions.get(name, 1)) for name, s in self.sums.items()}
