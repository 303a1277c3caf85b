"""How much an error in each layer's output hurts the model's predictions (no labels needed).

For a perturbation δ of a layer's output y, the expected KL divergence between the model's original and
perturbed predictive distributions is, to second order, ½ δᵀ F δ with F the Fisher information of the
model's own predictive distribution w.r.t. y: F = E_{ŷ ~ p(·|x)}[g gᵀ], g = ∇_y log p(ŷ | x). We keep the
diagonal summed over spatial positions, per output channel c:

    f_c = E_x Σ_positions E_ŷ[g_{c,pos}²]       (estimated with one sampled ŷ per image, seeded)

so that a compressed layer whose per-position output error has covariance E (= (W − W̃) Σ (W − W̃)ᵀ, see
MISSION.md) is predicted to cost ½ Σ_c f_c E_cc nats per image. These predictions make the errors of
different layers comparable, which is what a global rank allocation needs.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .stats import batch_inputs


def output_sensitivity(
    model: nn.Module,
    batches: Iterable,
    layers: dict[str, nn.Module],
    *,
    max_images: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Per-output-channel Fisher sensitivities f (T,) float64 for each of ``layers`` (name -> module of
    ``model``), from up to ``max_images`` calibration images."""
    if device is None:
        device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sums = {name: torch.zeros(module.weight.shape[0], dtype=torch.float64) for name, module in layers.items()}

    def make_hook(name: str):
        def forward_hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            def grad_hook(grad: Tensor) -> None:
                channel_dim = 1 if isinstance(module, nn.Conv2d) else grad.dim() - 1
                dims = [d for d in range(grad.dim()) if d != channel_dim]
                sums[name] += (grad.detach().double() ** 2).sum(dim=dims).cpu()

            output.register_hook(grad_hook)

        return forward_hook

    was_training = model.training
    model.eval()
    handles = [m.register_forward_hook(make_hook(n)) for n, m in layers.items()]
    seen = 0
    try:
        with torch.enable_grad():
            for batch in tqdm(batches, desc="sensitivity", unit="batch", disable=not progress, leave=False):
                x = batch_inputs(batch).to(device)
                if max_images is not None:
                    x = x[: max_images - seen]
                if x.shape[0] == 0:
                    break
                x.requires_grad_(True)  # so that hooks fire even when parameters are frozen
                log_p = torch.log_softmax(model(x).double(), dim=1)
                sampled = torch.multinomial(log_p.detach().exp().cpu(), 1, generator=gen).to(log_p.device)
                model.zero_grad(set_to_none=True)
                log_p.gather(1, sampled).sum().backward()
                seen += x.shape[0]
                if max_images is not None and seen >= max_images:
                    break
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if seen == 0:
        raise ValueError("the calibration data yielded no images for the sensitivity pass")
    return {name: s / seen for name, s in sums.items()}
