"""Propagated (error-compensating) fits: each layer fitted to the inputs it will really receive.

A layer fitted alone minimizes E‖(W − W̃)x‖² on the original model's inputs x. In the compressed model it
receives x̃, the output of the already compressed layers before it; what matters is E‖W x − W̃ x̃‖². With
Σ̃ = E[x̃ x̃ᵀ] and the cross moment K = E[x x̃ᵀ] (both centered when the bias absorbs mean errors),

    E‖W x − W̃ x̃‖² = ‖(W′ − W̃) Σ̃^{1/2}‖_F² + const,   W′ = W K Σ̃⁻¹,

so every decomposition applies unchanged to the corrected target W′ in the Σ̃-norm, and the bias becomes
b + W μ − W̃ μ̃. The regression W′ is regularized towards W, not towards 0:

    W′ = W + W (K − Σ̃)(Σ̃ + λI)⁻¹,   λ = ``ridge`` · tr(Σ̃)/D,

the minimizer of E‖W x − W′ x̃‖² + λ‖W′ − W‖², which is W itself when x̃ = x and never chases the noise of a
few calibration images where D is large (a classifier head on a few hundred images). Where the layer's Σ is
shrunk by α (``datd.shrinkage``), shrinking Σ̃ and K alike gives the same form with λ ≥ α/(1 − α)·tr(Σ̃)/D: the
less the statistics are trusted, the less the weights are corrected (none at α = 1).

Residual compensation. Where a layer's output joins a sum (a residual add) through nothing but eval-mode
BatchNorms of per-channel scale a, the sum's other addend o also carries the error of the compression before
it: the add receives õ where the original has o. The layer can take up that error too by reproducing
W x + d, d = (o − õ)/a, instead of W x (``graph.Sink``; the difference of the sums is then a ⊙ (W̃ x̃ − W x − d)).
With the moments E[d x̃ᵀ] and E[d] the corrected target becomes

    W′ = W + (W (K − Σ̃) + E[d x̃ᵀ]) (Σ̃ + λI)⁻¹,   bias b + W μ + E[d] − W̃ μ̃,

the same problem in the same norm. The inverse of a is damped, a/(a² + δ) with δ = ``_DAMPING`` · mean(a²), so
that a channel the BatchNorm all but switches off is not asked to carry a huge correction. It needs the traced
graph (``PairedPasses`` on a model ``torch.fx`` traces); elsewhere layers reproduce W x.

Layers are processed in the order of their first call, in groups of ``group`` layers: one paired forward pass
of the original and the partially compressed model per group, stopped as soon as the group's layers have seen
all their calls (and their residual adds their inputs), and started where the layers still to fit begin
(``PairedPasses``: the values live there are kept per batch, so the passes together cost about one extra pass
of each model, not one per group). Layers within one group are fitted to inputs that reflect the compression of
the groups before it (not of each other).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from .fitting import LayerProblem
from .graph import Sink, TracedModel, affine_scale
from .shrinkage import shrink
from .stats import (
    _CHUNK_ELEMENTS, _Accumulator, _shifted_path, batch_inputs, conv_pad, conv_padded, conv_patches, geometry_of,
)

# Relative ridge of the corrected target: λ = DEFAULT_RIDGE · tr(Σ̃)/D (see the module docstring).
DEFAULT_RIDGE = 1e-3
# Calibration batches up to this many bytes are kept in memory across the paired passes (no reloading).
_BATCH_CACHE_BYTES = 1 << 30
# The values kept between paired passes (both models, every calibration batch) take at most this many bytes;
# beyond it every pass starts from the images.
_ACTIVATION_BYTES = 1 << 32
# A conv's paired moments come from the joint moments of [x; x̃] (``_Joint``) while those sums (two folds of
# (2D)² float64 per group) take at most this many bytes; wider layers form only Σ̃ and K (``_Sums``).
_JOINT_BYTES = 1 << 30
# Damping of the inverse BatchNorm scale in residual compensation, relative to the mean squared scale.
_DAMPING = 1e-2


@dataclass
class PairedStats:
    """Moments of one layer's inputs in the original (x) and the compressed model (x̃), over the same images:
    ``sigma`` E[x̃ x̃ᵀ], ``cross`` E[x x̃ᵀ] (D, D) (or (G, D, D) for a grouped conv), ``mean`` E[x],
    ``mean_tilde`` E[x̃] (D,) (or (G, D)), float64."""

    sigma: Tensor
    cross: Tensor
    mean: Tensor
    mean_tilde: Tensor
    count: int
    residual: "Residual | None" = None


@dataclass
class Residual:
    """Moments of a layer's residual compensation d (module docstring): ``cross`` E[d x̃ᵀ] (T, D) (a grouped
    conv: the rows of group g read that group's D inputs), ``mean`` E[d] (T,), float64."""

    cross: Tensor
    mean: Tensor


class _Stop(Exception):
    """Raised by a hook to end a forward pass once every layer of interest has been called."""


class _Capture:
    """Forward pre-hooks that keep the inputs of the chosen layers of ``model`` for one batch and stop the
    pass after their last expected call (``calls`` per forward pass)."""

    def __init__(self, model: nn.Module, names: list[str], calls: dict[str, int],
                 ready: Callable[[], bool] = lambda: True):
        self.model = model
        self.modules = {n: model.get_submodule(n) for n in names}
        self.calls = calls
        self.ready = ready  # whether whoever else watches the pass is done with it too
        self.inputs: dict[str, list[Tensor]] = {}

    @property
    def done(self) -> bool:
        return all(len(self.inputs[n]) >= self.calls[n] for n in self.modules)

    def run(self, forward: Callable[[], object]) -> dict[str, list[Tensor]]:
        """The layers' inputs during ``forward()`` (a pass of ``model``, or of its part from a point of its graph)."""
        self.inputs = {n: [] for n in self.modules}
        handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        try:
            forward()
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return self.inputs

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self.inputs[name].append(args[0].detach())
            if self.done and self.ready():
                raise _Stop
        return hook


def call_order(model: nn.Module, names: Iterable[str], example: Tensor) -> tuple[list[str], dict[str, int]]:
    """The chosen layers in the order of their first call on ``example``, and how often each is called per
    forward pass (layers never called are left out)."""
    names = list(names)
    order: list[str] = []
    calls = {n: 0 for n in names}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            if calls[name] == 0:
                order.append(name)
            calls[name] += 1
        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order, {n: c for n, c in calls.items() if c}


class _Sums:
    def __init__(self, groups: int, dim: int, device: torch.device):
        z = dict(dtype=torch.float64, device=device)
        self.sigma = torch.zeros(groups, dim, dim, **z)
        self.cross = torch.zeros(groups, dim, dim, **z)
        self.sum = torch.zeros(groups, dim, **z)
        self.sum_tilde = torch.zeros(groups, dim, **z)
        self.count = 0

    def add(self, x: Tensor, xt: Tensor) -> None:
        """x, xt: (G, M, D) paired samples in the compute dtype; each product is formed in that dtype (float32:
        GEMMs at twice the float64 speed, one chunk's rounding) and accumulated in float64."""
        self.sigma += (xt.transpose(1, 2) @ xt).double()
        self.cross += (x.transpose(1, 2) @ xt).double()
        self.sum += x.sum(dim=1, dtype=torch.float64)
        self.sum_tilde += xt.sum(dim=1, dtype=torch.float64)
        self.count += x.shape[1]

    def result(self) -> PairedStats:
        if self.count == 0:
            raise ValueError("no paired samples were recorded")
        squeeze = (lambda t: t[0]) if self.sum.shape[0] == 1 else (lambda t: t)
        n = self.count
        return PairedStats(squeeze(self.sigma / n), squeeze(self.cross / n), squeeze(self.sum / n),
                           squeeze(self.sum_tilde / n), n)


class _Joint:
    """Paired moments of a Conv2d from the patch moments of its input and the compressed model's stacked as one
    input of twice the channels, per group [x_g; x̃_g] (``stats._Accumulator`` on a stand-in conv: the shifted
    cross-correlations of ``datd.patch_moments`` where they beat im2col, in float32 chunks summed in float64).
    Its (2D, 2D) moment per group holds Σ̃ (lower right) and K = E[x x̃ᵀ] (upper right) in ``F.unfold`` order.
    """

    def __init__(self, name: str, conv: nn.Conv2d, device: torch.device, compute: torch.dtype):
        self.stand_in, self.groups = _doubled(conv), conv.groups
        self.accumulator = _Accumulator(name, self.stand_in, device, compute)

    @staticmethod
    def suits(conv: nn.Conv2d, x: Tensor) -> bool:
        """Whether the joint moments are the cheaper exact path for ``conv`` on inputs like ``x`` (N, S, H, W):
        the shifted path is preferred at twice the channels and the sums fit ``_JOINT_BYTES``."""
        joint = 2 * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
        return (2 * conv.groups * joint * joint * 8 <= _JOINT_BYTES
                and _shifted_path(_doubled(conv), geometry_of(conv, conv_pad(conv), (x.shape[2], x.shape[3]))))

    def add(self, x: Tensor, xt: Tensor) -> None:
        """x, xt: (N, S, H, W) inputs of the original and the compressed layer for the same images."""
        n, channels, h, w = x.shape
        per_group = channels // self.groups
        joint = torch.cat([x.reshape(n, self.groups, per_group, h, w), xt.reshape(n, self.groups, per_group, h, w)],
                          dim=2).reshape(n, 2 * channels, h, w)
        self.accumulator(self.stand_in, (joint,))

    def result(self) -> PairedStats:
        stats = self.accumulator.result()
        sigma, mean = stats.sigma, stats.mean
        if self.groups == 1:
            sigma, mean = sigma[None], mean[None]
        d = sigma.shape[-1] // 2
        squeeze = (lambda t: t[0]) if self.groups == 1 else (lambda t: t)
        return PairedStats(squeeze(sigma[:, d:, d:].clone()), squeeze(sigma[:, :d, d:].clone()),
                           squeeze(mean[:, :d].clone()), squeeze(mean[:, d:].clone()), stats.count)


def _doubled(conv: nn.Conv2d) -> nn.Conv2d:
    """A weightless (meta) stand-in of ``conv`` that reads twice its input channels, in the same groups."""
    return nn.Conv2d(2 * conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, bias=False, padding_mode=conv.padding_mode, device="meta")


def _samples(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input samples (G, M, D) in the input's dtype: im2col patches for a Conv2d, rows for a Linear."""
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        cols, _ = conv_patches(module, x)  # (N, G, D, L)
        return cols.permute(1, 0, 3, 2).reshape(cols.shape[1], -1, cols.shape[2])
    return x.reshape(1, -1, x.shape[-1])


class BatchCache:
    """The calibration inputs, read once and kept in memory while they fit in ``_BATCH_CACHE_BYTES`` (else read
    again on every pass); only the first ``images`` of them where given (None: all)."""

    def __init__(self, batches: Iterable, device: torch.device, images: int | None = None):
        self.batches, self.device, self.images = batches, device, images
        self.kept: list[Tensor] | None = []
        size = 0
        for x in self._first(batches):
            size += x.numel() * x.element_size()
            if size > _BATCH_CACHE_BYTES:
                self.kept = None
                break
            self.kept.append(x)

    def _first(self, batches: Iterable) -> Iterator[Tensor]:
        """The inputs of ``batches``, cut after ``images`` of them."""
        seen = 0
        for batch in batches:
            if self.images is not None and seen >= self.images:
                return
            x = batch_inputs(batch)
            if self.images is not None:
                x = x[:self.images - seen]
            seen += x.shape[0]
            yield x

    def __iter__(self):
        if self.kept is not None:
            yield from (x.to(self.device) for x in self.kept)
        else:
            yield from (x.to(self.device) for x in self._first(self.batches))


class PairedPasses:
    """The paired forward passes of the original and the partially compressed model (the same module names)
    over the calibration ``inputs`` that propagated fits take their statistics from.

    Where the model traces (``datd.graph``), layers whose output joins a residual add also get their residual
    compensation (``residual``; module docstring); where, moreover, every layer to fit is called once, both models'
    values live at the point where the layers still to fit begin are kept for every batch (``touches``: the modules
    each layer's installation changes, itself and, when it prunes, its producer and what lies between; the point is
    the first of their nodes over the layers not yet installed), while they take at most ``_ACTIVATION_BYTES``. Each
    group's pass then runs from there, and the kept values move on once per group: in all about one extra pass of
    each model over the images instead of one per group from the images, with the same values bit for bit (the same
    operations on the same inputs). Otherwise (or once the kept values would outgrow their bound) every pass starts
    from the images."""

    def __init__(self, original: nn.Module, compressed: nn.Module, inputs: Iterable[Tensor],
                 touches: dict[str, list[str]] | None = None, residual: bool = True):
        self.original, self.compressed, self.inputs = original, compressed, inputs
        self.graph: TracedModel | None = None
        self.entry: dict[str, int] = {}
        self.sinks: dict[str, Sink] = {}  # the layers with residual compensation (``residual``; traced models only)
        self.position = 0
        self.kept: list[tuple[dict, dict]] | None = None  # per batch: (original's, compressed's) values at position
        self.spilled = False  # the kept values outgrew ``_ACTIVATION_BYTES``: every pass runs from the images
        if touches and not (isinstance(inputs, BatchCache) and inputs.kept is None):
            try:
                graph = TracedModel(original)
                x = next(iter(inputs), None)
                with torch.no_grad():  # the trace must compute what the model computes (as for the damage probes)
                    same = x is not None and torch.equal(graph.run(x, root=original), original(x))
            except Exception:  # noqa: BLE001 - a model fx cannot trace: passes from the images
                return
            if same and all(m in graph.start for ms in touches.values() for m in ms):
                self.graph = graph
                self.entry = {n: min(graph.start[m] for m in ms) for n, ms in touches.items() if ms}
                self.sinks = graph.sinks(list(touches), original) if residual else {}

    @torch.no_grad()
    def statistics(self, names: list[str], calls: dict[str, int], pending: Iterable[str],
                   chunk_elements: int = _CHUNK_ELEMENTS) -> dict[str, PairedStats]:
        """``paired_statistics`` of the layers ``names`` (still dense in the compressed model); ``pending``: the
        layers not installed yet (``names`` among them), before whose first node the passes may start."""
        self._advance(min((self.entry[n] for n in pending if n in self.entry), default=self.position))
        graph, position = self.graph, self.position
        if graph is None:
            return paired_statistics(self.original, self.compressed, names, calls, self.inputs, chunk_elements)
        if self.kept is None:
            runs: Iterable[tuple[_Run, _Run]] = (
                ((lambda visit, x=x: graph.run(x, visit=visit, root=self.original)),
                 (lambda visit, x=x: graph.run(x, visit=visit, root=self.compressed))) for x in self.inputs)
        else:
            # each run gets copies of the kept values: an in-place operation (ReLU(inplace=True), ``x.add_(y)``) on
            # one of them would otherwise change what the next run starts from
            runs = (((lambda visit, e=e: graph.run(None, _copied(e), position, visit=visit, root=self.original)),
                     (lambda visit, e=t: graph.run(None, _copied(e), position, visit=visit, root=self.compressed)))
                    for e, t in self.kept)
        sinks = {n: self.sinks[n] for n in names if n in self.sinks}
        return _paired(self.original, self.compressed, names, calls, runs, chunk_elements, sinks)

    def _advance(self, position: int) -> None:
        """Move the kept values on to ``position`` (from the images the first time; given up, and every pass
        started from the images, once they would exceed ``_ACTIVATION_BYTES``)."""
        if position <= self.position or self.graph is None or self.spilled:
            return
        graph, kept, size = self.graph, [], 0

        def stop(i: int, env: dict) -> None:
            if i == position:
                kept[-1].append(dict(env))
                raise _Stop

        # per batch: the input (needed from node 0 only) and each model's values at the present position
        starts = ((None, e, t) for e, t in self.kept) if self.kept is not None else ((x, {}, {}) for x in self.inputs)
        for x, *envs in starts:
            kept.append([])
            for env, root in zip(envs, (self.original, self.compressed)):
                try:
                    graph.run(x, env, self.position, visit=stop, root=root)
                except _Stop:
                    pass
            size += sum(v.numel() * v.element_size() for values in kept[-1] for v in values.values()
                        if isinstance(v, Tensor))
            if size > _ACTIVATION_BYTES:
                self.kept, self.spilled = None, True
                return
        self.kept, self.position = [tuple(k) for k in kept], position  # type: ignore[misc]


def _copied(env: dict) -> dict:
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in env.items()}


@torch.no_grad()
def paired_statistics(original: nn.Module, compressed: nn.Module, names: list[str], calls: dict[str, int],
                      inputs: Iterable[Tensor], chunk_elements: int = _CHUNK_ELEMENTS) -> dict[str, PairedStats]:
    """Paired input moments of the layers ``names`` (modules of both models under the same names; still
    dense in ``compressed``) over ``inputs``: one forward pass of each model per batch, stopped after the
    layers' last call (``calls`` per forward pass). Products are formed in the models' dtype and summed in
    float64: a conv's from the joint patch moments of [x; x̃] where the shifted path pays (``_Joint``), else on
    chunks of at most ``chunk_elements`` samples × D of im2col columns or rows (``_Sums``)."""
    runs = (((lambda visit, x=x: original(x)), (lambda visit, x=x: compressed(x))) for x in inputs)
    return _paired(original, compressed, names, calls, runs, chunk_elements)


# One model's pass (or the part of it that calls the layers) over one batch, given a ``TracedModel.run`` visitor.
_Run = Callable[[Callable[[int, dict], None]], object]


def _paired(original: nn.Module, compressed: nn.Module, names: list[str], calls: dict[str, int],
            runs: Iterable[tuple[_Run, _Run]], chunk_elements: int,
            sinks: dict[str, Sink] | None = None) -> dict[str, PairedStats]:
    """``paired_statistics`` over ``runs``: per batch, the passes (or the parts of them) of each model that call
    the layers, and for the layers with a ``Sink`` (runs on the traced graph) their residual compensation."""
    modules = {n: original.get_submodule(n) for n in names}
    sums: dict[str, _Sums | _Joint] = {}
    residuals = {n: _ResidualSums(modules[n], original, s) for n, s in (sinks or {}).items()}
    last = max((s.node for s in (sinks or {}).values()), default=-1)
    for run_plain, run_tilde in runs:
        addends: tuple[dict[str, Tensor], dict[str, Tensor]] = ({}, {})
        captured = []
        for model, run, seen in zip((original, compressed), (run_plain, run_tilde), addends):
            capture = _Capture(model, names, calls, ready=lambda seen=seen: len(seen) == len(residuals))

            def visit(i: int, env: dict, seen=seen, capture=capture) -> None:
                for n, r in residuals.items():
                    if i == r.sink.node:
                        seen[n] = env[r.sink.other].detach().clone()  # the add may write into it in place
                if i >= last and capture.done:
                    raise _Stop

            captured.append(capture.run(lambda run=run, visit=visit: run(visit)))
        plain, tilde = captured
        for name, r in residuals.items():
            if name in addends[0] and name in addends[1] and tilde[name]:
                r.add(tilde[name][0], addends[0][name], addends[1][name])
        for name, module in modules.items():
            for a, b in zip(plain[name], tilde[name]):
                if isinstance(module, nn.Conv2d) and a.dim() == 3:  # an unbatched input
                    a, b = a[None], b[None]
                if name not in sums and isinstance(module, nn.Conv2d) and _Joint.suits(module, a):
                    sums[name] = _Joint(name, module, a.device, a.dtype)
                if isinstance(sums.get(name), _Joint):
                    sums[name].add(a, b)
                    continue
                xs, xts = _samples(module, a), _samples(module, b)
                if name not in sums:
                    sums[name] = _Sums(xs.shape[0], xs.shape[2], xs.device)
                chunk = max(1, chunk_elements // (xs.shape[0] * xs.shape[2]))
                for start in range(0, xs.shape[1], chunk):
                    sums[name].add(xs[:, start:start + chunk], xts[:, start:start + chunk])
    out = {n: s.result() for n, s in sums.items()}
    for name, r in residuals.items():
        if name in out and r.count:
            out[name].residual = r.result()
    return out


class _ResidualSums:
    """Float64 sums of a layer's residual compensation d = (o − õ) a/(a² + δ) (module docstring) against its
    compressed-model input x̃: Σ d x̃ᵀ over output positions (a conv's by its weight gradient, one call per
    batch; no patches unfolded) and Σ d. A batch whose addends do not have the layer's output shape (a
    broadcasting add) ends the compensation for that layer."""

    def __init__(self, module: nn.Module, model: nn.Module, sink: Sink):
        self.module, self.sink = module, sink
        scale = affine_scale([model.get_submodule(m) for m in sink.affine]) if sink.affine else None
        self.factor = None if scale is None else scale / (scale.square() + _DAMPING * scale.square().mean())
        self.cross: Tensor | None = None
        self.sum: Tensor | None = None
        self.count = 0
        self.broken = False

    def add(self, xt: Tensor, o: Tensor, ot: Tensor) -> None:
        """xt: the layer's input in the compressed model; o, õ: the other addend in the original and compressed
        model, for the same batch."""
        if self.broken:
            return
        module, d = self.module, o - ot
        conv = isinstance(module, nn.Conv2d)
        out = module.weight.shape[0]
        if o.shape != ot.shape or (conv and (d.dim() != 4 or xt.dim() != 4)) or d.shape[1 if conv else -1] != out:
            self.broken, self.count = True, 0
            return
        if self.factor is not None:  # channels on dim 1 (BatchNorm's), which for a Linear's (N, T) is its last
            d = d * self.factor.to(d.dtype).reshape((1, -1) + (1,) * (d.dim() - 2))
        if conv:
            try:
                cross = torch.nn.grad.conv2d_weight(conv_padded(module, xt), module.weight.shape, d, module.stride, 0,
                                                    module.dilation, module.groups).reshape(out, -1)
            except RuntimeError:  # an output of another size than the layer's: no compensation
                self.broken, self.count = True, 0
                return
            d_sum, positions = d.sum(dim=(0, 2, 3), dtype=torch.float64), d.numel() // out
        else:
            rows, drows = xt.reshape(-1, xt.shape[-1]), d.reshape(-1, out)
            cross, d_sum, positions = drows.T @ rows, drows.sum(dim=0, dtype=torch.float64), drows.shape[0]
        self.cross = cross.double() if self.cross is None else self.cross + cross.double()
        self.sum = d_sum if self.sum is None else self.sum + d_sum
        self.count += positions

    def result(self) -> Residual:
        assert self.cross is not None and self.sum is not None
        return Residual(self.cross / self.count, self.sum / self.count)


def corrected_problem(problem: LayerProblem, paired: PairedStats, bias_correction: bool,
                      ridge: float = DEFAULT_RIDGE, shrinkage: float = 0.0) -> LayerProblem:
    """The layer problem whose decomposition (at any method and rank, in its usual fit norm) minimizes
    E‖W x + b + d − (W̃ x̃ + b̃)‖² (d: the residual compensation where ``paired`` has one, else 0): weight W′
    (see the module docstring), statistics Σ̃ and μ̃, and a bias chosen so
    that ``corrected_bias`` gives b + W μ + E[d] − W̃ μ̃ (with bias correction; without it the bias is kept and the
    moments are uncentered). Σ̃ is shrunk by ``shrinkage`` (``datd.shrinkage``) for the fit."""
    groups = problem.groups
    sigma, cross = paired.sigma, paired.cross
    mean, mean_t = paired.mean, paired.mean_tilde
    if groups == 1:
        sigma, cross, mean, mean_t = sigma[None], cross[None], mean[None], mean_t[None]
    residual = paired.residual
    rows = problem.weight.shape[0] // groups
    weights = []
    for g in range(groups):
        w = problem.group(g).matrix
        s, k = sigma[g], cross[g]
        dx = None if residual is None else residual.cross[g * rows:(g + 1) * rows]  # E[d x̃ᵀ] of the group's rows
        if bias_correction:
            s = s - torch.outer(mean_t[g], mean_t[g])
            k = k - torch.outer(mean[g], mean_t[g])
            if dx is not None and residual is not None:
                dx = dx - torch.outer(residual.mean[g * rows:(g + 1) * rows], mean_t[g])
        s = 0.5 * (s + s.T)
        scale = torch.trace(s) / s.shape[0]
        if scale <= 0 or shrinkage >= 1:  # no input energy, or statistics not trusted at all: W itself
            weights.append(w)
            continue
        lam = max(ridge, shrinkage / (1 - shrinkage))
        regularized = s + lam * scale * torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
        rhs = (k - s).T @ w.T if dx is None else (k - s).T @ w.T + dx.T
        weights.append(w + torch.linalg.solve(regularized, rhs).T)  # W + (W (K − Σ̃) + E[d x̃ᵀ])(Σ̃ + λI)⁻¹
    corrected = torch.cat(weights).reshape(problem.weight.shape)
    bias = problem.bias
    if bias_correction:
        shift = torch.cat([problem.group(g).matrix @ mean[g] - weights[g] @ mean_t[g] for g in range(groups)])
        if residual is not None:
            shift = shift + residual.mean
        bias = shift if bias is None else bias.double() + shift
    center = paired.mean_tilde[..., :, None] * paired.mean_tilde[..., None, :] if bias_correction else None
    return LayerProblem(problem.name, corrected, shrink(paired.sigma, shrinkage, center), paired.mean_tilde,
                        problem.geometry, bias)
