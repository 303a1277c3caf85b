"""Measured damage: what replacing one layer's weight really costs the model's predictions.

The planner's damage is a second-order prediction, ½ Σ_c f_c E_cc (``datd.fitting``), exact in the limit of
small output errors. Large errors leave that limit: units saturate or wake up (ReLU6, ReLU), narrow bottlenecks
pass errors on undamped, and the prediction can be far below the truth (MobileNetV2's last 1×1 layers at
40 % relative Σ-error: predicted harmless, measured ruinous). A ``DamageProbe`` measures the quantity the
prediction approximates, the mean KL divergence KL(p ‖ p̃) per image between the original model's class
probabilities p and those of the model with one layer's weight (and bias) replaced, on a fixed set of
calibration images. With Fisher sensitivities from labels sampled from the model (``datd.sensitivity``),
½ eᵀ F e is the second-order expansion of exactly this KL, so the two are in the same unit (nats per image).

Probing many layers at once (``lower_bounds``) shares the work before each layer: the model is traced
(``torch.fx``) and run once, node by node, and at each probed layer the rest of the graph is run from the values
live there with that layer replaced — each probe costs the part of the model from its layer on, not the whole
model (a ResNet-50's probes about half). The results are those of separate full passes, bit for bit (the same
operations on the same values); models that cannot be traced, or layers called more than once, are probed
with full passes.
"""

from __future__ import annotations

import functools
import warnings
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from .graph import Replacement, TracedModel, forward_with
from .stats import batch_inputs


def _replaced(module: nn.Module, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    weight = weight.to(module.weight.dtype).reshape(module.weight.shape)
    return weight, None if bias is None else bias.to(module.weight.dtype)


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
        self._graph: TracedModel | None | bool = False  # not traced yet
        self._names = {id(m): n for n, m in model.named_modules()}

    def _log_probs(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self._log_softmax(self.model(x.to(self.device)))

    @staticmethod
    def _log_softmax(out: Tensor) -> Tensor:
        return torch.log_softmax(out.double().flatten(1), dim=1)

    def __call__(self, module: nn.Module, weight: Tensor, bias: Tensor | None) -> float:
        """Mean KL(p ‖ p̃) when ``module`` (a Conv2d or Linear of the model) computes with ``weight`` (its
        shape) and ``bias`` instead of its own (every call of it, if it is called more than once)."""
        return self.measure(module, weight, bias)[0]

    def lower_bound(self, module: nn.Module, weight: Tensor, bias: Tensor | None, z: float = 2.0) -> float:
        """The mean KL less ``z`` standard errors of the mean over the probe images (≥ 0): what the probe
        images show beyond their own sampling noise."""
        return self._bound(*self.measure(module, weight, bias), z)

    def lower_bounds(self, replacements: Sequence[Replacement], z: float = 2.0) -> list[float]:
        """``lower_bound`` of each (module, weight, bias) of ``replacements``, probed together (see the module
        docstring: one pass through the model's shared beginning per batch)."""
        return [self._bound(mean, error, z) for mean, error in self.measure_many(replacements)]

    @staticmethod
    def _bound(mean: float, error: float, z: float) -> float:
        return max(mean - z * error, 0.0)

    def measure(self, module: nn.Module, weight: Tensor, bias: Tensor | None) -> tuple[float, float]:
        """(mean KL, standard error of that mean over the probe images) with ``module`` replaced."""
        return self.measure_together([(module, weight, bias)])

    def measure_together(self, replacements: Sequence[Replacement]) -> tuple[float, float]:
        """(mean KL, its standard error) of the model with every one of ``replacements`` in place at once: what
        a whole plan costs, errors compounding through depth included (one full pass over the probe images)."""
        return self._summary([self.per_image(replacements)])

    def per_image(self, replacements: Sequence[Replacement]) -> Tensor:
        """The KL of each probe image (float64, (images,)) with every one of ``replacements`` in place at once
        (paired across calls: image i is the same image in each)."""
        # Each replaced module's forward is swapped for the replacement's for the pass (an instance attribute over
        # the class's method), so that its own computation is not run as well (a forward hook would run both:
        # twice the cost of every replaced layer), and put back afterwards.
        saved: list[tuple[nn.Module, object]] = []
        try:
            for module, weight, bias in replacements:
                saved.append((module, module.__dict__.get("forward")))
                weight, bias = _replaced(module, weight, bias)
                module.forward = functools.partial(forward_with, module, weight=weight, bias=bias)
            return torch.cat([self._kl(log_p, self._log_probs(x)) for x, log_p in zip(self.inputs, self.reference)])
        finally:
            for module, forward in reversed(saved):
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward

    def measure_many(self, replacements: Sequence[Replacement]) -> list[tuple[float, float]]:
        """``measure`` of each of ``replacements``, in one traced pass per batch where the model allows it."""
        graph = self._traced()
        starts = [graph.start.get(self._names.get(id(m), "")) if graph is not None else None
                  for m, _, _ in replacements]
        out: list[tuple[float, float] | None] = [None] * len(replacements)
        for k, (module, weight, bias) in enumerate(replacements):
            if starts[k] is None:
                out[k] = self.measure(module, weight, bias)
        at: dict[int, list[int]] = {}
        for k, i in enumerate(starts):
            if i is not None:
                at.setdefault(i, []).append(k)
        if at:
            assert graph is not None
            ready = {k: _replaced(*replacements[k]) for ks in at.values() for k in ks}
            per_image: dict[int, list[Tensor]] = {k: [] for k in ready}
            with torch.no_grad():
                for x, log_p in zip(self.inputs, self.reference):
                    x = x.to(self.device)

                    def branch(i: int, env: dict, x=x, log_p=log_p) -> None:
                        for k in at.get(i, ()):
                            out_k = graph.run(x, env, i, (replacements[k][0], *ready[k]))
                            per_image[k].append(self._kl(log_p, self._log_softmax(out_k)))

                    graph.run(x, visit=branch)
            for k, parts in per_image.items():
                out[k] = self._summary(parts)
        return out  # type: ignore[return-value]

    def _traced(self) -> TracedModel | None:
        """The traced model, if it traces and reproduces the model's predictions exactly (checked against the
        reference of the first probe batch); None otherwise (with a warning: probes then cost a full pass each)."""
        if self._graph is False:
            try:
                graph = TracedModel(self.model)
                with torch.no_grad():
                    traced = self._log_softmax(graph.run(self.inputs[0].to(self.device)))
                same = torch.equal(traced, self.reference[0])
                self._graph = graph if same else None
                reason = "its traced graph computes other outputs"
            except Exception as exc:  # noqa: BLE001 - any model fx cannot trace: the full passes still work
                self._graph, reason = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if self._graph is None:
                warnings.warn(f"damage probes run the whole model per probe: torch.fx cannot trace it ({reason})",
                              stacklevel=3)
        return self._graph  # type: ignore[return-value]

    @staticmethod
    def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
        return (log_p.exp() * (log_p - log_q)).sum(dim=1)

    @staticmethod
    def _summary(parts: list[Tensor]) -> tuple[float, float]:
        mean, error = mean_and_error(torch.cat(parts))
        return max(mean, 0.0), error


def mean_and_error(values: Tensor) -> tuple[float, float]:
    """(mean, standard error of the mean) of per-image values (n,); the error is 0 for a single value."""
    error = float(values.std() / values.numel() ** 0.5) if values.numel() > 1 else 0.0
    return float(values.mean()), error
