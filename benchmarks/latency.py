"""Measured speed of compressed models: latency targets against the original, in torch eager and ONNX Runtime.

Every time is a median of interleaved repeats in one process, the original timed beside the compressed model;
the tables report ratios. "Original" is the original model's inference form (BatchNorms folded, the same memory
format): the fair baseline, so that folding and layout are never counted as compression; the original as given
(plain eager) is timed too. Torch eager runs with ``datd.tune_allocator()`` (what datd measures and recommends);
one extra column times the same models in a fresh process with glibc's default malloc.

Sections (each result is one JSON line in benchmarks/results/latency.jsonl; finished results are skipped on the
next run unless --redo names their section):

- cifar:    CIFAR-10 ResNet-20/56 (shipped weights; 2048 CIFAR-10 training images calibrate, the full test set
            evaluates): targets macs=0.5 and latency=0.8/0.7/0.5/0.35 planned at batch 32 (the default), and
            latency=0.8 planned at batch 1; each result timed at batch 1, 32 and 128 in torch eager and ONNX Runtime.
- imagenet: torchvision ResNet-18 and ResNet-50 (random init: time only; macs=0.5, latency=0.7/0.5/0.35) and
            MobileNetV2 (the real ImageNet weights in ../shared/data; latency=0.9/0.8/0.7) at 224×224, calibrated on a
            seeded half of the 1,000-image ImageNet sample (top-1 of MobileNetV2 on the other half); targets planned
            at batch 16; timed at batch 1 and 16.
- granularity: CIFAR-10 ResNet-20/56 at params=0.25 and macs=0.33 with every rank allowed (the default) and with
            ranks in multiples of 8 (``rank_multiple=8``), timed at batch 1 and 32 in eager and ONNX Runtime.
- pareto:   latency targets 0.9 … 0.6 for the default (method auto), CP and Tucker-2: top-1 against measured
            latency (plots; the cifar section's default results join the default's line). Run for ResNet-20 (the
            ResNet-56 plot shows the default's cifar results only: the other methods take hours there).

    python benchmarks/latency.py                         # everything (hours on 2 cores)
    python benchmarks/latency.py --sections cifar --models cifar_resnet20
    python benchmarks/latency.py --report-only           # regenerate BENCHMARKS.md and the plots
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, env_lines, environment, read_results, update_section, write_results
from torch.utils.data import DataLoader

import datd
from datd.data import ImageDataset, calibration_loader, eval_loader, load_images
from datd.evaluate import accuracy
from datd.export import export, onnxruntime_session
from datd.latency import compare, example_batch
from datd.models import load_model
from datd.stats import batch_inputs

NAME = "latency"
# results dated before this were timed with spinning ONNX Runtime sessions (their ORT columns are unreliable)
SPINNING_FIXED = "2026-11-30T01"
CIFAR_TARGETS = ["macs=0.5", "latency=0.8", "latency=0.7", "latency=0.5", "latency=0.35"]  # 0.8: the demo's
PARETO_TARGETS = ["latency=0.9", "latency=0.8", "latency=0.7", "latency=0.6"]
PARETO_METHODS = ["auto", "cp", "tucker2"]
IMAGENET_MODELS = {"resnet18": "none", "resnet50": "none", "mobilenet_v2": "models/mobilenet_v2-imagenet-from-int8.safetensors"}
IMAGENET = "imagefolder:{root}/imagenet-sample/val"
REPEATS = 15


def _data_root() -> Path:
    from datd.data import data_root

    return data_root()


class Runner:
    def __init__(self, env: dict, redo: tuple[str, ...]):
        self.env = env
        self.rows = [r for r in read_results(NAME) if r["section"] not in redo and f"{r['section']}:{r.get('model')}" not in redo]
        self.done = {r["key"] for r in self.rows}
        self.loaded: dict[str, object] = {}
        self.stats: dict[str, tuple[datd.Statistics, float]] = {}
        self.fit_caches: dict[tuple, dict] = {}
        self.base: dict[str, float | None] = {}

    # -- models and data

    def model(self, name: str):
        if name not in self.loaded:
            weights = IMAGENET_MODELS.get(name)
            if weights and weights != "none":
                weights = str(_data_root() / weights)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.loaded[name] = load_model(name, weights)
        return self.loaded[name]

    def data(self, name: str) -> tuple[DataLoader, DataLoader | None]:
        """(calibration, evaluation) loaders: CIFAR-10 train/test, or the two seeded halves of the ImageNet sample."""
        loaded = self.model(name)
        if name.startswith("cifar"):
            return (calibration_loader("cifar10", loaded.preprocessing, 2048),
                    eval_loader("cifar10", loaded.preprocessing, num_classes=loaded.num_classes))
        images = load_images(IMAGENET.format(root=_data_root()), "eval")
        order = np.random.default_rng(0).permutation(len(images))
        half = len(images) // 2
        calib = DataLoader(ImageDataset(images.subset(order[:half], "seeded half 0"), loaded.preprocessing), batch_size=32)
        held_out = DataLoader(ImageDataset(images.subset(np.sort(order[half:]), "seeded half 1"), loaded.preprocessing),
                              batch_size=50)
        return calib, (held_out if IMAGENET_MODELS[name] != "none" else None)

    def statistics(self, name: str) -> tuple[datd.Statistics, float]:
        """Σ of every layer (collected once per model) and the seconds it took."""
        if name not in self.stats:
            start = time.perf_counter()
            stats = datd.collect_stats(self.model(name).model, self.data(name)[0], progress=False)
            self.stats[name] = (stats, time.perf_counter() - start)
        return self.stats[name]

    def base_accuracy(self, name: str) -> float | None:
        if name not in self.base:
            evaluation = self.data(name)[1]
            self.base[name] = None if evaluation is None else accuracy(self.model(name).model, evaluation, progress=False)
        return self.base[name]

    def fit_settings(self, name: str) -> dict:
        """Random-init models are timed only: time does not depend on how well the chosen ranks are fitted, and
        their damages rank random layers, so their fits stop after 3 sweeps (candidates and final fits alike;
        the defaults are 10 and 100). Issue 10 is about making the default fits fast enough for 224×224 models."""
        if IMAGENET_MODELS.get(name) == "none":
            return {"candidate_iter": 3, "max_iter": 3}
        return {}

    # -- one result

    def run(self, section: str, name: str, target: str, method: str, plan_batch: int, batches: list[int],
            engines: tuple[str, ...], extra: dict | None = None) -> None:
        """One compression of ``name`` to ``target`` (``extra``: further ``datd.compress`` settings), timed."""
        key = f"{section}|{name}|{target}|{method}|plan batch {plan_batch}"
        if extra:
            key += "|" + ",".join(f"{k}={v}" for k, v in sorted(extra.items()))
        if key in self.done:
            return
        stats, stats_seconds = self.statistics(name)
        calib, evaluation = self.data(name)
        original = self.model(name).model
        cache = self.fit_caches.setdefault((name, method), {})
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compressed, report = datd.compress(original, calib, target=target, method=method, stats=stats,
                                               latency_batch=plan_batch, fit_cache=cache, progress=False,
                                               **self.fit_settings(name), **(extra or {}))
        seconds = time.perf_counter() - start
        row = {
            "key": key, "section": section, "model": name, "target": target, "method": method, "plan_batch": plan_batch,
            "accuracy_before": self.base_accuracy(name),
            "accuracy": None if evaluation is None else accuracy(compressed, evaluation, progress=False),
            "params_ratio": report["params_ratio"], "macs_ratio": report["macs_ratio"],
            "compress_seconds": seconds, "stats_seconds": stats_seconds, "timings": report["timings"],
            "settings": {**self.fit_settings(name), **(extra or {})}, "rank_multiple": report.get("rank_multiple"),
            "planned": {k: v for k, v in report["latency"].items() if k != "forms"},
            "warnings": sorted({str(w.message) for w in caught if "latency" in str(w.message)}),
            "layers": {l["name"]: [l.get("method", "dense"), l.get("ranks"), report["inference"]["forms"].get(l["name"])]
                       for l in report["layers"]},
            "times": self.time(name, original, compressed, report["inference"], calib, batches, engines),
        }
        self.record(row)

    def time(self, name: str, original, compressed, inference: dict, calib, batches: list[int],
             engines: tuple[str, ...]) -> dict:
        """{engine: {batch: {model: seconds}}} for the original (inference form and as given) and the compressed model."""
        first = batch_inputs(next(iter(calib)))
        reference = datd.for_inference(original, memory_format=inference["memory_format"])
        fast = datd.for_inference(compressed, **inference)
        times: dict[str, dict] = {}
        with tempfile.TemporaryDirectory() as tmp:
            if "ort" in engines:
                example = first[:2]
                export(original, example, Path(tmp) / "original.onnx")
                export(compressed, example, Path(tmp) / "compressed.onnx", forms=inference["forms"])
                sessions = {m: onnxruntime_session(Path(tmp) / f"{m}.onnx", threads=torch.get_num_threads())
                            for m in ("original", "compressed")}
            for batch in batches:
                example = example_batch(first, batch)
                times.setdefault("eager", {})[str(batch)] = compare(
                    {"original": reference, "compressed": fast, "original_as_given": original}, example, repeats=REPEATS)
                if "ort" in engines:
                    times.setdefault("ort", {})[str(batch)] = compare(sessions, example, repeats=REPEATS)
            if "fresh" in engines:
                datd.save(compressed, Path(tmp) / "model", inference=inference)
                batch = batches[len(batches) // 2]
                times["eager_default_malloc"] = {str(batch): _fresh_process_times(name, Path(tmp) / "model", batch)}
        return times

    def record(self, row: dict) -> None:
        row.update({k: self.env[k] for k in ("machine", "versions", "commit", "date", "command")})
        self.rows = [r for r in self.rows if r["key"] != row["key"]] + [row]
        self.done.add(row["key"])
        write_results(NAME, self.rows)
        eager = row["times"]["eager"]
        print(json.dumps({k: row[k] for k in ("model", "target", "method", "accuracy", "macs_ratio")}
                         | {f"ratio@{b}": round(t["compressed"] / t["original"], 3) for b, t in eager.items()}), flush=True)


def _fresh_process_times(name: str, directory: Path, batch: int) -> dict:
    """Eager times at ``batch`` measured by a new Python process that leaves glibc's malloc as it is."""
    out = subprocess.run([sys.executable, __file__, "--fresh-timing", name, str(directory), str(batch)],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def fresh_timing(name: str, directory: str, batch: int) -> None:
    """The --fresh-timing entry point: no datd.tune_allocator(); prints the times as one JSON line."""
    runner = Runner(environment(), ())
    loaded = runner.model(name)
    config = datd.io.read_config(directory)
    compressed = datd.load(directory, load_model(name, loaded.weights).model, inference=True)
    reference = datd.for_inference(loaded.model, memory_format=config["inference"]["memory_format"])
    first = batch_inputs(next(iter(runner.data(name)[0])))
    times = compare({"original": reference, "compressed": compressed, "original_as_given": loaded.model},
                    example_batch(first, batch), repeats=REPEATS)
    print(json.dumps(times))


def cifar(runner: Runner, models: list[str]) -> None:
    for name in models:
        for target in CIFAR_TARGETS:
            runner.run("cifar", name, target, "auto", 32, [1, 32, 128], ("eager", "ort", "fresh"))
        runner.run("cifar", name, "latency=0.8", "auto", 1, [1, 32, 128], ("eager", "ort", "fresh"))  # planned for batch 1


def granularity(runner: Runner, models: list[str]) -> None:
    """params/macs plans with every rank allowed (the default) against ranks in multiples of 8."""
    for name in models:
        for target in ("params=0.25", "macs=0.33"):
            for multiple in (1, 8):
                runner.run("granularity", name, target, "auto", 32, [1, 32], ("eager", "ort"),
                           extra={"rank_multiple": multiple})


def imagenet(runner: Runner, models: list[str]) -> None:
    for name in models:
        # MobileNetV2 (already a mobile design: only mild targets keep it usable) and the ResNets
        targets = ("latency=0.9", "latency=0.8", "latency=0.7") if name == "mobilenet_v2" else \
            ("macs=0.5", "latency=0.7", "latency=0.5", "latency=0.35")
        for target in targets:
            runner.run("imagenet", name, target, "auto", 16, [1, 16], ("eager", "ort"))


def pareto(runner: Runner, models: list[str]) -> None:
    for name in models:
        for method in PARETO_METHODS:
            for target in PARETO_TARGETS:
                runner.run("pareto", name, target, method, 32, [32], ("eager",))


# ----------------------------------------------------------------------------------------------------------
# report


def _ratio(times: dict, engine: str, batch: str, of: str = "compressed", to: str = "original") -> float | None:
    t = times.get(engine, {}).get(batch)
    return None if t is None else t[of] / t[to]


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _acc(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def plots(rows: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    for name in sorted({r["model"] for r in rows if r["section"] in ("pareto", "cifar")}):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for method in PARETO_METHODS:  # the cifar section's default runs planned at batch 32 join the default line
            points = sorted((_ratio(r["times"], "eager", "32"), 100 * r["accuracy"]) for r in rows
                            if r["model"] == name and r["method"] == method and r.get("plan_batch") == 32
                            and (r["section"] == "pareto" or (r["section"] == "cifar" and method == "auto")))
            if points:
                label = "datd default (auto)" if method == "auto" else method
                ax.plot(*zip(*points), marker="o", label=label, linewidth=2.5 if method == "auto" else 1.2)
        base = next((r["accuracy_before"] for r in rows if r["model"] == name), None)
        if base is not None:
            ax.scatter([1.0], [100 * base], color="black", zorder=5, label="original")
        ax.set_xlabel("measured latency / original's (torch eager, batch 32, 2 threads)")
        ax.set_ylabel("top-1 (%), no fine-tuning")
        ax.set_title(f"{name}: accuracy against measured latency")
        ax.grid(alpha=0.3)
        ax.legend()
        path = RESULTS / f"latency_pareto_{name}.png"
        with datd.io.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        figures.append(path.name)
    return figures


def markdown(rows: list[dict], figures: list[str]) -> str:
    results = [r for r in rows if r["section"] in ("cifar", "imagenet", "pareto", "granularity")]
    if not results:
        return "## Latency (`benchmarks/latency.py`)\n\nNo results yet.\n"
    lines = [
        "## Latency: measured speed of compressed models (`benchmarks/latency.py`)",
        "",
        "Medians of interleaved repeats in one process, CPU, 2 threads. *ratio* = compressed time / original time "
        "(lower is faster); the original is timed in its own inference form (BatchNorms folded, same memory format), so "
        "folding and layout are never counted as compression; *vs as given* compares with the original model as loaded "
        "(plain eager). Torch eager runs with `datd.tune_allocator()`; the *default malloc* column repeats batch 32 (CIFAR) in a "
        "fresh process with glibc's default allocator. Targets are planned at batch 32 (CIFAR) or 16 (ImageNet models). "
        "No fine-tuning anywhere; top-1 on the full CIFAR-10 test set, or on the held-out half of the ImageNet sample.",
        "",
    ]
    titles = {"cifar": "CIFAR-10 ResNets", "imagenet": "ImageNet architectures at 224×224",
              "granularity": "Rank granularity of params/macs plans (`--sections granularity`): every rank (the "
                             "default) against multiples of 8"}
    for section, batches in (("cifar", ["1", "32", "128"]), ("imagenet", ["1", "16"]), ("granularity", ["1", "32"])):
        chosen = [r for r in results if r["section"] == section]
        if section == "granularity":  # one row per plan granularity: the latest (rows run with rank_multiple=0
            # come from when the automatic granularity of params/macs plans was 8; the plan's own is recorded)
            latest = {(r["model"], r["target"], r.get("rank_multiple")): r for r in sorted(chosen, key=lambda r: r["date"])}
            chosen = [r for r in chosen if latest[r["model"], r["target"], r.get("rank_multiple")] is r]
        if not chosen:
            continue
        head = ["model", "target (plan batch)", "top-1", "params", "MACs"]
        head += [f"eager b{b}" for b in batches] + [f"ORT b{b}" for b in batches]
        head += ["vs as given b" + batches[-1]]
        if section == "cifar":
            head += ["default malloc b32"]
        head += ["compress s"]
        lines += [f"### {titles[section]}", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in chosen:
            top1 = f"{_acc(r['accuracy_before'])} → {_acc(r['accuracy'])}" if r["accuracy"] is not None else "—"
            plan = f"{r['target']} ({r['plan_batch']})"
            if section == "granularity":
                multiple = r.get("rank_multiple") or 1
                plan = f"{r['target']}, {'every rank' if multiple == 1 else f'multiples of {multiple}'}"
            cells = [r["model"], plan, top1, _fmt(r["params_ratio"]), _fmt(r["macs_ratio"])]
            cells += [_fmt(_ratio(r["times"], "eager", b)) for b in batches]
            mark = "*" if r.get("date", "") < SPINNING_FIXED else ""
            cells += [_fmt(_ratio(r["times"], "ort", b)) + mark for b in batches]
            cells += [_fmt(_ratio(r["times"], "eager", batches[-1], to="original_as_given"))]
            if section == "cifar":
                cells += [_fmt(_ratio(r["times"], "eager_default_malloc", "32"))]
            cells += [f"{r['compress_seconds']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Absolute times of the originals (ms per batch): " + "; ".join(
            f"{name} b{b}: eager {1e3 * t['eager'][b]['original']:.1f} (as given {1e3 * t['eager'][b]['original_as_given']:.1f})"
            + (f", ORT {1e3 * t['ort'][b]['original']:.1f}" if "ort" in t else "")
            for name, t in {r["model"]: r["times"] for r in chosen}.items() for b in batches) + ".", ""]
        if any(r.get("date", "") < SPINNING_FIXED for r in chosen):
            lines += ["\\* measured before ONNX Runtime sessions stopped spinning between runs (2026-11-30): the session "
                      "timed beside a spinning one loses cores, so these ORT ratios are unreliable (ResNet-20's original "
                      "at b32 took 19.2 ms then, 8.2 ms since); rerun the section to refresh them.", ""]
    pareto_rows = [r for r in results if r["section"] == "pareto"]
    if pareto_rows:
        lines += ["### Accuracy against measured latency (batch 32, torch eager)", "",
                  "| model | method | " + " | ".join(PARETO_TARGETS) + " |", "|---|---|" + "---|" * len(PARETO_TARGETS)]
        for name in sorted({r["model"] for r in pareto_rows}):
            for method in PARETO_METHODS:
                cells = []
                for target in PARETO_TARGETS:
                    r = next((r for r in pareto_rows if (r["model"], r["method"], r["target"]) == (name, method, target)), None)
                    cells.append("" if r is None else f"{_acc(r['accuracy'])} ({_fmt(_ratio(r['times'], 'eager', '32'))})")
                lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
        lines += ["", "Cells: top-1 (measured latency ratio).", ""]
        lines += [f"![{f}](benchmarks/results/{f})" for f in figures] + [""]
    # every run whose rows are shown: machine, versions, commit and command (the latest date of each)
    runs: dict[tuple, dict] = {}
    for r in results:
        key = (r["machine"], r["commit"], r["command"])
        if key not in runs or r["date"] > runs[key]["date"]:
            runs[key] = r
    lines += sorted(env_lines(r) for r in runs.values())
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--fresh-timing":
        fresh_timing(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="cifar,pareto,imagenet")
    parser.add_argument("--models", default=None, help="comma-separated models (default: each section's)")
    parser.add_argument("--redo", default="", help="comma-separated sections (or section:model) to recompute")
    parser.add_argument("--report-only", action="store_true", help="regenerate BENCHMARKS.md and plots from the results")
    args = parser.parse_args()
    torch.manual_seed(0)
    env = environment()
    runner = Runner(env, tuple(filter(None, args.redo.split(","))))
    sections = args.sections.split(",")
    chosen = args.models.split(",") if args.models else None
    if not args.report_only:
        if "cifar" in sections:
            cifar(runner, chosen or ["cifar_resnet20", "cifar_resnet56"])
        if "pareto" in sections:
            pareto(runner, chosen or ["cifar_resnet20", "cifar_resnet56"])
        if "imagenet" in sections:
            imagenet(runner, chosen or list(IMAGENET_MODELS))
        if "granularity" in sections:
            granularity(runner, chosen or ["cifar_resnet20", "cifar_resnet56"])
    update_section(NAME, markdown(runner.rows, plots(runner.rows)))


if __name__ == "__main__":
    main()
