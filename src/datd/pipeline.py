"""``compress``: statistics → sensitivities → options → plan → fits → surgery → report.

Each stage has plain inputs and outputs so it can be run, saved and resumed on its own: statistics are a
file (``Statistics``), a plan is JSON (``Plan``), fits are ``Decomposition``s, the result is a model plus a
report dict. Fitting a layer needs only its own weight and statistics; with ``propagate`` the fits run in call
order on statistics recollected from the partially compressed model (``datd.propagate``), the other stages
unchanged. Each layer's Σ is shrunk as far as cross-validation over the calibration images says
(``datd.shrinkage``) before any fit or prediction.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import functools
import hashlib
import math
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .channels import (
    MARK, Chain, ChainProfile, find_chains, module_sizes, profile_chains, prune_chain, resize, timed_parts, with_bias,
)
from .calibration import statistics_and_sensitivity
from .checkpoint import Checkpoint, model_digest
from .decompose import DEFAULT_SIGMA_REG, Decomposition, Pruned
from .errors import DatdError, reading
from .evaluate import accuracy, count_macs, count_params
from .fitting import (
    NORMS, FitSettings, LayerProblem, damage, damages, fit, fit_macs, output_energy, prune_damage_curve,
    relative_output_error, relative_sigma_error, svd_damage_curve, sweeps,
)
from .graph import conv_batchnorms
from .inference import MEMORY_FORMATS, for_inference
from .latency import (
    LatencyCache, LatencyModel, best_memory_format, compare, default_cache_path, default_rank_multiple, example_batch,
    tune_allocator,
)
from .layers import FACTORIZED_TYPES, Cost, Geometry, dense_cost, factorize
from .layers import build as build_factorized
from .plan import (
    METHODS, LatencyBudget, Option, Plan, Target, allocate, calibrated, check_ranks, cheapest, damage_curve,
    factorized_cost, family_scale, metric_of, pruning_scaled, rank_ladder, ranks_for_fraction,
)
from .probe import DamageProbe, mean_and_error
from .propagate import DEFAULT_RIDGE, BatchCache, PairedPasses, call_order, corrected_problem
from .sensitivity import Sensitivity, output_sensitivity, uninformative
from .shrinkage import ShrinkageChoice, layer_alpha, shrink
from .stats import Statistics, batch_inputs, check_calibration_size, check_positions, collect_stats
from .surgery import candidate_layers, replace_module, skip_reason
from .workers import fit_many, resolve_workers

RANK_MODES = ("auto", "uniform")
# A latency target counts as met within this relative margin: the spread of interleaved medians on a shared machine.
LATENCY_TOLERANCE = 0.02
# The plan-level prune check decides on the probe images where the paired per-image KL differences of the two
# plans have their mean beyond this many standard errors; otherwise on ``check_images`` images.
CHECK_Z = 2.0
# A factorized option must be measured at least this much faster than its dense layer to be considered at all:
# smaller gains are within timing noise and would spend accuracy on nothing.
LATENCY_MIN_GAIN = 0.05
# Kept fractions of a prunable layer's input channels at which the damage of pruning is computed exactly (between
# them it follows the greedy selection's fit errors, ``fitting.prune_damage_curve``): pruning is used mostly mildly.
PRUNE_ANCHORS = (0.25, 0.5, 0.7, 0.85, 0.95)
# Channel pruning is offered where the consumer's input vector has at most this many entries: its greedy selection
# holds a D×D Schur complement and updates it at every step (D = 4608, a 512-channel 3×3 conv: ~10 s on 2 cores).
MAX_PRUNE_DIM = 8192


@dataclass
class CompressConfig:
    """Everything that decides the result of ``compress`` (all JSON-serializable).

    target: whole-model budget, 'params=F' or 'macs=F' (F in (0, 1)).
    method: 'tucker2', 'cp', 'svd', 'prune' or 'auto' (per layer, the option with the least damage for its budget,
        all methods). Kernels of 1×1 and Linear layers are factorized with 'svd' (every method is a matrix
        factorization there, and the Σ-SVD is its closed-form optimum). 'prune' (``datd.channels``) removes input
        channels of a layer whose producer feeds only it, with the layer refitted on the channels it keeps
        (``datd.decompose.prune``) and the producer's channels removed: with 'auto' it competes with the
        factorizations (unless ``prune`` is False); alone it compresses by pruning only, every other layer dense.
    norm: 'sigma' (fit ‖(W − W̃)Σ^{1/2}‖) or 'frobenius' (fit ‖W − W̃‖, the classical baseline).
    ranks: 'auto' (data-aware global allocation), 'uniform' (the same reduction ratio in every layer) or
        the path of a plan JSON.
    bias_correction: remove the mean output error through the bias and fit in the input covariance.
    sensitivity: weigh each layer's output errors by measured Fisher sensitivities when allocating ranks
        ('auto' ranks); False weighs all output errors equally.
    sensitivity_images: calibration images used to measure sensitivities.
    candidates: per-layer cost fractions at which iterative decompositions are fitted as planning options
        (with at most ``candidate_iter`` sweeps, stopped once a sweep gains less than ``candidate_tol`` of the
        error; the chosen ones are then refitted with ``max_iter`` and ``tol``, going on from there). 1 % of the
        error is 2 % of a damage, finer than the interpolation between anchors; against 0.1 % it planned
        torchvision ResNet-18 (random init, macs=0.5) in 146 s instead of 176, and CIFAR ResNet-20/56 at
        params=0.25 and macs=0.33 kept their accuracy (87.98 / 89.01 / 91.13 / 92.14 against 87.83 / 88.98 /
        90.71 / 91.81).
    candidate_budget / fit_budget: the multiply-adds one planning fit / one final fit of a layer may spend
        (``datd.fitting.sweeps``): their sweeps are cut to what the budget pays for, and a planning option whose
        fit cannot pay for one sweep is not offered. The defaults bind only on wide layers (from 256 channels
        with 3×3 kernels: a CP sweep of a 512-channel layer costs 10¹⁰–2.5·10¹¹), which would otherwise take
        hours on a CPU; None lifts them.
    min_params: layers with fewer weights are left alone.
    rank_multiple: every rank a multiple of this (hardware-friendly ranks); 0 = automatic: for latency
        targets the device's granularity (``datd.latency.default_rank_multiple``: 16 on AVX-512 CPUs, else 8),
        for params/macs targets 1 (any rank: those budgets count exactly, not in time; on the CIFAR ResNets,
        multiples of 8 ran at 0.57–0.67 of the original's time in ONNX Runtime at batch 32 against 1.13–1.49, for
        0.1–0.5 points of top-1, and their int8 forms lost more: ``benchmarks/latency.py --sections granularity``,
        README).
    latency_batch: batch size at which latency is measured and budgeted (``latency=F``: F of the original
        model's measured latency at this batch, on the run's device, with the current torch thread count).
    memory_format: 'auto' (the faster for the original model, measured), 'contiguous' or 'channels_last'.
    measure_latency: with params/macs targets too, measure the latency before/after for the report.
    latency_rounds: with a latency target, at most this many plan → build → measure rounds.
    latency_repeats: timed repetitions per measurement (median).
    latency_cache: 'default' (``datd.latency.default_cache_path()``), 'none' (in memory) or a JSON path.
    tune_allocator: before measuring latency, call ``datd.latency.tune_allocator()`` (glibc keeps freed
        memory for reuse; without it eager timings depend on the process's history by ±50 %).
    probe_images: with 'auto' ranks, calibration images on which the damage of each chosen layer option is
        also measured (``datd.probe``: the KL divergence of the model with that one layer replaced); the
        planner then corrects its predicted damages by the measured ones and re-plans (0: predictions only).
    probe_rounds: at most this many measure → correct → re-plan rounds.
    check_images: calibration images of the plan-level check whether to prune (the whole plan's KL with and
        without pruning, ``prune``); at least ``probe_images``. The KL of a whole plan is heavy-tailed over images:
        on CIFAR ResNet-20 at latency=0.7 the first 64 calibration images ranked the plan with pruning 10 % better
        (0.223 against 0.250 nats) where all 2,048 ranked it 48 % worse (0.221 against 0.149); the plans it kept
        scored 84.7–87.1 % against 88.7–90.0 % for those 512 images chose. In three more runs 256 images decided
        as 2,048 did twice and where those saw a tie (0.161 against 0.163). These images are used only where the
        probe images' paired differences leave the decision open (``CHECK_Z``): they cost three forward passes
        over them (the original's, each plan's), 46 s on ResNet-50 at 224 on 2 cores.
    shrinkage: how far each layer's Σ is trusted: 'cv' (per layer, the shrinkage towards the identity with the
        least two-fold cross-validated error over the calibration images, ``datd.shrinkage``) or a fixed α in
        [0, 1] ('0': the sample Σ as it is; '1': the Frobenius norm with bias correction).
    batchnorm_check: with shrinkage 'cv', raise a layer's α to what the BatchNorm after it asks for (its running
        variances, from the training data, against the output variances the shrunk Σ predicts: the BatchNorm
        check of ``datd.shrinkage``), which protects the fits from calibration images unlike the training data
        (blurred, upscaled, another domain); layers without a BatchNorm with statistics behind them keep the
        cross-validated α.
    prune: with method 'auto', offer channel pruning among each prunable layer's options (False: factorizations
        only, every layer keeps its channel counts). With damage probes, a plan that prunes is kept only if the
        whole model measures closer to the original than with the plan the budget gives without pruning.
    propagate: fit the chosen layers in call order, each to reproduce the original layer's outputs from the
        inputs it receives in the model compressed so far (``datd.propagate``; one paired pass per
        ``propagate_group`` layers, from where those layers begin on a traced model). The plan is unchanged: same
        ranks, same cost.
    propagate_ridge: regularization of the corrected weights towards the original ones, relative to Σ̃'s scale.
    propagate_images: with ``propagate``, the paired statistics come from the first this many calibration images
        (0: all of them). Their cost is proportional to it; the rest of the pipeline uses every image. Measured
        (2048 CIFAR-10 images, full test set): 512 of them cut ResNet-56's fitting stage at params=0.25 from 82 to
        35 s and kept 91.62% against 91.94; ResNet-20 88.92 against 89.02 (params=0.25), 90.12 against 90.25
        (macs=0.33): within the seeds' spread, so all images stay the default (README).
    propagate_residual: with ``propagate``, a layer whose output joins a residual add (through BatchNorms only)
        also takes up the error the compression before it left in the add's other input (``datd.propagate``;
        traced models only).
    positions: the fraction of each conv's output positions per image that the statistics use (1: all; below 1
        drawn at random with ``seed``: ``datd.stats.PositionSampler``, for large calibration sets).
    fit_workers: processes that run the iterative fits of different layers at once, at one torch thread each
        (``datd.workers``; 0: one per torch thread of this process, 1: every fit here, at this process's
        threads). The factors do not depend on the number of workers from 2 up; with 1 they differ at round-off.
    """

    target: str = "params=0.5"
    method: str = "auto"
    norm: str = "sigma"
    ranks: str = "auto"
    bias_correction: bool = True
    sensitivity: bool = True
    sensitivity_images: int = 512
    candidates: tuple[float, ...] = (0.05, 0.12, 0.25, 0.4, 0.6, 0.85)
    min_params: int = 1000
    sigma_reg: float = DEFAULT_SIGMA_REG
    candidate_iter: int = 10
    candidate_tol: float = 1e-2
    candidate_budget: float | None = 5e10
    max_iter: int = 50  # CP with its line search reaches in 50 sweeps the error plain ALS had after 100
    tol: float = 1e-5
    fit_budget: float | None = 2e11
    seed: int = 0
    rank_multiple: int = 0
    latency_batch: int = 32
    memory_format: str = "auto"
    measure_latency: bool = True
    latency_rounds: int = 4
    latency_repeats: int = 15
    latency_cache: str = "default"
    tune_allocator: bool = True
    probe_images: int = 64
    probe_rounds: int = 3
    check_images: int = 256
    shrinkage: str = "cv"
    batchnorm_check: bool = True
    prune: bool = True
    propagate: bool = False
    propagate_group: int = 1
    propagate_ridge: float = DEFAULT_RIDGE
    propagate_images: int = 0
    propagate_residual: bool = True
    positions: float = 1.0
    fit_workers: int = 0

    def __post_init__(self) -> None:
        self.target = str(Target.parse(self.target))
        if self.method not in METHODS + ("auto",):
            raise DatdError(f"method must be one of {METHODS + ('auto',)}, got {self.method!r}")
        if self.norm not in NORMS:
            raise DatdError(f"norm must be one of {NORMS}, got {self.norm!r}")
        self.ranks = str(self.ranks)
        if self.ranks not in RANK_MODES and not Path(self.ranks).is_file():
            raise DatdError(f"ranks must be 'auto', 'uniform' or an existing plan file, got {self.ranks!r}")
        self.candidates = tuple(sorted(float(c) for c in self.candidates))
        if not self.candidates or not all(0 < c < 1 for c in self.candidates):
            raise DatdError("candidates must be fractions in (0, 1)")
        if Target.parse(self.target).metric == "latency" and self.ranks != "auto":
            raise DatdError("a latency target needs ranks='auto' (the allocation spends measured layer latencies)")
        if self.rank_multiple < 0:
            raise DatdError(f"rank_multiple must be >= 1 (or 0: automatic), got {self.rank_multiple}")
        if self.memory_format not in ("auto", *MEMORY_FORMATS):
            raise DatdError(f"memory_format must be 'auto', 'contiguous' or 'channels_last', got {self.memory_format!r}")
        if self.probe_images < 0 or self.probe_rounds < 0 or self.check_images < 0:
            raise DatdError("probe_images, probe_rounds and check_images must be >= 0")
        self.shrinkage = str(self.shrinkage)
        if self.shrinkage != "cv":
            try:
                alpha = float(self.shrinkage)
            except ValueError:
                alpha = -1.0
            if not 0 <= alpha <= 1:
                raise DatdError(f"shrinkage must be 'cv' or a number in [0, 1], got {self.shrinkage!r}")
        if any(b is not None and b <= 0 for b in (self.candidate_budget, self.fit_budget)):
            raise DatdError("candidate_budget and fit_budget must be positive (or None: no limit)")
        check_positions(self.positions)
        if self.fit_workers < 0:
            raise DatdError(f"fit_workers must be >= 0 (0: one per torch thread), got {self.fit_workers}")
        if self.propagate_group < 1 or self.propagate_ridge < 0 or self.propagate_images < 0:
            raise DatdError("propagate_group must be >= 1, propagate_ridge >= 0 and propagate_images >= 0")
        for name in ("latency_batch", "latency_rounds", "latency_repeats"):
            if getattr(self, name) < 1:
                raise DatdError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def settings(self) -> FitSettings:
        return FitSettings(self.norm, self.bias_correction, self.sigma_reg, self.max_iter, self.tol, self.seed,
                           self.fit_budget)

    @property
    def candidate_settings(self) -> FitSettings:
        """The settings of planning fits: ``candidate_iter`` sweeps at most, ``candidate_tol``, ``candidate_budget``."""
        return dataclasses.replace(self.settings, max_iter=self.candidate_iter, tol=self.candidate_tol,
                                   budget=self.candidate_budget)


@dataclass
class _Layer:
    problem: LayerProblem
    module: nn.Module
    methods: tuple[str, ...]
    sensitivity: Sensitivity  # per-output-channel weights of the damage (ones unless measured)
    shrinkage: ShrinkageChoice = field(default_factory=ShrinkageChoice)  # the α applied to the layer's Σ
    fits: dict[tuple[str, tuple[int, ...], FitSettings], Decomposition] = field(default_factory=dict)
    chain: Chain | None = None  # where its input channels can be pruned (with their producer)
    profile: ChainProfile | None = None  # the chain's cost per channel and shapes

    @property
    def geometry(self) -> Geometry:
        return self.problem.geometry

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The layer's input shape for one sample: (1, S, H, W), or (1, rows, S) / (1, S) for a Linear."""
        g = self.geometry
        if isinstance(self.module, nn.Conv2d):
            return (1, self.module.in_channels, *g.input_hw)
        rows = g.input_hw[0]
        return (1, rows, g.weight_shape[1]) if rows > 1 else (1, g.weight_shape[1])


def compress(
    model: nn.Module,
    calib: Iterable,
    config: CompressConfig | None = None,
    *,
    stats: Statistics | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    eval_data: Iterable | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    fit_cache: dict | None = None,
    checkpoint: Checkpoint | None = None,
    stats_batches: Iterable | None = None,
    **overrides,
) -> tuple[nn.Module, dict]:
    """Compress a copy of ``model`` to the configured budget; return it with a report dict.

    ``calib``: re-iterable calibration batches (a DataLoader or a list of tensors / (input, label) pairs;
    no labels needed). ``config``: a ``CompressConfig``; keyword ``overrides`` set its fields
    (``compress(model, calib, target="params=0.5", method="tucker2")``). ``stats``: reuse saved statistics
    (for instance from another data set) instead of collecting them on ``calib``. ``filter_fn(module,
    name)`` chooses the layers that may be compressed. ``eval_data``: (input, label) batches; when given,
    the report holds top-1 accuracy before and after. ``fit_cache``: a dict kept by the caller to reuse
    fits across calls on the same model with the same ``stats`` (e.g. to plan several budgets: the
    candidate fits do not depend on the target). ``checkpoint``: a ``datd.checkpoint.Checkpoint`` that keeps
    the statistics, the plan and each fitted layer on disk as they are done; with ``resume=True`` a run killed
    at any point continues from there and gives the same result, bit for bit. ``stats_batches``: the batches of
    the statistics pass when they are not ``calib`` (under torchrun: this rank's share, ``datd.distributed``).

    With a ``latency=F`` target, or ``measure_latency``, the report's "latency" entry holds the measured
    seconds per batch of the original and the compressed model in their inference forms
    (``report["inference"]``: the memory format and each layer's execution form, for ``for_inference``).
    """
    config = CompressConfig(**{**(asdict(config) if config else {}), **overrides})
    start = time.perf_counter()
    timings: dict[str, float] = {}
    device = torch.device(device) if device else next(model.parameters()).device
    original = model.to(device).eval()
    settings, target = config.settings, Target.parse(config.target)
    workers = resolve_workers(config.fit_workers)
    multiple = _rank_multiple(config, device)
    broken = next((n for n, t in original.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()),
                  None)
    if broken is not None:
        raise DatdError(f"the model's weights hold NaN or Inf (first in '{broken}'): there is nothing sound to compress")
    first = batch_inputs(next(iter(calib))).to(device)
    try:
        before = Cost(count_params(original), count_macs(original, first[:1]))
    except RuntimeError as exc:  # checked before any work: wrong channels, a size the model cannot take, ...
        raise DatdError(f"the calibration inputs (shape {tuple(first.shape[1:])} per sample) do not fit the model: "
                        f"{str(exc).splitlines()[0]}") from exc

    candidates = candidate_layers(original, filter_fn)
    skipped: dict[str, str] = {}
    for name, module in candidates.items():
        reason = skip_reason(module, config.min_params)
        if reason:
            skipped[name] = reason
    # pruning a layer's input channels saves what produces them, whatever the layer's own size: layers too small to
    # factorize may still prune (their statistics are collected)
    chains, profiles = _chains(original, candidates, config, first)
    batchnorms = _batchnorms(original, config)
    for name in chains:
        skipped.pop(name, None)
    wanted = [n for n in candidates if n not in skipped]
    plan_file = None if config.ranks in RANK_MODES else Plan.read(config.ranks)
    unknown = [n for n in plan_file or () if n not in candidates]
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise DatdError(f"plan {config.ranks} names layer '{unknown[0]}'{more}, which is not a Conv2d/Linear layer of "
                        "the model")
    if checkpoint is not None:  # what this run is: a resume of anything else is refused
        checkpoint.start({"config": asdict(config), "model": model_digest(original), "versions": _versions(),
                          "calibration": {"first_batch": hashlib.sha256(first.cpu().numpy().tobytes()).hexdigest(),
                                          "batches": len(calib) if hasattr(calib, "__len__") else None},
                          "statistics": None if stats is None else {"images": stats.num_images, "layers": sorted(stats)},
                          "plan": plan_file, "filter_fn": filter_fn is not None})

    tick = time.perf_counter()
    measured: dict[str, Sensitivity] | None = None  # sensitivities, when measured in the statistics' pass
    if stats is None:
        stats = checkpoint.statistics() if checkpoint is not None else None
        if stats is None:
            if stats_batches is None and config.ranks == "auto" and config.sensitivity:
                # one pass for both (``datd.calibration``): the sensitivity images' forward serves the statistics too
                stats, measured = statistics_and_sensitivity(
                    original, calib, wanted, {n: candidates[n] for n in wanted},
                    sensitivity_images=config.sensitivity_images, device=device, uncalled="skip",
                    positions=config.positions, seed=config.seed, progress=progress)
            else:
                stats = collect_stats(original, calib if stats_batches is None else stats_batches, wanted,
                                      device=device, progress=progress, uncalled="skip", positions=config.positions,
                                      seed=config.seed)
            if checkpoint is not None:
                checkpoint.save_statistics(stats)
        check_calibration_size(stats.num_images)
        for name in [n for n in wanted if n not in stats]:
            skipped[name] = "never called on the calibration data (no statistics)"
        wanted = [n for n in wanted if n in stats]
        thin = [n for n in wanted if stats[n].count < stats[n].sigma.shape[-1]]
        if thin:
            s = stats[thin[0]]
            warnings.warn(f"{len(thin)} layer(s) saw fewer input vectors than their Σ has dimensions (e.g. '{thin[0]}': "
                          f"{s.count} < {s.sigma.shape[-1]}): their Σ is rank-deficient and relies on its "
                          "regularization; more calibration images give better fits", stacklevel=2)
    else:
        stats.check(original, required=wanted)
    one_pass = measured is not None  # one stage where the sensitivities came with the statistics
    timings["statistics and sensitivity" if one_pass else "statistics"] = time.perf_counter() - tick

    if fit_cache is not None:
        if stats is None or fit_cache.setdefault("statistics", stats) is not stats:
            raise DatdError("fit_cache can only be reused with the same statistics object (pass stats=...)")
    tick = time.perf_counter()
    chains = {n: c for n, c in chains.items() if n in wanted}
    if config.method == "prune":
        for name in [n for n in wanted if n not in chains]:
            skipped[name] = "not prunable: no producer layer feeds only its input channels (method 'prune')"
        wanted = [n for n in wanted if n in chains]
    layers: dict[str, _Layer] = {}
    for name in wanted:
        if plan_file is not None and (name not in plan_file or plan_file[name][0] == "dense"):
            skipped[name] = "kept dense by the plan"
            continue
        layers[name] = _make_layer(name, candidates[name], stats, config, chains.get(name), profiles.get(name),
                                   batchnorms.get(name))
        if fit_cache is not None:
            layers[name].fits = fit_cache.setdefault((name, layers[name].shrinkage.alpha), {})
    if plan_file is not None:
        _check_pruned_producers(plan_file, chains)
    _warn_if_unlike_training(layers)
    producers = _producers(layers)
    timings["shrinkage"] = time.perf_counter() - tick  # each layer's cross-validated α (``datd.shrinkage``)

    tick = time.perf_counter()
    fallback: str | None = None  # what weighs the damage where the sensitivities say nothing
    if config.ranks == "auto" and config.sensitivity and layers:
        if measured is None:
            measured = output_sensitivity(
                original, calib, {n: l.module for n, l in layers.items()},
                max_images=config.sensitivity_images, seed=config.seed, device=device, progress=progress,
            )
        for name, layer in layers.items():
            layer.sensitivity = measured[name].to(layer.problem.sigma.device)
        if uninformative(measured):
            _fall_back_to_relative_errors(layers)
            fallback = "relative output error (the measured sensitivities were all zero)"
    if not one_pass:
        timings["sensitivity"] = time.perf_counter() - tick

    planned = checkpoint.planning() if checkpoint is not None and target.metric != "latency" else None
    probe, probed, curve, pruning = None, {}, None, None
    again = None  # with probes under a latency target: the probe rounds at each latency round's budget
    if config.ranks == "auto" and config.probe_images and config.probe_rounds and layers and planned is None \
            and fallback is None:  # the probes measure the same KL that came out zero
        probe = DamageProbe(original, calib, config.probe_images, device=device)
        check = (lambda: probe) if config.check_images <= config.probe_images else \
            functools.cache(functools.partial(DamageProbe, original, calib, config.check_images, device=device))

    timing = None
    if target.metric == "latency" or config.measure_latency:
        tick = time.perf_counter()
        timing = _Timing.start(original, first, config, device)
        timings["latency reference"] = time.perf_counter() - tick

    tick = time.perf_counter()
    if target.metric == "latency":
        options = _options(layers, config, target, multiple, progress, latency=timing.model, model=original)  # type: ignore[union-attr]
        timings["planning"] = time.perf_counter() - tick
        if probe is not None:  # each latency round probes its plan and decides on pruning at its own budget
            probed, again = _probe_rounds(layers, options, probe, config, check)
        tick = time.perf_counter()
        compressed, entries, choice, latency = _latency_rounds(original, layers, options, timing, target, settings,  # type: ignore[arg-type]
                                                               config.latency_rounds, progress, workers, again,
                                                               None if probe is None else
                                                               functools.partial(_plan_kl, layers, settings, check))
        if again is not None:  # the prune decision at the returned plan's budget
            returned = latency["returned_round"]
            pruning = None if returned is None else latency["rounds"][returned]["pruning"]
        timings["fitting and latency rounds"] = time.perf_counter() - tick
        if config.propagate and entries:  # same structure, so the measured latency stands
            tick = time.perf_counter()
            compressed, entries = _build_propagated(original, layers, choice, settings, calib, first, config, progress)
            timings["propagated fitting"] = time.perf_counter() - tick
    else:
        total = metric_of(before, target.metric)
        fixed = total - sum(metric_of(dense_cost(l.geometry), target.metric) for l in layers.values())
        budget = int(target.fraction * total) - fixed
        if planned is not None:
            choice, probed, curve, pruning = planned["choice"], planned["probed"], planned["curve"], planned["pruning"]
            timings.update(planned["timings"])
        else:
            if plan_file is not None:
                choice = {n: _option_from_plan(n, l, plan_file[n]) for n, l in layers.items()}
            elif config.ranks == "uniform":
                choice = _uniform(layers, budget, target, settings, total, fixed, multiple, workers)
            else:
                options = _options(layers, config, target, multiple, progress)
                try:
                    choice = allocate(options, budget, target.metric, producers)
                except ValueError as exc:
                    raise DatdError(_infeasible(target, total, fixed, options, producers)) from exc
            timings["planning"] = time.perf_counter() - tick
            if probe is not None:  # 'auto' ranks: ``options`` exist
                tick = time.perf_counter()
                probed, decide = _probe_rounds(layers, options, probe, config, check)
                options, pruning = decide(lambda o: allocate(o, budget, target.metric, producers))
                choice = allocate(options, budget, target.metric, producers)
                timings["damage probes"] = time.perf_counter() - tick
            if config.ranks == "auto":
                curve = damage_curve(options, total, fixed, target.metric, producers=producers)
            if checkpoint is not None:
                checkpoint.save_planning(choice, probed, curve, {k: v for k, v in timings.items()
                                                                 if k in ("planning", "damage probes")}, pruning)
        tick = time.perf_counter()
        if config.propagate:
            compressed, entries = _build_propagated(original, layers, choice, settings, calib, first, config, progress,
                                                    checkpoint)
        else:
            compressed, entries = _build(original, layers, choice, settings, progress, checkpoint, workers)
        timings["fitting"] = time.perf_counter() - tick
        latency = None
        if timing is not None:
            tick = time.perf_counter()
            latency = timing.measure(compressed, timing.forms(layers, choice))
            timings["latency"] = time.perf_counter() - tick
    for name, option in choice.items():
        if (option.method, option.ranks) in probed.get(name, {}):
            entries[name]["damage_measured"] = probed[name][option.method, option.ranks]
        chain = layers[name].chain if name in layers else None
        if option.method == "prune" and chain is not None:
            kept = f"pruned with '{name}' ({option.ranks[0]} of {chain.channels} kept)"
            skipped[chain.producer] = f"kept dense; its output channels {kept}"
            for between in (n for n in chain.between if n in candidates):  # depthwise convs on the way
                skipped[between] = f"{skipped.get(between, 'kept')}; its channels {kept}"
    for name, option in choice.items():
        if option.method == "dense" and name not in skipped:
            skipped[name] = "kept dense by the allocation (every cheaper option hurts more than it saves)"
    if timing is not None:
        timing.model.save()

    after = Cost(count_params(compressed), count_macs(compressed, first[:1]))
    report = _report(config, candidates, stats, skipped, entries, before, after, timings, start, compressed)
    report["rank_multiple"] = multiple  # the granularity the plan's ranks were chosen in
    if fallback is not None:
        report["sensitivity"] = fallback
    if curve is not None:
        report["budget_curve"] = curve
    if pruning is not None:
        report["pruning"] = pruning
    report["inference"] = {"memory_format": timing.memory_format if timing else "contiguous",
                           "forms": latency.pop("forms") if latency else {}}
    if latency is not None:
        report["latency"] = latency
        if latency["ratio"] >= 1 and target.metric != "latency":  # latency rounds warn on their own
            warnings.warn(f"the compressed model is not faster than the original: {latency['ratio']:.2f}× its latency "
                          f"at batch {latency['batch']} ({target} target); use a latency= target to plan for speed",
                          stacklevel=2)
    if checkpoint is not None and checkpoint.resumed:
        report["resumed"] = dict(checkpoint.resumed)  # what came from the checkpoint
    if eval_data is not None:
        tick = time.perf_counter()
        report["accuracy_before"] = accuracy(original, eval_data, device=device, progress=progress)
        report["accuracy_after"] = accuracy(compressed, eval_data, device=device, progress=progress)
        report["timings"]["evaluation"] = time.perf_counter() - tick
    return compressed, report


def _build(original: nn.Module, layers: dict[str, _Layer], choice: dict[str, Option], settings: FitSettings,
           progress: bool, checkpoint: Checkpoint | None = None, workers: int = 1) -> tuple[nn.Module, dict[str, dict]]:
    """A copy of ``original`` with every layer of ``choice`` that is not 'dense' fitted (``workers`` fits at a
    time) and swapped in (or restored from ``checkpoint``; each new fit is saved there); the per-layer report
    entries."""
    compressed = copy.deepcopy(original)
    entries = {}
    chosen = [n for n in layers if choice[n].method != "dense"]
    saved = {n: checkpoint.fit(n) for n in chosen} if checkpoint is not None else {}
    _prefetch(layers, [(n, choice[n].method, choice[n].ranks) for n in chosen if saved.get(n) is None], settings,
              workers, "fit" if progress else None)
    for name in tqdm(chosen, desc="fit", unit="layer", disable=not progress, leave=False):
        layer, option = layers[name], choice[name]
        if saved.get(name) is not None:
            entries[name] = _restore(compressed, name, layer, *saved[name])  # type: ignore[misc]
            continue
        decomposition = _fit_cached(layer, option.method, option.ranks, settings)
        entries[name] = _install(compressed, name, layer, layer.problem, decomposition, option, settings)
        if checkpoint is not None:
            checkpoint.save_fit(name, *_saved(compressed, name, layer), entries[name])
    return compressed, entries


def _saved(compressed: nn.Module, name: str, layer: _Layer) -> tuple[dict, dict[str, Tensor]]:
    """How a checkpoint keeps layer ``name`` of ``compressed``: (structure, tensors) for ``_restore``. A factorized
    layer is its module; a pruned one the sizes and tensors of every module of its chain."""
    if layer.chain is not None and not isinstance(compressed.get_submodule(name), FACTORIZED_TYPES):
        chain = layer.chain
        names = (chain.producer, *chain.between, chain.consumer)
        modules = {n: compressed.get_submodule(n) for n in names}
        state = {f"{n}/{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}
        return {"method": "prune", "sizes": {n: module_sizes(m) for n, m in modules.items()}}, state
    module = compressed.get_submodule(name)
    return {"method": module.kind, "ranks": list(module.ranks), "bias": module.last.bias is not None}, module.state_dict()


def _restore(compressed: nn.Module, name: str, layer: _Layer, structure: dict, state: dict[str, Tensor],
             entry: dict) -> dict:
    """Swap the modules saved by a checkpoint for layer ``name`` into ``compressed``; its report entry."""
    with reading(f"the checkpoint of layer '{name}'"):
        if structure["method"] == "prune":
            for module_name, sizes in structure["sizes"].items():
                own = {k.split("/", 1)[1]: v for k, v in state.items() if k.split("/", 1)[0] == module_name}
                module = resize(with_bias(compressed.get_submodule(module_name), "bias" in own), sizes)
                module.load_state_dict(own, strict=True)
                replace_module(compressed, module_name, module)
            return entry
        module = build_factorized(layer.module, structure["method"], tuple(structure["ranks"]), structure["bias"])
        module.load_state_dict(state, strict=True)
    replace_module(compressed, name, module)
    return entry


def _build_propagated(original: nn.Module, layers: dict[str, _Layer], choice: dict[str, Option],
                      settings: FitSettings, calib: Iterable, first: Tensor, config: CompressConfig,
                      progress: bool, checkpoint: Checkpoint | None = None) -> tuple[nn.Module, dict[str, dict]]:
    """``_build`` with error-compensating fits (``datd.propagate``): the chosen layers in the order of their
    first call, ``config.propagate_group`` at a time (fitted side by side, ``config.fit_workers``), each fitted
    to reproduce the original layer's outputs from the inputs it receives in the model compressed so far."""
    workers = resolve_workers(config.fit_workers)
    compressed = copy.deepcopy(original)
    entries: dict[str, dict] = {}
    chosen = [n for n, o in choice.items() if o.method != "dense"]
    if not chosen:
        return compressed, entries
    order, calls = call_order(original, chosen, first)
    order += [n for n in chosen if n not in calls]  # never called on the example: fitted alone, last
    # what installing each layer changes: itself and, when it prunes, its chain (where the passes may start)
    touches = {n: [n] + ([layers[n].chain.producer, *layers[n].chain.between]  # type: ignore[union-attr]
                         if choice[n].method == "prune" else []) for n in calls}
    inputs = BatchCache(calib, first.device, config.propagate_images or None)
    passes = PairedPasses(original, compressed, inputs, touches, config.propagate_residual)
    bar = tqdm(total=len(order), desc="fit (propagated)", unit="layer", disable=not progress, leave=False)
    for start in range(0, len(order), config.propagate_group):
        names = order[start:start + config.propagate_group]
        saved = {n: checkpoint.fit(n) for n in names} if checkpoint is not None else {}
        # the group's statistics are taken before any of it is installed, so restoring some changes nothing
        group = [n for n in names if n in calls and saved.get(n) is None]
        paired = passes.statistics(group, calls, order[start:]) if group else {}
        problems = {n: corrected_problem(layers[n].problem, paired[n], settings.bias_correction, config.propagate_ridge,
                                         layers[n].shrinkage.alpha) if n in paired else layers[n].problem
                    for n in names if saved.get(n) is None}
        fits = fit_many({n: functools.partial(fit, p, choice[n].method, choice[n].ranks, settings)
                         for n, p in problems.items()}, workers, on_cpu=first.device.type == "cpu")
        for name in names:
            layer, option = layers[name], choice[name]
            bar.update()
            if saved.get(name) is not None:
                entries[name] = _restore(compressed, name, layer, *saved[name])  # type: ignore[misc]
                continue
            problem, decomposition = problems[name], fits[name]
            entries[name] = _install(compressed, name, layer, problem, decomposition, option, settings)
            entries[name]["propagated"] = name in paired
            if checkpoint is not None:
                checkpoint.save_fit(name, *_saved(compressed, name, layer), entries[name])
    bar.close()
    return compressed, entries


def _install(compressed: nn.Module, name: str, layer: _Layer, problem: LayerProblem, decomposition: Decomposition,
             option: Option, settings: FitSettings) -> dict:
    """Swap the factorized ``decomposition`` of ``problem`` (the layer's own, or its propagated one) into
    ``compressed`` at ``name``; return the layer's report entry (errors measured in ``problem``'s statistics)."""
    approx = decomposition.reconstruct()
    bias = problem.corrected_bias(approx, settings.bias_correction)
    cost = factorized_cost(option.method, layer.geometry, option.ranks)
    extra: dict = {}
    if isinstance(decomposition, Pruned):  # the chain's modules shrink; the layer reads the kept channels only
        chain, upstream = layer.chain, layer.geometry.upstream
        assert chain is not None and upstream is not None
        prune_chain(compressed, chain, decomposition.kept, decomposition.weight, bias)
        gone = chain.channels - option.ranks[0]
        removed = Cost(gone * upstream.params, gone * upstream.macs)
        cost = Cost(cost.params + removed.params, cost.macs + removed.macs)
        extra = {"pruned": {"producer": chain.producer, "between": list(chain.between), "channels": chain.channels,
                            "kept": option.ranks[0], "removed_upstream": {"params": removed.params, "macs": removed.macs}}}
    else:
        module = factorize(layer.module, decomposition, None if bias is None else bias.to(layer.module.weight.dtype))
        replace_module(compressed, name, module)
    entry = {
        "method": option.method, "ranks": list(option.ranks),
        "cost": cost,  # the layer's own (for 'prune': the consumer's; its producer's removed part is in "pruned")
        "sigma_error": relative_sigma_error(problem, approx),
        "output_error": relative_output_error(problem, approx, settings.bias_correction),
        "damage": damage(problem, approx, layer.sensitivity, settings.bias_correction),
        "sweeps": len(decomposition.history) - 1,
        "bias": bias is not None,
        "shrinkage": layer.shrinkage.alpha,
        "shrinkage_batchnorm": layer.shrinkage.batchnorm,
        **extra,
    }
    if option.cost.latency:
        entry["latency_predicted_s"] = option.cost.latency * 1e-9
    return entry


def _chains(model: nn.Module, candidates: dict[str, nn.Module], config: CompressConfig,
            example: Tensor) -> tuple[dict[str, Chain], dict[str, ChainProfile]]:
    """The prunable chains between ``candidates`` (the layers the user lets datd change: producer and consumer both;
    whatever their size), and their profiles (what one channel costs upstream, the shapes to time them at), where
    the configuration prunes: method 'auto' with ``prune`` or 'prune' (or a plan file), not uniform ranks."""
    if (config.method not in ("auto", "prune") and config.ranks in RANK_MODES) or config.ranks == "uniform" \
            or (config.method == "auto" and not config.prune):
        return {}, {}
    consumers = {n for n, m in candidates.items() if skip_reason(m, 0) is None}
    chains = {n: c for n, c in find_chains(model, consumers).items()
              if c.producer in candidates and model.get_submodule(n).weight[0].numel() <= MAX_PRUNE_DIM}
    return chains, (profile_chains(model, chains, example[:1]) if chains else {})


def _check_pruned_producers(plan: dict[str, tuple[str, tuple[int, ...]]], chains: dict[str, Chain]) -> None:
    """A plan that prunes a layer's input channels keeps their producer dense (its channels are removed)."""
    for name, (method, _) in plan.items():
        if method == "prune" and name in chains and plan.get(chains[name].producer, ("dense",))[0] != "dense":
            raise DatdError(f"plan: layer '{name}' prunes the channels of '{chains[name].producer}', which must then "
                            f"stay dense (the plan gives it {plan[chains[name].producer][0]!r})")


def _batchnorms(model: nn.Module, config: CompressConfig) -> dict[str, nn.BatchNorm2d]:
    """Layer name → the BatchNorm after it whose running statistics the BatchNorm check reads (none where the check
    is off, Σ is not used or not cross-validated, or the model cannot be traced)."""
    if not config.batchnorm_check or config.shrinkage != "cv" or config.norm == "frobenius":
        return {}
    try:
        pairs = conv_batchnorms(model)
    except Exception:  # noqa: BLE001 - a model fx cannot trace: cross-validation alone decides α
        return {}
    modules = dict(model.named_modules())
    return {conv: modules[bn] for conv, bn in pairs}


# The BatchNorm check warns when its median α over the checked layers reaches this: half the layers' Σ then sits at
# least a third of the way to the identity because of it (in-domain CIFAR-10 and ImageNet images: 0).
UNLIKE_TRAINING_ALPHA = 0.3


def _fall_back_to_relative_errors(layers: dict[str, "_Layer"]) -> None:
    """Weigh every layer's squared relative output error alike, where the Fisher sensitivities are all zero: without
    it every option's predicted damage is 0 and the allocation takes the cheapest option of every layer, however far
    below the budget (a random-weight Inception v3 on 96×96 images: params 0.008 at params=0.5)."""
    warnings.warn("the model's predictions are certain on every sensitivity image (softmax probability 1, or "
                  "non-finite outputs), so its sensitivities are all zero: the plan weighs each layer's relative output "
                  "error alike and skips the damage probes. Random weights, or a model whose output is not a "
                  "classifier's logits?", stacklevel=3)
    for layer in layers.values():
        layer.sensitivity = Sensitivity.relative(layer.problem.weight.shape[0], output_energy(layer.problem),
                                                 layer.problem.sigma.device)


def _warn_if_unlike_training(layers: dict[str, "_Layer"]) -> None:
    checked = sorted(layer.shrinkage.batchnorm for layer in layers.values() if layer.shrinkage.batchnorm is not None)
    if checked and checked[len(checked) // 2] >= UNLIKE_TRAINING_ALPHA:
        warnings.warn(f"the calibration images excite the layers unlike the data their BatchNorm statistics come from "
                      f"(median α of the BatchNorm check {checked[len(checked) // 2]:g} over {len(checked)} layers): "
                      "blurred, upscaled or out-of-domain images? Their Σ was shrunk towards the identity; calibrating "
                      "on images like the training data gives better fits", stacklevel=3)


def _make_layer(name: str, module: nn.Module, stats: Statistics, config: CompressConfig, chain: Chain | None = None,
                profile: ChainProfile | None = None, batchnorm: nn.BatchNorm2d | None = None) -> _Layer:
    s = stats[name]
    geometry = Geometry.of(module, s.input_hw, s.output_hw, add_bias=config.bias_correction)
    if chain is not None and profile is not None:
        geometry = dataclasses.replace(geometry, input_channels=chain.channels, upstream=profile.unit)
    device = module.weight.device
    if config.norm == "frobenius":
        choice = ShrinkageChoice()  # the norm ignores Σ (but for the bias correction's mean)
    elif config.shrinkage == "cv":
        choice = layer_alpha(s, module.weight, config.bias_correction,
                             None if batchnorm is None else batchnorm.running_var)
    else:
        choice = ShrinkageChoice(float(config.shrinkage))
    mean = s.mean.to(device)
    center = mean[..., :, None] * mean[..., None, :] if config.bias_correction else None
    alpha = choice.alpha
    problem = LayerProblem(name, module.weight.detach().double(), shrink(s.sigma.to(device), alpha, center), mean,
                           geometry, None if module.bias is None else module.bias.detach().double(),
                           None if s.sigma_pooled is None else shrink(s.sigma_pooled.to(device), alpha, center))
    factorizations = tuple(m for m in METHODS if m != "prune")
    if config.method == "prune" or module.weight.numel() < config.min_params:  # too small to factorize
        methods: tuple[str, ...] = ()
    elif isinstance(module, nn.Linear) or geometry.kernel_positions == 1:
        methods = ("svd",)
    elif config.method == "auto" or config.ranks not in RANK_MODES:  # a plan file names its own methods
        methods = factorizations
    else:
        methods = (config.method,)
    if chain is not None:
        methods += ("prune",)
    return _Layer(problem, module, methods, Sensitivity.uniform(module.weight.shape[0], device), choice, chain=chain,
                  profile=profile)


# ----------------------------------------------------------------------------------------------------------
# latency targets and measurements


def _ns(seconds: float) -> int:
    return max(1, round(seconds * 1e9))


@dataclass
class _Timing:
    """The latency side of a run: per-layer timings (``model``), the example batch, the memory format, and
    the original model both as given and in its inference form — the reference every ratio is taken
    against, so that BatchNorm folding and the memory format are never counted as compression."""

    model: LatencyModel
    example: Tensor
    memory_format: str
    original: nn.Module
    reference: nn.Module
    reference_seconds: float
    repeats: int
    allocator: str

    @classmethod
    def start(cls, original: nn.Module, first: Tensor, config: CompressConfig, device: torch.device) -> "_Timing":
        allocator = tune_allocator() if config.tune_allocator else "as found"
        example = example_batch(first, config.latency_batch)
        if config.memory_format == "auto":
            memory_format, seconds = best_memory_format(original, example, repeats=config.latency_repeats)
        else:
            memory_format, seconds = config.memory_format, {}
        cache = LatencyCache(None if config.latency_cache == "none" else
                             default_cache_path() if config.latency_cache == "default" else config.latency_cache)
        model = LatencyModel(device, config.latency_batch, memory_format, cache=cache, repeats=config.latency_repeats)
        reference = for_inference(original, memory_format=memory_format)
        if memory_format not in seconds:
            seconds = compare({memory_format: reference}, example, repeats=config.latency_repeats)
        return cls(model, example, memory_format, original, reference, seconds[memory_format], config.latency_repeats,
                   allocator)

    def forms(self, layers: dict[str, _Layer], choice: dict[str, Option]) -> dict[str, str]:
        """The fastest execution form of every factorized layer of ``choice`` (measured, cached)."""
        return {n: self.model.best_form(layers[n].module, layers[n].input_shape, o.method, o.ranks).form
                for n, o in choice.items() if o.method not in ("dense", "prune")}

    def measure(self, compressed: nn.Module, forms: dict[str, str]) -> dict:
        """Interleaved seconds per batch of the original (inference form and as given) and of ``compressed``
        in its inference form."""
        fast = for_inference(compressed, forms=forms, memory_format=self.memory_format)
        seconds = compare({"original": self.reference, "compressed": fast, "original_as_given": self.original},
                          self.example, repeats=self.repeats)
        s = self.model.setting
        return {
            "batch": self.example.shape[0], "device": s.device, "threads": s.threads, "torch": s.torch,
            "memory_format": self.memory_format, "allocator": self.allocator,
            "original_s": seconds["original"], "compressed_s": seconds["compressed"],
            "ratio": seconds["compressed"] / seconds["original"], "speedup": seconds["original"] / seconds["compressed"],
            "original_as_given_s": seconds["original_as_given"],
            "speedup_vs_as_given": seconds["original_as_given"] / seconds["compressed"],
            "forms": forms,
        }


def _latency_rounds(original: nn.Module, layers: dict[str, _Layer], options: dict[str, list[Option]], timing: _Timing,
                    target: Target, settings: FitSettings, rounds: int, progress: bool, workers: int = 1,
                    again: Callable | None = None, judge: Callable[[dict[str, Option]], float] | None = None,
                    ) -> tuple[nn.Module, dict, dict[str, Option], dict]:
    """Allocate the measured per-layer latencies to the target, build, measure the whole model, correct the
    budget and re-plan (``rounds`` at most). Returns the model, its layer entries, its choice and its latency
    record: the least damaging round that meets the target; else (``_as_fast``) the least damaging plan that
    measured as fast as the fastest one; never a model slower than the original (all layers dense then, with a
    warning). ``again(choose)`` (``_probe_rounds``): the options probed for the plan at each round's budget, and
    the prune decision there (each round's record keeps it: ``pruning``), so that a re-plan at a lower budget is
    not made of options never measured (CIFAR ResNet-56, latency=0.6: a second round's unprobed plan predicted
    0.0015 nats, measured 1.1 on the calibration images, kept 74 %).

    ``judge(choice)`` (``_plan_kl``): the measured KL of a plan, every chosen layer replaced at once. With it, each
    round's plan is judged ("least damaging") by its measured KL rather than the sum of its layers' predictions
    (which are 3–300× low at these budgets and rank plans wrongly), and the KLs of its pruned and its factorized layers alone rescale
    pruning's damages against the factorizations' for the next round (``plan.family_scale``, the sums over every
    judged round: one plan's parts alone made the scale swing between 0.6 and 21 on ResNet-20); a round in the
    target's band is then re-planned at the same budget, once the scale has moved, until the plan repeats."""
    reference_ns = _ns(timing.reference_seconds)
    budget = _latency_budget(layers, options, timing, target)
    producers = _producers(layers)
    history, results = [], []
    scale = 1.0  # pruning's damages against the factorizations' (``plan.family_scale``)
    pooled = {"prune": [0.0, 0.0], "factorized": [0.0, 0.0]}  # family -> predicted, measured KL of the judged parts

    def attempt(allowed: int, search: str) -> tuple[tuple, bool]:
        """Plan at ``allowed`` ns, build and measure: the result (model, entries, choice, latency record, predicted
        ns) and whether it is new (False: that plan was measured already, its result)."""
        nonlocal scale
        planned, decision = (options, None) if again is None else \
            again(lambda o: allocate(pruning_scaled(o, scale), allowed, "latency", producers))
        choice = allocate(pruning_scaled(planned, scale), allowed, "latency", producers)
        plan = {n: (o.method, o.ranks) for n, o in choice.items()}  # damages may differ: probes corrected them
        seen = next((r for r in results if {n: (o.method, o.ranks) for n, o in r[2].items()} == plan), None)
        if seen is not None:
            return seen, False
        compressed, entries = _build(original, layers, choice, settings, progress, workers=workers)
        measured = timing.measure(compressed, timing.forms(layers, choice))
        chosen_ns = sum(o.cost.latency for o in choice.values())
        predicted = {"prune": 0.0, "factorized": 0.0}  # as predicted and probed, before ``scale``
        for o in choice.values():
            if o.method == "prune":
                predicted["prune"] += o.damage / scale
            elif o.method != "dense":
                predicted["factorized"] += o.damage
        record = {"budget_s": allowed * 1e-9, "predicted_ratio": 1 - (budget.dense - chosen_ns) / reference_ns,
                  "ratio": measured["ratio"], "damage": sum(predicted.values()), "search": search, "pruning": decision,
                  "pruning_scale": scale}
        if judge is not None:
            record["kl"] = judge(choice)
            parts = {family: judge({n: o for n, o in choice.items() if (o.method == "prune") == (family == "prune")})
                     for family in predicted if 0 < predicted[family] < sum(predicted.values())}
            if len(parts) == 2:  # pooled over the rounds: one plan's parts alone swing the scale from round to round
                record["kl_parts"] = parts
                for family, kl in parts.items():
                    pooled[family][0] += predicted[family]
                    pooled[family][1] += kl
                scale = family_scale({k: v[0] for k, v in pooled.items()}, {k: v[1] for k, v in pooled.items()}) or scale
        history.append(record)
        results.append((compressed, entries, choice, measured, chosen_ns))
        return results[-1], True

    def damage_of(result: tuple) -> float:
        """What a measured round cost the model: its measured KL where judged, else its predicted damage."""
        record = history[next(i for i, r in enumerate(results) if r is result)]
        return record.get("kl", record["damage"])

    for _ in range(rounds):
        before = scale
        result, new = attempt(budget.allowed, "target")
        if not new:
            break
        ratio, chosen_ns = result[3]["ratio"], result[4]
        if 0.95 * target.fraction <= ratio <= target.fraction:
            if scale == before:
                break
            continue  # the same budget, pruning's damages rescaled by what this plan measured
        following = budget.measured(chosen_ns, ratio)
        if following is None:
            break
        budget = following
    feasible = [r for r, h in zip(results, history) if h["ratio"] <= target.fraction * (1 + LATENCY_TOLERANCE)]
    if feasible:
        best = min(feasible, key=damage_of)
    else:
        fastest = min(r[3]["ratio"] for r in results)
        best = _as_fast(attempt, results, budget, max(2, rounds - len(results)), damage_of)
        warnings.warn(f"latency target {target} not reached: the fastest plan found measured {fastest:.3f} of the "
                      f"original's latency at batch {timing.example.shape[0]} (the layers' cheapest options cannot go "
                      f"lower on this device at this batch size); returned: the least damaging plan measured as fast "
                      f"({'by its measured KL' if judge is not None else 'by its predicted damage'}), "
                      f"{best[3]['ratio']:.3f} (check its accuracy)", stacklevel=3)
    compressed, entries, choice, measured, _ = best
    returned: int | None = next(i for i, r in enumerate(results) if r is best)
    if measured["ratio"] >= 1:
        warnings.warn(f"every plan for {target} ran slower than the original ({measured['ratio']:.2f}×): returning the "
                      "original model unchanged", stacklevel=3)
        choice = {n: next(o for o in options[n] if o.method == "dense") for n in layers}
        compressed, entries = copy.deepcopy(original), {}
        measured, returned = timing.measure(compressed, {}), None
    measured["rounds"], measured["returned_round"] = history, returned
    measured["target_reached"] = measured["ratio"] <= target.fraction * (1 + LATENCY_TOLERANCE)
    return compressed, entries, choice, measured


def _as_fast(attempt: Callable[[int, str], tuple[tuple, bool]], results: list, budget: LatencyBudget,
             steps: int, damage_of: Callable[[tuple], float]) -> tuple:
    """Where no plan meets a latency target: the least damaging plan that measures as fast as the fastest one
    (within LATENCY_TOLERANCE), searched by bisection of the budget between the cheapest plan and the dense model
    (``steps`` plans built and measured at most; ``attempt(ns, label)`` plans, builds and measures one).

    The cheapest options of every layer need not make the fastest model: on CIFAR ResNet-20 at latency=0.5 (out
    of reach) the plan of the cheapest options measured 0.79 of the original's time and kept 62.7 % top-1 where a
    latency=0.8 plan measured 0.73–0.80 and kept 88–91 %. Past the point where the model stops getting faster,
    spending more damage buys nothing."""
    low, high = 0.0, 1.0  # fractions of the way from the cheapest budget to the dense one: as fast / slower
    for _ in range(steps):
        fraction = (low + high) / 2
        result, _ = attempt(round(budget.cheapest + fraction * (budget.dense - budget.cheapest)), "as fast, less damage")
        if result[3]["ratio"] <= min(r[3]["ratio"] for r in results) * (1 + LATENCY_TOLERANCE):
            low = fraction
        else:
            high = fraction
    fastest = min(r[3]["ratio"] for r in results)
    as_fast = [r for r in results if r[3]["ratio"] <= fastest * (1 + LATENCY_TOLERANCE)]
    return min(as_fast, key=damage_of)


def _producers(layers: dict[str, _Layer]) -> dict[str, str]:
    """Consumer → producer of every prunable layer whose producer is compressible too: the allocation decides the two
    together (pruning needs the producer dense)."""
    return {n: l.chain.producer for n, l in layers.items() if l.chain is not None and l.chain.producer in layers}


def _latency_budget(layers: dict[str, _Layer], options: dict[str, list[Option]], timing: _Timing,
                    target: Target) -> LatencyBudget:
    """The first round's budget: the target's share of the reference time, less what the layers that are not
    compressed take (the reference minus the compressible layers' dense timings)."""
    return LatencyBudget.of(target.fraction, _ns(timing.reference_seconds), options, _producers(layers))


def _probe_rounds(layers: dict[str, _Layer], options: dict[str, list[Option]], probe: DamageProbe,
                  config: CompressConfig, check: Callable[[], DamageProbe]) -> tuple[dict[str, dict[tuple, float]], Callable]:
    """The measurements (layer -> (method, ranks) -> KL; they grow with every call) and ``decide(choose)``:
    measure the real damage (``DamageProbe``: the lower confidence bound, mean − 2 standard errors, so that the
    probe images' own noise moves nothing) of every option ``choose`` picks that has not been measured yet,
    correct each layer's predicted damages by its measurements (``plan.calibrated``) and choose again,
    ``config.probe_rounds`` times at most or until the choice has been measured entirely; with method 'auto',
    then decide whether to prune at all (``_prune_or_not``: the plan without pruning gets its own rounds; the
    two are compared on the probe images, or where they cannot tell, on those of ``check()``). ``decide`` returns
    the corrected options and that decision (None where no plan prunes).

    A params/macs target decides once; the latency rounds decide at each round's budget, because whether pruning
    pays depends on the budget: CIFAR ResNet-20 at latency=0.7 kept the plan without pruning at the first round's
    budget; the lower budgets of later rounds, decided once for all, left it only the cheapest CP ranks (MACs 0.22,
    71.6 % top-1, where re-deciding at each budget kept 88–90 %)."""
    settings = config.candidate_settings
    measured: dict[str, dict[tuple, float]] = {}

    def refine(base: dict[str, list[Option]], choose: Callable[[dict[str, list[Option]]], dict[str, Option]],
               ) -> dict[str, list[Option]]:
        corrected = {n: calibrated(opts, measured.get(n, {})) for n, opts in base.items()}
        for _ in range(config.probe_rounds):
            todo = [(n, o) for n, o in choose(corrected).items()
                    if o.method != "dense" and (o.method, o.ranks) not in measured.get(n, {})]
            if not todo:
                break
            _prefetch(layers, [(n, o.method, o.ranks) for n, o in todo], settings, resolve_workers(config.fit_workers))
            replacements = [_replacement(layers[name], option, settings) for name, option in todo]
            for (name, option), kl in zip(todo, probe.lower_bounds(replacements)):  # one round's probes share passes
                measured.setdefault(name, {})[option.method, option.ranks] = kl
            corrected = {n: calibrated(opts, measured.get(n, {})) for n, opts in base.items()}
        return corrected

    def decide(choose: Callable[[dict[str, list[Option]]], dict[str, Option]]) -> tuple[dict[str, list[Option]], dict | None]:
        corrected = refine(options, choose)
        if config.method != "auto":
            return corrected, None
        return _prune_or_not(layers, options, corrected, choose, functools.partial(refine, choose=choose), probe, check,
                             settings, resolve_workers(config.fit_workers))

    return measured, decide


def _prune_or_not(layers: dict[str, _Layer], options: dict[str, list[Option]], corrected: dict[str, list[Option]],
                  choose: Callable[[dict[str, list[Option]]], dict[str, Option]],
                  refine: Callable[[dict[str, list[Option]]], dict[str, list[Option]]], probe: DamageProbe,
                  check: Callable[[], DamageProbe], settings: FitSettings,
                  workers: int = 1) -> tuple[dict[str, list[Option]], dict | None]:
    """Whether the plan prunes: the ``corrected`` options (``options`` after the probes) as they are, or
    ``options`` without pruning, corrected by their own probe rounds (``refine``: a plan compared before its
    options were measured would be judged by predictions the probes exist to correct), by which of the two
    plans ``choose`` makes costs the model less: the mean KL with every chosen layer replaced at once, on the
    probe images where the per-image differences decide it (their mean beyond ``CHECK_Z`` standard errors), else
    on the images of ``check()`` (``CompressConfig.check_images``, made only then: a whole plan's KL is
    heavy-tailed over images).

    Per-layer damages add up well for many small errors, but pruning's are large and compound through depth:
    on CIFAR ResNet-20 a pruning-only plan at macs=0.7 predicted 0.019 nats and cost 0.147 (a CP plan: 0.0023
    and 0.0022), and ResNet-56 at params=0.25 lost 3.6 points more with pruning among the options than without.
    A plan-level measurement sees the compounding that no per-layer probe can. Returns the options to plan
    with and what was measured (None where no plan prunes)."""
    with_pruning = choose(corrected)
    if not any(o.method == "prune" for o in with_pruning.values()):
        return corrected, None
    without = {n: [o for o in opts if o.method != "prune"] for n, opts in options.items()}
    try:
        choose(without)
    except ValueError:  # only pruning reaches the budget
        return corrected, {"kept": True, "reason": "the budget is out of reach without pruning"}
    without = refine(without)
    without_pruning = choose(without)
    _prefetch(layers, [(n, o.method, o.ranks) for c in (with_pruning, without_pruning) for n, o in c.items()], settings,
              workers)

    def kls(on: DamageProbe) -> tuple[Tensor, Tensor]:
        return tuple(_plan_per_image(layers, settings, on, choice)  # type: ignore[return-value]
                     for choice in (with_pruning, without_pruning))

    kl_with, kl_without = kls(probe)
    difference, error = mean_and_error(kl_with - kl_without)
    if abs(difference) <= CHECK_Z * error:  # the probe images cannot tell: more images
        wider = check()
        if wider.images > probe.images:
            probe = wider
            kl_with, kl_without = kls(probe)
    mean_with, mean_without = float(kl_with.mean()), float(kl_without.mean())
    decision = {"kept": mean_with <= mean_without, "kl_with": mean_with, "kl_without": mean_without,
                "images": probe.images}
    return (corrected if decision["kept"] else without), decision


def _plan_per_image(layers: dict[str, _Layer], settings: FitSettings, on: DamageProbe,
                    choice: dict[str, Option]) -> Tensor:
    """The KL of each of ``on``'s images (nats) with every chosen layer of the plan replaced at once."""
    return on.per_image([_replacement(layers[n], o, settings) for n, o in choice.items() if o.method != "dense"])


def _plan_kl(layers: dict[str, _Layer], settings: FitSettings, check: Callable[[], DamageProbe],
             choice: dict[str, Option]) -> float:
    """The mean KL (nats per image, on the images of ``check()``) of the model with every chosen layer replaced."""
    if all(o.method == "dense" for o in choice.values()):
        return 0.0
    return float(_plan_per_image(layers, settings, check(), choice).mean())


def _replacement(layer: _Layer, option: Option, settings: FitSettings) -> tuple[nn.Module, Tensor, Tensor | None]:
    """What a probe puts in the layer's place for ``option``: (module, reconstructed weight, corrected bias)."""
    approx = _fit_cached(layer, option.method, option.ranks, settings).reconstruct()
    return layer.module, approx, layer.problem.corrected_bias(approx, settings.bias_correction)


def _prune_anchor_ks(layer: _Layer) -> set[int]:
    """The kept channel counts at which a prunable layer's damage is computed exactly (``PRUNE_ANCHORS``)."""
    return {round(f * layer.geometry.input_channels) for f in PRUNE_ANCHORS}


def _fit_cached(layer: _Layer, method: str, ranks: tuple[int, ...], settings: FitSettings) -> Decomposition:
    """The layer's fit at these settings; a new one goes on from a cached fit that they continue (a final fit from
    its planning fit: the same result as a fresh fit, without redoing the planning fit's sweeps)."""
    key = (method, tuple(ranks), settings)
    if key not in layer.fits:
        layer.fits[key] = fit(layer.problem, method, ranks, settings, _start(layer, key))
    return layer.fits[key]


def _start(layer: _Layer, key: tuple[str, tuple[int, ...], FitSettings]) -> Decomposition | None:
    """The cached fit of the layer that a fit of ``key`` goes on from (the one with the most sweeps), if any."""
    method, ranks, settings = key
    earlier = [d for (m, r, s), d in layer.fits.items() if (m, r) == (method, ranks) and settings.continues(s)]
    return max(earlier, key=lambda d: len(d.history), default=None)


def _prefetch(layers: dict[str, _Layer], wanted: Iterable[tuple[str, str, tuple[int, ...]]], settings: FitSettings,
              workers: int, progress: str | None = None) -> None:
    """Run ahead, ``workers`` at a time (``datd.workers``), the iterative fits (layer, method, ranks) that the
    next step will ask ``_fit_cached`` for and that are not cached yet; the closed forms stay where they are asked."""
    jobs, costs = {}, {}
    for name, method, ranks in wanted:
        layer, key = layers[name], (method, tuple(ranks), settings)
        if method not in ("tucker2", "cp") or key in layer.fits or (name, key) in jobs:
            continue
        jobs[name, key] = functools.partial(fit, layer.problem, method, key[1], settings, _start(layer, key))
        costs[name, key] = fit_macs(layer.problem, method, key[1], settings)
    on_cpu = all(layers[n].problem.sigma.device.type == "cpu" for n, _ in jobs)
    for (name, key), decomposition in fit_many(jobs, workers, cost=costs.__getitem__, on_cpu=on_cpu,
                                               progress=progress).items():
        layers[name].fits[key] = decomposition


def _rank_multiple(config: CompressConfig, device: torch.device) -> int:
    if config.rank_multiple:
        return config.rank_multiple
    return default_rank_multiple(device) if Target.parse(config.target).metric == "latency" else 1


def _options(layers: dict[str, _Layer], config: CompressConfig, target: Target, multiple: int, progress: bool,
             latency: LatencyModel | None = None, model: nn.Module | None = None) -> dict[str, list[Option]]:
    """Planning options per layer: dense, every Σ-SVD rank (closed-form damages) and every rank of the
    iterative decompositions between the smallest and the largest anchor fraction. Those are fitted at the
    anchors only (``config.candidates``, ``config.candidate_iter`` sweeps); between anchors the damage is
    interpolated linearly in log-damage versus cost, since damage falls smoothly as the rank grows (cost in
    the target's metric; in MACs for latency targets, whose measured costs are neither smooth nor exact).

    With ``latency`` (latency targets) each option's cost carries its measured latency, and only ranks that
    run at least ``LATENCY_MIN_GAIN`` faster than the dense layer at its own shape are considered (and
    fitted): the largest of them becomes an anchor too, so that the options reach it."""
    settings = config.candidate_settings
    metric = "macs" if target.metric == "latency" else target.metric
    options: dict[str, list[Option]] = {}
    anchor_ranks = {(n, m): _anchors(layer, m, config, metric, multiple)
                    for n, layer in layers.items() for m in layer.methods}
    if latency is None:  # the anchors are known before any measurement: fit them all at once
        _prefetch(layers, [(n, m, r) for (n, m), ranks in anchor_ranks.items() for r in ranks], settings,
                  resolve_workers(config.fit_workers), "candidate fits" if progress else None)
    for name, layer in tqdm(layers.items(), desc="candidates", unit="layer", disable=not progress, leave=False):
        g = layer.geometry
        seconds: dict[tuple[str, tuple[int, ...]], float] = {}  # (method, ranks) -> measured seconds
        if latency is not None:
            seconds["dense", ()] = latency.dense(layer.module, layer.input_shape)
        opts = [Option("dense", (), dense_cost(g), 0.0)]
        for method in layer.methods:
            ladder = rank_ladder(method, g, multiple)
            anchors = anchor_ranks[name, method]
            if latency is not None and method == "prune":  # the chain's layers with fewer channels, timed
                chain, profile = layer.chain, layer.profile
                assert chain is not None and profile is not None and model is not None
                measured = latency.pruned(lambda k: timed_parts(model, chain, profile, k), chain.channels, ladder)
                measured = {r: dataclasses.replace(m, seconds=seconds["dense", ()] + m.seconds) for r, m in measured.items()}
            elif latency is not None:
                measured = latency.candidates(layer.module, layer.input_shape, method, ladder)
            if latency is not None:
                fast_enough = (1 - LATENCY_MIN_GAIN) * seconds["dense", ()]
                ladder = [r for r in ladder if r in measured and measured[r].seconds < fast_enough]
                seconds.update({(method, r): measured[r].seconds for r in ladder})
                anchors = _affordable(layer, method, (anchors & set(ladder)) | set(ladder[-1:]), settings)
            if method == "svd":
                curve = svd_damage_curve(layer.problem, layer.sensitivity, settings)
                opts += [Option("svd", r, factorized_cost("svd", g, r), float(curve[r[0]])) for r in ladder]
                continue
            if method == "prune":
                curve = prune_damage_curve(layer.problem, layer.sensitivity, settings, sorted(_prune_anchor_ks(layer)))
                opts += [Option("prune", r, factorized_cost("prune", g, r), float(curve[r[0]])) for r in ladder]
                continue
            fitted = sorted(anchors, key=lambda r: metric_of(factorized_cost(method, g, r), metric))
            approxes = (_fit_cached(layer, method, ranks, settings) for ranks in fitted)  # scored in factored form
            points = [(metric_of(factorized_cost(method, g, ranks), metric), d) for ranks, d in
                      zip(fitted, damages(layer.problem, approxes, layer.sensitivity, settings.bias_correction))]
            opts += _interpolated(method, g, ladder, points, metric)
        if latency is not None:
            # pruning's latency is the whole model's change (its producer's time saved too): it may be below zero
            opts = [dataclasses.replace(o, cost=dataclasses.replace(o.cost, latency=round(seconds[o.method, o.ranks] * 1e9)
                                                                    if o.method == "prune" else _ns(seconds[o.method, o.ranks])))
                    for o in opts]
        options[name] = opts
    return options


def _anchors(layer: _Layer, method: str, config: CompressConfig, metric: str, multiple: int) -> set[tuple[int, ...]]:
    """The ranks at which ``_options`` fits ``method`` for planning: those of the candidate fractions, where the
    planning budget pays for a sweep of the fit."""
    g = layer.geometry
    ranks = {r for f in config.candidates if (r := ranks_for_fraction(method, g, f, metric, multiple))}
    return _affordable(layer, method, ranks, config.candidate_settings)


def _affordable(layer: _Layer, method: str, ranks: set[tuple[int, ...]], settings: FitSettings) -> set[tuple[int, ...]]:
    if method == "svd":  # closed form: every rank
        return ranks
    shape = tuple(layer.problem.group(0).weight.shape)
    return {r for r in ranks if sweeps(method, shape, r, settings) >= 1}


def _interpolated(method: str, g: Geometry, ladder: list[tuple[int, ...]], points: list[tuple[int, float]],
                  metric: str) -> list[Option]:
    """Options for the ladder ranks whose cost lies within the fitted anchor ``points`` (cost, damage),
    sorted by cost."""
    costs = [c for c, _ in points]
    logs = [math.log(max(d, 1e-300)) for _, d in points]
    out = []
    for ranks in ladder:
        cost = factorized_cost(method, g, ranks)
        x = metric_of(cost, metric)
        if not points or not costs[0] <= x <= costs[-1]:
            continue
        i = min(max(bisect.bisect_left(costs, x), 1), len(costs) - 1)
        x0, x1 = costs[i - 1], costs[i]
        t = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
        out.append(Option(method, ranks, cost, math.exp(logs[i - 1] + t * (logs[i] - logs[i - 1]))))
    return out


def _uniform(layers: dict[str, _Layer], budget: int, target: Target, settings: FitSettings,
             total: int, fixed: int, multiple: int, workers: int = 1) -> dict[str, Option]:
    """The same cost ratio ρ in every layer: the largest ρ (bisection) whose per-layer ranks — the largest
    with cost ≤ ρ · dense cost — fit the budget. With method 'auto', each layer takes the decomposition with
    the least damage at its ratio."""
    metric = target.metric

    def ranks_at(ratio: float) -> dict[tuple[str, str], tuple[int, ...]]:
        out = {}
        for name, layer in layers.items():
            for method in layer.methods:
                ranks = ranks_for_fraction(method, layer.geometry, ratio, metric, multiple)
                ladder = rank_ladder(method, layer.geometry, multiple)
                if ranks is None and not ladder:
                    continue
                out[name, method] = ranks if ranks is not None else ladder[0]
        return out

    def worst_total(ratio: float) -> int:
        worst: dict[str, int] = {}
        for (name, method), ranks in ranks_at(ratio).items():
            cost = metric_of(factorized_cost(method, layers[name].geometry, ranks), metric)
            worst[name] = max(worst.get(name, 0), cost)
        return sum(worst.values())

    low, high = 0.0, 1.0
    if worst_total(low) > budget:
        options = {n: [Option(m, r, factorized_cost(m, layers[n].geometry, r)) for (n2, m), r in ranks_at(0.0).items() if n2 == n]
                   for n in layers}
        raise DatdError(_infeasible(target, total, fixed, options))
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if worst_total(mid) <= budget else (low, mid)
    chosen: dict[str, Option] = {}
    _prefetch(layers, [(n, m, r) for (n, m), r in ranks_at(low).items()], settings, workers)
    for (name, method), ranks in ranks_at(low).items():
        layer = layers[name]
        approx = _fit_cached(layer, method, ranks, settings).reconstruct()
        option = Option(method, ranks, factorized_cost(method, layer.geometry, ranks),
                        damage(layer.problem, approx, layer.sensitivity, settings.bias_correction))
        if name not in chosen or option.damage < chosen[name].damage:
            chosen[name] = option
    for name in layers:
        chosen.setdefault(name, Option("dense", (), dense_cost(layers[name].geometry)))
    return chosen


def _option_from_plan(name: str, layer: _Layer, entry: tuple[str, tuple[int, ...]]) -> Option:
    method, ranks = entry
    if method not in layer.methods:
        raise DatdError(f"plan: layer '{name}' cannot use {method!r} (allowed: {', '.join(layer.methods)})")
    ranks = check_ranks(method, layer.geometry, ranks, name)
    return Option(method, ranks, factorized_cost(method, layer.geometry, ranks))


def _infeasible(target: Target, total: int, fixed: int, options: dict[str, list[Option]],
                producers: dict[str, str] | None = None) -> str:
    least = fixed + cheapest(options, target.metric, producers)
    return (f"impossible budget {target}: with every compressible layer at its smallest rank the model keeps "
            f"{least / total:.3f} of its {target.metric} ({least:,} of {total:,}); choose a larger fraction")


def _versions() -> dict[str, str]:
    import importlib.metadata

    import numpy
    import safetensors
    import torchvision

    return {"datd": importlib.metadata.version("datd"), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "safetensors": safetensors.__version__, "python": platform.python_version()}


def _report(config: CompressConfig, candidates: dict[str, nn.Module], stats: Statistics, skipped: dict[str, str],
            entries: dict[str, dict], before: Cost, after: Cost, timings: dict[str, float], start: float,
            compressed: nn.Module) -> dict:
    layers = []
    for name, module in candidates.items():
        kind = {nn.Linear: "linear", nn.Conv2d: "conv2d"}.get(type(module), type(module).__name__)
        entry = {"name": name, "kind": "linear" if isinstance(module, nn.Linear) else kind,
                 "shape": list(module.weight.shape)}
        s = stats.get(name)
        g = Geometry.of(module, s.input_hw, s.output_hw) if s is not None else None
        if g is not None:
            dense = dense_cost(g)
            entry.update(params_before=dense.params, macs_before=dense.macs)
        if name in entries:
            e = dict(entries[name])
            cost = e.pop("cost")
            entry.update(e, params_after=cost.params, macs_after=cost.macs)
        else:
            entry["skipped"] = skipped.get(name, "not selected")
            now = compressed.get_submodule(name)
            if g is not None and getattr(now, MARK, False):  # a producer whose output channels were pruned
                kept = now.weight.shape[0] / module.weight.shape[0]
                entry.update(params_after=sum(p.numel() for p in now.parameters()),
                             macs_after=round(entry["macs_before"] * kept))
            elif g is not None:
                entry.update(params_after=entry["params_before"], macs_after=entry["macs_before"])
        layers.append(entry)
    return {
        "format": "datd-report/1",
        "params_before": before.params, "params_after": after.params, "params_ratio": after.params / before.params,
        "macs_before": before.macs, "macs_after": after.macs, "macs_ratio": after.macs / before.macs,
        "seconds": time.perf_counter() - start,
        "timings": timings,
        "config": asdict(config),
        "statistics": {"num_images": stats.num_images, "description": stats.description},
        "versions": _versions(),
        "layers": layers,
        "plan": Plan({n: Option(e["method"], tuple(e["ranks"]), e["cost"]) for n, e in entries.items()},
                     dict(skipped), config.target).to_json(),
    }
