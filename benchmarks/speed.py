"""How fast datd compresses: statistics against a forward pass, per-stage compress times, Σ-ALS against the textbook.

Sections (all in one run by default; each writes benchmarks/results/speed_<section>.jsonl and its BENCHMARKS.md
section):

- statistics: ``collect_stats`` over every Conv2d/Linear against a plain forward pass over the same batches (eval
  mode, no_grad), and against the previous formulation of the patch moments (im2col for every layer), interleaved,
  median of ``--repeats``; real images (CIFAR-10 training images for the CIFAR ResNets, the ImageNet sample at 224
  for torchvision models, random-init weights there: speed does not depend on them).
- compress: ``datd.compress`` end to end with the default method and ranks (stage times from its report), and
  one forward pass over the same calibration images timed in the same run: the ratio is compress / forward.
- decompose: the textbook-ALS comparison of ``benchmarks/decompose.py`` (256 and 512 channels).

    python benchmarks/speed.py [--sections statistics,compress,decompose] [--repeats 3] [--quick] [--baseline REV]
"""

from __future__ import annotations

import argparse
import importlib
import statistics as stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import datd
import datd.stats as stats_module
from _common import env_lines, environment, read_results, update_section, write_results
from datd.data import calibration_loader, data_root
from datd.calibration import statistics_and_sensitivity
from datd.models import load_model
from datd.pipeline import CompressConfig
from datd.sensitivity import output_sensitivity
from datd.stats import batch_inputs

IMAGENET = f"imagefolder:{data_root()}/imagenet-sample/val"
# (model, weights, data, images, batch): the statistics cases
STATISTICS = [
    ("cifar_resnet20", None, "cifar10", 1024, 128),
    ("cifar_resnet56", None, "cifar10", 1024, 128),
    ("resnet18", "none", IMAGENET, 512, 64),
    ("resnet50", "none", IMAGENET, 256, 32),
    ("googlenet", "none", IMAGENET, 256, 32),
    ("mobilenet_v2", "none", IMAGENET, 256, 64),
]
# (model, weights, data, images, batch, target): the compress cases (default method and ranks)
COMPRESS = [
    ("cifar_resnet20", None, "cifar10", 2048, 128, "params=0.5"),
    ("cifar_resnet56", None, "cifar10", 2048, 128, "params=0.5"),
    ("resnet18", "none", IMAGENET, 512, 32, "macs=0.5"),
    ("resnet50", "none", IMAGENET, 512, 32, "macs=0.5"),
    ("googlenet", "none", IMAGENET, 512, 32, "macs=0.5"),
]


def _batches(model_name: str, weights: str | None, data: str, images: int, batch: int):
    loaded = load_model(model_name, weights)
    loader = calibration_loader(data, loaded.preprocessing, images, batch_size=batch)
    return loaded, [batch_inputs(b) for b in loader]  # decoded once: the timings exclude image decoding


@torch.no_grad()
def _forward(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    for x in batches:
        model(x)


def _im2col_stats(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """The previous formulation: every conv's patch moments from im2col columns."""
    chosen = stats_module.prefers_shifts
    stats_module.prefers_shifts = lambda geometry, channels: False
    try:
        datd.collect_stats(model, batches, progress=False)
    finally:
        stats_module.prefers_shifts = chosen


def _baseline_stats(revision: str):
    """``collect_stats`` of the library at git ``revision`` (its ``src/datd`` extracted as package ``datd_baseline``
    into a temporary folder), to time against this tree's in the same run."""
    root = Path(__file__).resolve().parents[1]
    folder = Path(tempfile.mkdtemp(prefix="datd-baseline-"))
    archive = subprocess.run(["git", "archive", revision, "src/datd"], cwd=root, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (folder / "src" / "datd").rename(folder / "datd_baseline")
    sys.path.insert(0, str(folder))
    return importlib.import_module("datd_baseline.stats").collect_stats


DRAWN = "statistics (1/16 of positions)"
BASELINE = "statistics (baseline)"
TWO_PASSES = "statistics and sensitivity (two passes)"
ONE_PASS = "statistics and sensitivity (one pass)"


def _two_passes(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """What ``compress`` ran before ``datd.calibration``: the statistics, then the sensitivities (its defaults)."""
    datd.collect_stats(model, batches, progress=False)
    output_sensitivity(model, batches, dict(_layers(model)), max_images=CompressConfig.sensitivity_images,
                       progress=False)


def _one_pass(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    layers = dict(_layers(model))
    statistics_and_sensitivity(model, batches, list(layers), layers,
                               sensitivity_images=CompressConfig.sensitivity_images, progress=False)


def _layers(model: torch.nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def run_statistics(repeats: int, cases: list[tuple], with_sensitivity: bool = False,
                   baseline: str | None = None) -> list[dict]:
    """``with_sensitivity``: also time the statistics and the sensitivities of ``compress`` in two passes and in
    the one pass of ``datd.calibration``; ``baseline``: also time ``collect_stats`` as it was at that git revision."""
    rows = []
    collect_baseline = _baseline_stats(baseline) if baseline else None
    for model_name, weights, data, images, batch in cases:
        loaded, batches = _batches(model_name, weights, data, images, batch)
        model = loaded.model.eval()
        runs = {"forward": lambda: _forward(model, batches),
                "statistics": lambda: datd.collect_stats(model, batches, progress=False),
                "statistics (im2col)": lambda: _im2col_stats(model, batches),
                DRAWN: lambda: datd.collect_stats(model, batches, progress=False, positions=1 / 16)}
        if with_sensitivity:
            runs.update({TWO_PASSES: lambda: _two_passes(model, batches), ONE_PASS: lambda: _one_pass(model, batches)})
        if collect_baseline is not None:
            runs[BASELINE] = lambda: collect_baseline(model, batches, progress=False)
        datd.collect_stats(model, batches[:1], progress=False)  # warm up: kernels for every shape
        _forward(model, batches[:1])
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(repeats):  # interleaved
            for key, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
        median = {k: stat.median(v) for k, v in times.items()}
        rows.append({"section": "statistics", "model": model_name, "images": sum(len(b) for b in batches),
                     "batch": batch, "input": list(batches[0].shape[1:]), "repeats": repeats, "seconds": times,
                     "median": median, "ratio": median["statistics"] / median["forward"],
                     "ratio_im2col": median["statistics (im2col)"] / median["forward"],
                     "ratio_drawn": median[DRAWN] / median["forward"],
                     **({"baseline": baseline, "ratio_baseline": median[BASELINE] / median["forward"]} if baseline else {})})
        print(f"statistics {model_name}: forward {median['forward']:.2f}s, statistics {median['statistics']:.2f}s "
              f"({rows[-1]['ratio']:.2f}x), im2col {median['statistics (im2col)']:.2f}s "
              f"({rows[-1]['ratio_im2col']:.2f}x)" + (f", with sensitivity: two passes {median[TWO_PASSES]:.2f}s, one "
                                                     f"pass {median[ONE_PASS]:.2f}s" if with_sensitivity else ""),
              flush=True)
    return rows


def run_compress(cases: list[tuple], compare_workers: bool = False) -> list[dict]:
    """``compare_workers``: also compress with ``fit_workers=1`` (every fit in this process, at its threads) right
    after the default run, between the same forward passes."""
    rows = []
    for model_name, weights, data, images, batch, target in cases:
        loaded, batches = _batches(model_name, weights, data, images, batch)
        model = loaded.model.eval()
        _forward(model, batches[:1])

        def forward_pass() -> float:
            start = time.perf_counter()
            _forward(model, batches)
            return time.perf_counter() - start

        before = forward_pass()
        start = time.perf_counter()
        _, report = datd.compress(model, batches, target=target, progress=False, measure_latency=False)
        seconds = time.perf_counter() - start
        one_worker = {}
        if compare_workers:
            start = time.perf_counter()
            _, single = datd.compress(model, batches, target=target, progress=False, measure_latency=False,
                                      fit_workers=1)
            one_worker = {"one_worker_seconds": time.perf_counter() - start, "one_worker_timings": single["timings"]}
        after = forward_pass()  # the machine's speed drifts over a run of minutes: the ratio uses both
        forward = (before + after) / 2
        rows.append({"section": "compress", "model": model_name, "images": images, "batch": batch, "target": target,
                     "forward_seconds": forward, "forward_before_after": [before, after],
                     "compress_seconds": seconds, "ratio": seconds / forward,
                     "timings": report["timings"], "params_ratio": report["params_ratio"],
                     "macs_ratio": report["macs_ratio"], "fit_workers": report["config"]["fit_workers"],
                     "threads": torch.get_num_threads(), **one_worker,
                     "methods": sorted({l.get("method") for l in report["layers"] if l.get("method")})})
        stages = ", ".join(f"{k} {v:.0f}s" for k, v in report["timings"].items())
        print(f"compress {model_name} {target}: {seconds:.0f}s = {rows[-1]['ratio']:.1f}x forward ({forward:.1f}s); "
              f"{stages}", flush=True)
    return rows


def _provenance(rows: list[dict], env: dict) -> list[str]:
    """One environment line per run that produced some of ``rows``."""
    runs = {(r.get("date"), r.get("command")): r for r in rows if r.get("date")}
    return [env_lines({**env, **{k: r[k] for k in ("machine", "versions", "commit", "command", "date")}})
            + f" ({sum(1 for x in rows if (x.get('date'), x.get('command')) == key)} rows)"
            for key, r in sorted(runs.items())] or [env_lines(env)]


COMPARE_WITHIN_RUN = ("*run*: when and at which commit the row was measured (the provenance lines below). Compare ratios "
            "within one run: this machine's speed drifts between sessions (2026-12-06: the CIFAR ResNet-56 default "
            "planned in 36 s at 16:49 and in 46 s at 19:54 with the planning code unchanged; the statistics of CIFAR "
            "ResNet-20 took 5.0× the forward pass at 19:30 at the commit before 96fabb4, 3.2× on 2026-12-01).")


def _day(row: dict) -> str:
    return f"{row.get('date', '')[:16].replace('T', ' ')} {row.get('commit', '')[:7]}".strip() or "—"


def statistics_markdown(rows: list[dict], env: dict) -> str:
    lines = ["## Speed: statistics against a forward pass (`benchmarks/speed.py --sections statistics`)", "",
             "`collect_stats` for every Conv2d/Linear (Σ of all images and of the even-image fold, pooled moments, "
             "means) over the same decoded batches as a plain forward pass (eval mode, no_grad), interleaved, median "
             "of the repeats. *im2col* is the previous formulation (every conv's patches unfolded, one D×D product), "
             "kept as a fallback and timed here for reference. *1/16 drawn*: `positions=1/16` (each image's "
             "positions drawn at random where that is cheaper than the exact statistics: an estimate, not the same "
             "Σ; its effect on accuracy is in the accuracy section). Goals (issue 10): ≤ 2.5× on ResNet-18 at 224, "
             "≤ 3× on the CIFAR ResNets. *with sensitivity*: what `compress` runs before planning, the statistics "
             "and the sensitivities (forward and backward over the first 512 images), in two passes as before "
             "2026-12-07 and in the one pass of `datd.calibration` (`--with-sensitivity`), in seconds. *baseline*: "
             "`collect_stats` of an earlier commit in the same interleaved run (`--baseline REV`): its seconds, its "
             "ratio to the forward pass and this commit's speed-up over it. "
             + COMPARE_WITHIN_RUN, "",
             "| model | run | images × input | batch | forward s | statistics s | ratio | im2col s | im2col ratio | "
             "1/16 drawn s | 1/16 drawn ratio | with sensitivity: two passes / one pass | baseline: commit, s, ratio "
             "(speed-up) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["median"]
        lines.append(f"| {r['model']} | {_day(r)} | {r['images']} × {'×'.join(map(str, r['input']))} | "
                     f"{r['batch']} | {m['forward']:.2f} | {m['statistics']:.2f} | **{r['ratio']:.2f}×** | "
                     f"{m['statistics (im2col)']:.2f} | {r['ratio_im2col']:.2f}× | "
                     + (f"{m[DRAWN]:.2f} | {r['ratio_drawn']:.2f}× |" if DRAWN in m else "— | — |")
                     + (f" {m[TWO_PASSES]:.2f} / {m[ONE_PASS]:.2f} ({m[ONE_PASS] / m[TWO_PASSES]:.2f}×) |"
                        if ONE_PASS in m else " — |")
                     + (f" {r['baseline'][:7]}, {m[BASELINE]:.2f}, {r['ratio_baseline']:.2f}× "
                        f"({m[BASELINE] / m['statistics']:.2f}×) |" if BASELINE in m else " — |"))
    return "\n".join(lines + [""] + _provenance(rows, env))


def _one_worker(row: dict) -> str:
    if "one_worker_seconds" not in row:
        return "—"
    t = row["one_worker_timings"]
    parts = " / ".join(f"{t[k]:.0f}" if k in t else "—" for k in ("planning", "damage probes", "fitting"))
    return f"{parts}, {row['one_worker_seconds']:.0f} ({row['one_worker_seconds'] / row['compress_seconds']:.2f}×)"


def _stage(timings: dict[str, float], stage: str) -> str:
    if stage in timings:
        return f"{timings[stage]:.0f}"
    if "statistics and sensitivity" in timings and stage in ("statistics", "sensitivity"):  # one pass for both
        return f"{timings['statistics and sensitivity']:.0f} (with sensitivity)" if stage == "statistics" else "(one pass)"
    return "—"


def compress_markdown(rows: list[dict], env: dict) -> str:
    stages = ["statistics", "shrinkage", "sensitivity", "planning", "damage probes", "fitting"]
    lines = ["## Speed: compress end to end (`benchmarks/speed.py --sections compress`)", "",
             "`datd.compress` with the default method and ranks (auto), probes on, latency not measured, from "
             "decoded images; forward = one plain forward pass over the same calibration images, timed in the same "
             "run just before and just after the compress (the mean; both in parentheses where they differ by more "
             "than 10 %: this machine's speed drifts). Goals (issue 10): ResNet-50 at macs=0.5 ≤ 12× its forward pass over 512 images; the CIFAR "
             "ResNet-56 default under 90 s (evaluation excluded: none is run here). The fits of different layers run "
             "side by side in one worker process per torch thread (`fit_workers`, `datd.workers`); *1 worker*: the "
             "same compress with every fit in the calling process (`fit_workers=1`, as before 2026-12-06 22:45), "
             "timed in the same run where given (`--compare-workers`): its planning / probes / fitting seconds, its "
             "total and its ratio to the default's. *statistics (with sensitivity)*: from 2026-12-07 on the statistics "
             "and the sensitivities come from one pass over the calibration images (`datd.calibration`: the "
             "sensitivity pass's forward serves the statistics too); rows before it ran the two apart. "
             + COMPARE_WITHIN_RUN, "",
             "| model | run | images | target | forward s | " + " | ".join(stages) + " | compress s | × forward | "
             "params | MACs | 1 worker: planning / probes / fitting, compress s (× default) |",
             "|---|---|---|---|---|" + "---|" * len(stages) + "---|---|---|---|---|"]
    for r in rows:
        cells = " | ".join(_stage(r["timings"], s) for s in stages)
        pair = r.get("forward_before_after")
        drift = f" ({pair[0]:.1f} / {pair[1]:.1f})" if pair and max(pair) > 1.1 * min(pair) else ""
        lines.append(f"| {r['model']} | {_day(r)} | {r['images']} | {r['target']} | "
                     f"{r['forward_seconds']:.1f}{drift} | {cells} | "
                     f"{r['compress_seconds']:.0f} | **{r['ratio']:.1f}×** | {r['params_ratio']:.3f} | "
                     f"{r['macs_ratio']:.3f} | {_one_worker(r)} |")
    return "\n".join(lines + [""] + _provenance(rows, env))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="statistics,compress,decompose")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the CIFAR ResNet-20 and ResNet-18 cases only")
    parser.add_argument("--models", help="comma-separated subset of the cases' models")
    parser.add_argument("--compare-workers", action="store_true",
                        help="compress: also time fit_workers=1 (the fits in-process) in the same run")
    parser.add_argument("--with-sensitivity", action="store_true",
                        help="statistics: also time the statistics and sensitivities in two passes and in one")
    parser.add_argument("--baseline", metavar="REV",
                        help="statistics: also time collect_stats as it was at this git revision, interleaved")
    args = parser.parse_args()
    torch.manual_seed(0)
    allocator = datd.tune_allocator()  # one allocator regime for every timing (glibc otherwise page-faults activations)
    sections = args.sections.split(",")
    env = environment()
    env["machine"] += f", allocator: {allocator}"
    wanted = (lambda name: name in ("cifar_resnet20", "resnet18")) if args.quick else \
        (lambda name: args.models is None or name in args.models.split(","))

    def stamp(rows: list[dict]) -> list[dict]:
        return [{**r, **{k: env[k] for k in ("machine", "versions", "commit", "command", "date")}} for r in rows]

    def merged(name: str, rows: list[dict]) -> list[dict]:
        """This run's rows, and the previous file's rows of the models not run now (in the cases' order)."""
        order = [c[0] for c in (STATISTICS if name == "speed_statistics" else COMPRESS)]
        keep = {r["model"]: r for r in read_results(name)}
        keep.update({r["model"]: r for r in rows})
        return sorted(keep.values(), key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))

    if "statistics" in sections:
        rows = merged("speed_statistics", stamp(run_statistics(args.repeats, [c for c in STATISTICS if wanted(c[0])],
                                                               args.with_sensitivity, args.baseline)))
        write_results("speed_statistics", rows)
        update_section("speed_statistics", statistics_markdown(rows, env))
    if "compress" in sections:
        cases = [c for c in COMPRESS if wanted(c[0])]
        rows = merged("speed_compress", stamp(run_compress(cases, args.compare_workers)))
        write_results("speed_compress", rows)
        update_section("speed_compress", compress_markdown(rows, env))
    if "decompose" in sections:
        import decompose

        problems = decompose.layer_problems([256, 512], 512)
        rows = stamp(decompose.run_textbook(problems, 0.25, 3))
        for r in rows:
            r["fraction"] = 0.25
        write_results("decompose_textbook", rows)
        update_section("decompose_textbook", decompose.textbook_markdown(rows, env))


if __name__ == "__main__":
    main()
