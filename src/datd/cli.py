"""The ``datd`` command: parses arguments, calls the API, prints. No logic the API lacks."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import sys
from collections import Counter
from pathlib import Path

import click
import torch

from . import distributed, io
from .checkpoint import Checkpoint
from .data import INTERPOLATIONS, Preprocessing, calibration_loader, eval_loader
from .errors import DatdError
from .evaluate import accuracy, count_macs, count_params
from .export import FORMATS, export
from .latency import tune_allocator
from .models import load_model
from .pipeline import CompressConfig, compress
from .plan import METHODS, Target
from .quantize import CALIBRATION_METHODS
from .report import write_report
from .stats import Statistics, batch_inputs, collect_stats, sums_bytes

DEFAULTS = CompressConfig()
DEMO_TARGET = "latency=0.8"
MODEL_HELP = ("cifar_resnet20|32|44|56|110 (CIFAR-10 ResNets), any torchvision classifier name (resnet18, resnet50, "
              "googlenet, mobilenet_v2, …), timm:<name> (needs datd[timm]) or package.module:callable")
WEIGHTS_HELP = ("a state-dict file (.pth/.th/.safetensors); 'DEFAULT' (torchvision's or timm's pretrained weights) "
                "or a torchvision weights name (downloads); "
                "'none' for random init. Default: the shipped checkpoint for cifar_resnet20/56, random init for "
                "torchvision models")
DATA_HELP = ("cifar10 (train calibrates, test evaluates), cifar10:train, cifar10:test, tinyimagenet32, "
             "imagefolder:PATH, or an .npz with x (N,H,W,3 uint8) and optional y")


def _device(device: str | None) -> str:
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _triple(ctx, param, value: str | None) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value.split(","))
    except ValueError:
        numbers = ()
    if len(numbers) != 3:
        raise click.BadParameter(f"expected three comma-separated numbers (R,G,B), got {value!r}")
    return numbers  # type: ignore[return-value]


_positions_option = click.option(
    "--positions", default=1.0, show_default=True, type=float,
    help="fraction of each conv's output positions per image used for Σ (below 1: drawn at random, unbiased; for "
         "large calibration sets)")


def _model_options(f=None, *, required: bool = True):
    """--model/--weights and the preprocessing overrides (--mean, --std, --size, --resize, --interpolation)."""
    def decorate(f):
        for option in reversed([
            click.option("--model", "model_name", required=required, default=None, help=MODEL_HELP),
            click.option("--weights", default=None, help=WEIGHTS_HELP),
            click.option("--mean", callback=_triple, default=None, help="per-channel input mean R,G,B on [0, 1] pixels "
                         "[default: the model family's]"),
            click.option("--std", callback=_triple, default=None, help="per-channel input std R,G,B [default: the "
                         "model family's]"),
            click.option("--size", type=int, default=None, help="square input side the model is fed [default: the "
                         "model family's; CIFAR 32, torchvision 224, callables: the data's own size]"),
            click.option("--resize", type=int, default=None, help="resize the shorter side to this before the center "
                         "crop of --size [default: the model family's]"),
            click.option("--interpolation", type=click.Choice(list(INTERPOLATIONS)), default=None,
                         help="resampling of resize [default: the model family's, bilinear]"),
        ]):
            f = option(f)
        return f

    return decorate(f) if f is not None else decorate


def _load(model_name: str, weights: str | None, **preprocessing):
    """The model with its family's preprocessing, overridden where the user said so."""
    return _override(load_model(model_name, weights), **preprocessing)


def _override(loaded, **preprocessing):
    """``loaded`` with the preprocessing options the user gave (None: keep) replacing its own."""
    overrides = {k: v for k, v in preprocessing.items() if v is not None}
    if overrides:
        loaded.preprocessing = dataclasses.replace(loaded.preprocessing, **overrides)
    return loaded


class _Main(click.Group):
    """The command group: every error ends in one line on stderr and a non-zero exit code (2: bad input or a
    file that cannot be read or written; 1: anything unexpected; 130: interrupted), with the traceback only
    under ``datd --debug``. Nothing half-written is left behind: outputs are written atomically."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            expected = isinstance(exc, (ValueError, OSError, RuntimeError, TypeError))
            message = str(exc).strip() or type(exc).__name__
            if not expected:
                message = f"unexpected {type(exc).__name__}: {message} (datd --debug ... shows the traceback)"
            click.echo(f"error: {message}", err=True)
            sys.exit(2 if expected else 1)
        except KeyboardInterrupt:
            if ctx.params.get("debug"):
                raise
            click.echo("interrupted: outputs are written atomically, nothing half-written was left "
                       "(datd compress ... --resume continues a compress run)", err=True)
            sys.exit(130)
        finally:
            distributed.finish()


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="datd")
@click.option("--debug", is_flag=True, help="show the traceback of an error")
def main(debug: bool) -> None:
    """Compress trained CNNs with distribution-aware tensor decompositions (no fine-tuning)."""


def _budgets(scale: str) -> dict:
    """The fit budgets of ``--fit-budget``: the defaults times a factor, or none."""
    if scale.strip().lower() == "none":
        return {"candidate_budget": None, "fit_budget": None}
    try:
        factor = float(scale)
    except ValueError:
        factor = -1.0
    if not factor > 0:
        raise DatdError(f"--fit-budget must be a positive factor or 'none', got {scale!r}")
    return {"candidate_budget": DEFAULTS.candidate_budget * factor, "fit_budget": DEFAULTS.fit_budget * factor}


@main.command("compress")
@_model_options
@click.option("--data", required=True, help="calibration data: " + DATA_HELP)
@click.option("--calib", default=2048, show_default=True, help="number of calibration images")
@click.option("--target", default=DEFAULTS.target, show_default=True,
              help="whole-model budget: params=F, macs=F or latency=F (measured time of the inference form at "
                   "--latency-batch on --device), F a fraction of the original in (0, 1)")
@click.option("--method", type=click.Choice(METHODS + ("auto",)), default=DEFAULTS.method, show_default=True,
              help="decomposition; auto picks per layer the one with the least predicted damage, channel pruning "
                   "(prune: a layer reads fewer input channels, refitted, and their producer loses them) included; "
                   "prune alone keeps every other layer dense")
@click.option("--norm", type=click.Choice(["sigma", "frobenius"]), default=DEFAULTS.norm, show_default=True,
              help="fit in the data-aware Σ-norm or the classical Frobenius norm")
@click.option("--ranks", default=DEFAULTS.ranks, show_default=True,
              help="auto (data-aware global allocation), uniform (same ratio per layer) or a plan.json to reuse/edit")
@click.option("--bias-correction/--no-bias-correction", default=DEFAULTS.bias_correction, show_default=True,
              help="cancel the mean output error through the bias (and fit in the input covariance)")
@click.option("--stats", "stats_path", type=click.Path(dir_okay=False), default=None,
              help="reuse a statistics file from `datd stats` (possibly computed on another data set)")
@click.option("--eval-data", default=None, help="evaluation data (default: the test split of --data when labelled)")
@click.option("--eval-limit", type=int, default=None, help="evaluate on the first N images only")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="output directory [default: runs/MODEL-TARGET]")
@click.option("--device", default=None, help="cpu or cuda [default: cuda when available]")
@click.option("--seed", default=DEFAULTS.seed, show_default=True, help="seed of the calibration subset and the fits")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--latency-batch", default=DEFAULTS.latency_batch, show_default=True,
              help="batch size at which latency is measured (and budgeted with latency=F)")
@click.option("--rank-multiple", default=DEFAULTS.rank_multiple, show_default=True,
              help="every rank a multiple of M; 0 = automatic (the device's granularity for latency targets, 1 else; "
              "8 makes params/macs plans faster, see README)")
@click.option("--memory-format", type=click.Choice(["auto", "contiguous", "channels_last"]),
              default=DEFAULTS.memory_format, show_default=True, help="memory format of the inference form")
@click.option("--latency-cache", default=DEFAULTS.latency_cache, show_default=True,
              help="per-layer timings cache: 'default' (~/.cache/datd/latency.json or $DATD_CACHE_DIR), 'none' or a path")
@click.option("--measure-latency/--no-measure-latency", default=DEFAULTS.measure_latency, show_default=True,
              help="with params/macs targets, measure the latency before/after too")
@click.option("--probe-images", default=DEFAULTS.probe_images, show_default=True,
              help="images on which the planner measures the real damage of the options it picks (0: off)")
@click.option("--check-images", default=DEFAULTS.check_images, show_default=True,
              help="images of the plan-level check whether pruning pays (the whole plan's KL with and without it)")
@click.option("--shrinkage", default=DEFAULTS.shrinkage, show_default=True,
              help="trust in each layer's Σ: cv (shrinkage towards the identity chosen per layer by two-fold "
                   "cross-validation over the calibration images) or a fixed α in [0, 1] (0: the sample Σ)")
@click.option("--batchnorm-check/--no-batchnorm-check", default=DEFAULTS.batchnorm_check, show_default=True,
              help="with --shrinkage cv: raise a layer's shrinkage to what the BatchNorm after it asks for (its "
                   "running variances against those the layer's Σ predicts), against calibration images unlike the "
                   "training data (blurred, upscaled, another domain)")
@click.option("--prune/--no-prune", default=DEFAULTS.prune, show_default=True,
              help="with --method auto, offer channel pruning among the options (--no-prune: factorizations only, "
                   "every layer keeps its channel counts; safer with statistics from another data set)")
@click.option("--propagate/--no-propagate", default=DEFAULTS.propagate, show_default=True,
              help="fit each layer to the inputs it receives from the already compressed layers before it, and "
                   "the last layer of each residual branch to also take up the error on the branch's shortcut "
                   "(about one extra pass of each model over the calibration images, plus paired moments)")
@click.option("--propagate-residual/--no-propagate-residual", default=DEFAULTS.propagate_residual,
              show_default=True, help="with --propagate: the residual compensation (off: each layer reproduces "
                                      "only its own original outputs)")
@click.option("--propagate-images", type=click.IntRange(min=0), default=DEFAULTS.propagate_images, show_default=True,
              help="with --propagate: the paired statistics from the first N calibration images only (0: all; their "
                   "cost is proportional to N, see README)")
@click.option("--fit-budget", default="1", show_default=True,
              help="scale the work each layer's fits may spend (multiply-adds: planning fits "
                   f"{DEFAULTS.candidate_budget:.0e}, final fits {DEFAULTS.fit_budget:.0e}, binding only on wide "
                   "layers) by this factor; 'none' lifts the limit (e.g. on a GPU)")
@click.option("--fit-workers", type=click.IntRange(min=0), default=DEFAULTS.fit_workers, show_default=True,
              help="processes that fit different layers at once, one torch thread each (0: one per torch thread; "
                   "1: every fit in this process)")
@_positions_option
@click.option("--overwrite", is_flag=True,
              help="replace an --out directory that holds other files (an earlier datd result is always replaced)")
@click.option("--resume", is_flag=True,
              help="continue an interrupted run from its checkpoint (OUT.partial/: statistics, plan, fitted layers); "
                   "the result is the one the uninterrupted run would have given")
def compress_command(model_name, weights, data, calib, target, method, norm, ranks, bias_correction, stats_path,
                     eval_data, eval_limit, out_dir, device, seed, batch_size, latency_batch, rank_multiple,
                     memory_format, latency_cache, measure_latency, probe_images, check_images, shrinkage,
                     batchnorm_check, prune, propagate, propagate_residual, propagate_images, fit_budget, fit_workers,
                     positions, overwrite, resume, **preprocessing) -> None:
    """Compress a model to a budget; write the compressed model, report.json/md, plan.json and plots."""
    config = CompressConfig(target=target, method=method, norm=norm, ranks=ranks, bias_correction=bias_correction,
                            seed=seed, latency_batch=latency_batch, rank_multiple=rank_multiple,
                            memory_format=memory_format, latency_cache=latency_cache,
                            measure_latency=measure_latency, probe_images=probe_images, check_images=check_images,
                            shrinkage=shrinkage,
                            batchnorm_check=batchnorm_check, prune=prune, propagate=propagate,
                            propagate_residual=propagate_residual,
                            propagate_images=propagate_images, positions=positions, fit_workers=fit_workers,
                            **_budgets(fit_budget))
    loaded = _load(model_name, weights, **preprocessing)
    _compress(loaded, data, calib, config, stats_path, eval_data, eval_limit, out_dir, device, batch_size, overwrite,
              resume)


def _compress(loaded, data, calib, config, stats_path, eval_data, eval_limit, out_dir, device, batch_size,
              overwrite=False, resume=False) -> None:
    device = _device(distributed.init(device))
    model_name = loaded.name
    out = Path(out_dir or f"runs/{model_name.replace(':', '_')}-{config.target.replace('=', '')}")
    if distributed.world_size() > 1 and resume:
        raise DatdError("--resume is not supported under torchrun yet (each rank would need the checkpoint)")
    io.check_output_directory(out, overwrite)  # before any work
    if config.tune_allocator:  # this process's eager passes reuse freed memory (statistics 10 % faster, measured)
        tune_allocator()
    calib_loader = calibration_loader(data, loaded.preprocessing, calib, batch_size=batch_size, seed=config.seed)
    stats = Statistics.load(stats_path, loaded.model) if stats_path else None
    main_rank = distributed.is_main()
    evaluation = _eval_data(eval_data or data, loaded, eval_limit, required=eval_data is not None) if main_rank else None
    checkpoint = Checkpoint(out.with_name(out.name + ".partial"), resume=resume)
    if distributed.world_size() > 1:
        checkpoint = None
    elif (checkpoint.directory / "run.json").is_file():
        click.echo(f"note: {'resuming from' if resume else 'discarding (--resume continues it)'} the checkpoint of an "
                   f"unfinished run in {checkpoint.directory}", err=True)
    where = f"checkpoints in {checkpoint.directory}" if checkpoint else f"{distributed.world_size()} ranks"
    if main_rank:
        click.echo(f"compressing {model_name} to {config.target} with {config.method}/{config.norm}/{config.ranks} on "
                   f"{device} ({calib} calibration images from {data}; {where})", err=True)
    compressed, report = compress(loaded.model, calib_loader, config, stats=stats, eval_data=evaluation, device=device,
                                  checkpoint=checkpoint, progress=main_rank,
                                  # under torchrun this rank's share; alone, the statistics come with the sensitivities
                                  stats_batches=distributed.Shard(calib_loader) if distributed.world_size() > 1 else None)
    if not main_rank:
        return
    source = {"model": model_name, "weights": loaded.weights, "preprocessing": dataclasses.asdict(loaded.preprocessing)}
    report["source"] = {**source, "data": data, "calib": calib, "eval_data": eval_data or data, "eval_limit": eval_limit}
    with io.output_directory(out, overwrite=overwrite) as tmp:
        io.save(compressed, tmp, source=source, inference=report["inference"])
        written = write_report(report, tmp)
    if checkpoint is not None:
        checkpoint.remove()
    _summary(report, out, out / written["markdown"].name)


def _eval_data(spec: str, loaded, limit: int | None, required: bool):
    """The evaluation loader, or None when ``spec`` has no labels and evaluation was not asked for."""
    try:
        return eval_loader(spec, loaded.preprocessing, limit=limit, num_classes=loaded.num_classes)
    except ValueError:
        if required:
            raise
        click.echo(f"note: {spec} has no labels the model can be scored on; accuracy is not measured", err=True)
        return None


def _summary(report: dict, out: Path, markdown: Path) -> None:
    if report.get("accuracy_after") is not None:
        click.echo(f"accuracy  {100 * report['accuracy_before']:.2f}% -> {100 * report['accuracy_after']:.2f}%")
    click.echo(f"params    {report['params_before']:,} -> {report['params_after']:,} ({report['params_ratio']:.3f})")
    click.echo(f"MACs      {report['macs_before']:,} -> {report['macs_after']:,} ({report['macs_ratio']:.3f})")
    if "latency" in report:
        lat = report["latency"]
        click.echo(f"latency   {1e3 * lat['original_s']:.2f} ms -> {1e3 * lat['compressed_s']:.2f} ms per batch of "
                   f"{lat['batch']} ({lat['ratio']:.3f}: {lat['speedup']:.2f}x faster; {lat['speedup_vs_as_given']:.2f}x "
                   f"faster than the original as given), {lat['threads']} threads, {lat['memory_format']}")
        if lat["ratio"] >= 1:
            click.echo(f"warning   the compressed model is not faster than the original at batch {lat['batch']}; "
                       "use --target latency=F to plan for speed", err=True)
        elif "target_reached" in lat and not lat["target_reached"]:
            click.echo(f"warning   the latency target was not reached (measured {lat['ratio']:.3f})", err=True)
    click.echo(f"time      {report['seconds']:.1f} s")
    click.echo(f"model     {out}/")
    click.echo(f"report    {markdown}")


@main.command("stats")
@_model_options
@click.option("--data", required=True, help=DATA_HELP)
@click.option("--calib", default=2048, show_default=True, help="number of images")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="statistics file (.safetensors)")
@click.option("--device", default=None, help="cpu or cuda [default: cuda when available]")
@click.option("--seed", default=0, show_default=True, help="seed of the image subset (and of drawn --positions)")
@click.option("--batch-size", default=128, show_default=True)
@_positions_option
@click.option("--dry-run", is_flag=True, help="print the size of the Σ sums per layer and in total; collect nothing")
def stats_command(model_name, weights, data, calib, out_path, device, seed, batch_size, positions, dry_run,
                  **preprocessing) -> None:
    """Collect the input statistics Σ of every Conv2d/Linear and save them for reuse (--stats). Under
    ``torchrun --nproc_per_node N -m datd stats …`` the images are shared among the N processes."""
    device = _device(distributed.init(device))
    loaded = _load(model_name, weights, **preprocessing)
    loader = calibration_loader(data, loaded.preprocessing, calib, batch_size=batch_size, seed=seed)
    model = loaded.model.to(device)
    tune_allocator()
    if dry_run:
        sizes = sums_bytes(model, batch_inputs(next(iter(loader))).to(device))
        for name, size in sizes.items():
            click.echo(f"{name:<40} {size / 2**20:10.1f} MiB")
        click.echo(f"{'total':<40} {sum(sizes.values()) / 2**20:10.1f} MiB of float64 sums (per process), plus the "
                   f"forward pass at batch {batch_size} and one chunk of patch products (≤ 64 MiB)")
        return
    stats = collect_stats(model, distributed.Shard(loader), description=loader.dataset.image_set.description,
                          progress=distributed.is_main(), positions=positions, seed=seed)
    if not distributed.is_main():
        return
    stats.save(out_path)
    click.echo(f"statistics of {len(stats)} layers from {stats.num_images} images -> {out_path}")


@main.command("eval")
@_model_options(required=False)
@click.option("--compressed", type=click.Path(file_okay=False), default=None,
              help="a directory written by `datd compress` (its base model is rebuilt from its config)")
@click.option("--data", required=True, help=DATA_HELP)
@click.option("--limit", type=int, default=None, help="evaluate on the first N images only")
@click.option("--device", default=None, help="cpu or cuda [default: cuda when available]")
def eval_command(model_name, weights, compressed, data, limit, device, **preprocessing) -> None:
    """Top-1 accuracy, parameters and MACs of a model or of a compressed model directory."""
    if (model_name is None) == (compressed is None):
        raise DatdError("give exactly one of --model or --compressed")
    if compressed:
        loaded = _override(_compressed_base(compressed, io.read_config(compressed)["source"]), **preprocessing)
        io.load(compressed, loaded.model)
    else:
        loaded = _load(model_name, weights, **preprocessing)
    device = _device(device)
    loader = eval_loader(data, loaded.preprocessing, limit=limit, num_classes=loaded.num_classes)
    model = loaded.model.to(device)
    top1 = accuracy(model, loader, device=device)
    example = batch_inputs(next(iter(loader)))[:1].to(device)
    macs = count_macs(model, example)
    click.echo(f"accuracy  {100 * top1:.2f}% on {len(loader.dataset)} images of {data}")
    click.echo(f"params    {count_params(model):,}")
    click.echo(f"MACs      {macs:,}")


@main.command("export")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--format", "format_", type=click.Choice(FORMATS), default="onnx", show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="file to write")
@click.option("--input-size", type=int, default=None,
              help="side of the square input images [default: the model's preprocessing size]")
def export_command(directory, format_, out_path, input_size) -> None:
    """Export a compressed model directory (from `datd compress`) in its inference form, dynamic batch size,
    checked against torch."""
    source = io.read_config(directory)
    loaded = _compressed_base(directory, source["source"])
    size = input_size or loaded.preprocessing.size
    if size is None:
        raise DatdError(f"{loaded.name} does not fix its input size: pass --input-size")
    model = io.load(directory, loaded.model)
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    path = export(model, example, out_path, format_, **source["inference"])
    click.echo(f"{format_} model (inputs N×3×{size}×{size}, any N; checked against torch) -> {path}")


@main.command("quantize")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--data", required=True, help="calibration data for the activation ranges: " + DATA_HELP)
@click.option("--calib", default=512, show_default=True, help="number of calibration images")
@click.option("--method", type=click.Choice(CALIBRATION_METHODS), default="percentile", show_default=True,
              help="how activation ranges are calibrated")
@click.option("--eval-data", default=None, help="evaluation data (default: the test split of --data when labelled)")
@click.option("--eval-limit", type=int, default=None, help="evaluate on the first N images only")
@click.option("--latency-batch", default=32, show_default=True, help="batch size at which latency is measured")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="int8 ONNX file [default: DIRECTORY/model.int8.onnx]")
@click.option("--seed", default=0, show_default=True, help="seed of the calibration subset")
@click.option("--forms", "form_choice", type=click.Choice(["auto", "fastest", "compact", "compressed"]),
              default="auto", show_default=True,
              help="execution forms of the factorized layers in int8: the fastest, measured in ONNX Runtime "
              "(fastest: any form; compact: none with more than 5%% more weights; auto: compact for a params "
              "target, else fastest), or those the compression measured for float (compressed)")
def quantize_command(directory, data, calib, method, eval_data, eval_limit, latency_batch, out_path, seed,
                     form_choice) -> None:
    """int8 on top: post-training static quantization (ONNX Runtime) of a compressed model directory; its
    accuracy and measured latency (ONNX Runtime, CPU) next to the float compressed model and the original,
    in DIRECTORY/quantized.json."""
    import tempfile

    from .export import OnnxModel
    from .latency import compare, example_batch
    from .quantize import int8_forms, quantize

    config, loaded, model = _open_compressed(directory)
    out = Path(out_path or Path(directory) / "model.int8.onnx")
    loader = calibration_loader(data, loaded.preprocessing, calib, batch_size=64, seed=seed)
    evaluation = _eval_data(eval_data or data, loaded, eval_limit, required=eval_data is not None)
    click.echo(f"quantizing {directory} to int8 ({calib} calibration images from {data}, {method} ranges)", err=True)
    first = batch_inputs(next(iter(loader)))
    result: dict = {"calib": calib, "data": data, "method": method}
    inference = dict(config["inference"])
    if form_choice == "auto":
        form_choice = "fastest" if _compressed_for_speed(directory) else "compact"
    if form_choice != "compressed":
        inference["forms"], trials = int8_forms(model, loader, batch=latency_batch,
                                                size_slack=0.05 if form_choice == "compact" else None, **inference)
        result["forms"] = {"choice": form_choice, "chosen": dict(Counter(inference["forms"].values())),
                           "trials": trials}
    with tempfile.TemporaryDirectory(prefix="datd-quantize-") as work:
        float_file = Path(work) / "float.onnx"  # in the forms fastest in float
        same_forms = form_choice == "compressed"  # then quantize's own float export is that model
        quantize(model, loader, out, images=calib, method=method, float_path=float_file if same_forms else None,
                 **inference)
        if not same_forms:
            export(model, first[:2].float(), float_file, "onnx", **config["inference"])
        export(loaded.model, first[:2], Path(work) / "original.onnx")
        sessions = {"original": OnnxModel(Path(work) / "original.onnx"), "float": OnnxModel(float_file),
                    "int8": OnnxModel(out)}
        result.update(file=str(out), bytes=out.stat().st_size, bytes_float=float_file.stat().st_size)
        batch = example_batch(first, latency_batch)
        seconds = compare(sessions, batch)
        result["latency"] = {"batch": batch.shape[0], "threads": torch.get_num_threads(), "runtime": "onnxruntime cpu",
                             **{f"{k}_s": v for k, v in seconds.items()},
                             "speedup_vs_float": seconds["float"] / seconds["int8"],
                             "speedup_vs_original": seconds["original"] / seconds["int8"]}
        if evaluation is not None:
            result["accuracy"] = {k: accuracy(m, evaluation, progress=False) for k, m in sessions.items()}
    io.write_json(Path(directory) / "quantized.json", result)
    if "accuracy" in result:
        a = result["accuracy"]
        click.echo(f"accuracy  {100 * a['original']:.2f}% original, {100 * a['float']:.2f}% compressed, "
                   f"{100 * a['int8']:.2f}% compressed int8 (ONNX Runtime)")
    lat = result["latency"]
    click.echo(f"latency   {1e3 * lat['original_s']:.2f} ms original, {1e3 * lat['float_s']:.2f} ms compressed, "
               f"{1e3 * lat['int8_s']:.2f} ms int8 per batch of {lat['batch']} ({lat['speedup_vs_original']:.2f}x "
               f"faster than the original, {lat['speedup_vs_float']:.2f}x than the float compressed model)")
    if "forms" in result:
        chosen = ", ".join(f"{n} {f}" for f, n in result["forms"]["chosen"].items()) or "no factorized layers"
        click.echo(f"forms     {chosen} (the {result['forms']['choice']} in int8, measured)")
    click.echo(f"size      {result['bytes_float'] / 2**20:.2f} MiB float -> {result['bytes'] / 2**20:.2f} MiB int8")
    click.echo(f"model     {out}")
    click.echo(f"report    {Path(directory) / 'quantized.json'}")


@main.command("finetune")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--data", required=True, help="training images (labels optional): " + DATA_HELP)
@click.option("--calib", default=2048, show_default=True, help="number of training images")
@click.option("--epochs", default=1, show_default=True)
@click.option("--lr", default=1e-4, show_default=True, help="Adam learning rate (cosine decay to 0)")
@click.option("--temperature", default=1.0, show_default=True, help="softening of both models' outputs")
@click.option("--label-weight", default=0.0, show_default=True,
              help="weight of the cross-entropy with the labels, when the data has them (0: distillation only)")
@click.option("--mirror/--no-mirror", default=True, show_default=True,
              help="flip each training image left-right with probability 1/2 (off for text, digits, ...)")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--eval-data", default=None, help="evaluation data (default: the test split of --data when labelled)")
@click.option("--eval-limit", type=int, default=None, help="evaluate on the first N images only")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="output directory [default: DIRECTORY-finetuned]; DIRECTORY itself is left as it is")
@click.option("--device", default=None, help="cpu or cuda [default: cuda when available]")
@click.option("--seed", default=0, show_default=True, help="seed of the image subset and of the epochs' order")
@click.option("--overwrite", is_flag=True, help="replace an --out directory that holds other files")
@click.option("--resume", is_flag=True, help="continue from the checkpoint of the last finished epoch (OUT.partial/)")
def finetune_command(directory, data, calib, epochs, lr, temperature, label_weight, mirror, batch_size, eval_data,
                     eval_limit, out_dir, device, seed, overwrite, resume) -> None:
    """Optional: distil the original model into a compressed one (KL to its outputs on unlabelled images,
    labels used with --label-weight); writes a new compressed-model directory with finetune.json."""
    from .finetune import distill, mean_kl

    device = _device(device)
    config, teacher, student = _open_compressed(directory)
    out = Path(out_dir or str(directory).rstrip("/") + "-finetuned")
    io.check_output_directory(out, overwrite)
    loader = calibration_loader(data, teacher.preprocessing, calib, batch_size=batch_size, seed=seed)
    evaluation = _eval_data(eval_data or data, teacher, eval_limit, required=eval_data is not None)
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    click.echo(f"distilling {config['source'].get('model')} into {directory}: {epochs} epoch(s) over {calib} images of "
               f"{data} on {device} (checkpoints in {partial})", err=True)
    result: dict = {"epochs": epochs, "lr": lr, "temperature": temperature, "label_weight": label_weight,
                    "mirror": mirror, "data": data, "calib": calib, "batch_size": batch_size, "seed": seed}
    if evaluation is not None:
        result["accuracy_before"] = accuracy(student, evaluation, device=device, progress=False)
        result["kl_before"] = mean_kl(student, teacher.model, evaluation, device=device)
    result["history"] = distill(student, teacher.model, loader, epochs=epochs, lr=lr, temperature=temperature,
                                label_weight=label_weight, mirror=mirror, seed=seed, device=device,
                                checkpoint=partial / "finetune.pt", resume=resume,
                                on_epoch=lambda e, h: click.echo(f"epoch {e}: loss {h['loss']:.4f}", err=True))
    if evaluation is not None:
        result["accuracy_after"] = accuracy(student, evaluation, device=device, progress=False)
        result["kl_after"] = mean_kl(student, teacher.model, evaluation, device=device)
    with io.output_directory(out, overwrite=overwrite) as tmp:
        io.save(student, tmp, source=config["source"], inference=config["inference"])
        io.write_json(tmp / "finetune.json", result)
    shutil.rmtree(partial, ignore_errors=True)
    if "accuracy_after" in result:
        click.echo(f"accuracy  {100 * result['accuracy_before']:.2f}% -> {100 * result['accuracy_after']:.2f}% "
                   f"after {epochs} epoch(s) of distillation (KL to the original {result['kl_before']:.4f} -> "
                   f"{result['kl_after']:.4f} nats per image)")
    click.echo(f"model     {out}/")


def _compressed_for_speed(directory) -> bool:
    """Whether the directory's report says it was compressed to a MAC or latency target (else: for size, or
    unknown)."""
    try:
        target = io.read_json(Path(directory) / "report.json")["config"]["target"]
        return Target.parse(target).metric != "params"
    except (OSError, ValueError, KeyError, TypeError, DatdError):
        return False


def _open_compressed(directory):
    """A compressed directory's config, its original model (rebuilt from the config's source) and the
    compressed model (a copy of the original with the saved compression applied)."""
    config = io.read_config(directory)
    original = _compressed_base(directory, config["source"])
    return config, original, io.load(directory, copy.deepcopy(original.model))


def _compressed_base(directory, source: dict):
    """The base model a compressed directory was made from (rebuilt from its config's source, with the
    preprocessing it was compressed with)."""
    if "model" not in source:
        raise DatdError(f"{directory}/config.json does not say which model it was made from")
    loaded = load_model(source["model"], source.get("weights"))
    if isinstance(source.get("preprocessing"), dict):
        try:
            loaded.preprocessing = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v
                                                    for k, v in source["preprocessing"].items()})
        except TypeError as exc:
            raise DatdError(f"{directory}/config.json: unreadable preprocessing: {exc}") from exc
    return loaded


@main.command("demo")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/demo", show_default=True)
def demo_command(out_dir) -> None:
    """The shipped CIFAR-10 ResNet-20 made faster (latency=0.8 of its measured time), on the shipped data."""
    _compress(load_model("cifar_resnet20"), "cifar10", 2048, CompressConfig(target=DEMO_TARGET), None, None, None,
              out_dir, None, 128)
