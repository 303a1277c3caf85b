"""Statistics stream with flat memory: peak RSS after 10 % and after 100 % of a long statistics run.

`collect_stats` keeps float64 sums of x xᵀ per layer and one bounded chunk of patch products; the images
stream through the DataLoader. So the peak resident memory after the first 10 % of the batches (model, data
loader, the sums, the forward pass and one chunk are all there by then) must hold to the end: the issue asks
that the two agree within 10 %.

    python benchmarks/memory.py                       # both cases on the default device
    python benchmarks/memory.py --case cifar50k       # all 50,000 CIFAR-10 training images, ResNet-20
    python benchmarks/memory.py --case imagenet10k    # 10,000 images at 224×224 (Tiny-ImageNet upscaled), ResNet-18
    python benchmarks/memory.py --report-only

Each case runs in a fresh process (peak RSS is per process). Results: benchmarks/results/memory.jsonl and the
"memory" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import env_lines, environment, read_results, update_section, write_results

NAME = "memory"
CASES = {
    "cifar50k": dict(model="cifar_resnet20", weights=None, data="cifar10:train", images=50_000, size=None, batch=256,
                     what="CIFAR ResNet-20, all 50,000 CIFAR-10 training images (32×32)"),
    "imagenet10k": dict(model="resnet18", weights="none", data="tinyimagenet32", images=10_000, size=224, batch=64,
                        what="torchvision ResNet-18, 10,000 Tiny-ImageNet validation images upscaled to 224×224"),
}


def _status(field: str) -> int:
    """A VmRSS/VmHWM line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_case(name: str, device: str, images: int | None = None) -> dict:
    """One case in this process: stream the statistics, reading the peak RSS as the batch after 10 % of them
    is requested, and at the end."""
    from datd.data import calibration_loader
    from datd.models import load_model
    from datd.stats import collect_stats

    case = CASES[name]
    loaded = load_model(case["model"], case["weights"])
    if case["size"]:
        loaded.preprocessing = type(loaded.preprocessing)(mean=loaded.preprocessing.mean, std=loaded.preprocessing.std,
                                                          size=case["size"], resize=case["size"])
    loader = calibration_loader(case["data"], loaded.preprocessing, images or case["images"], batch_size=case["batch"])
    model = loaded.model.to(device)
    marks: dict[str, dict] = {}
    tenth = min(math.ceil(0.1 * len(loader)), len(loader) - 1)

    def read(label: str) -> None:
        marks[label] = {"rss_peak": _status("VmHWM"), "rss_now": _status("VmRSS"), "seconds": time.perf_counter() - start}
        if device.startswith("cuda"):
            marks[label]["gpu_peak"] = torch.cuda.max_memory_allocated()

    def metered():
        for i, batch in enumerate(loader):
            if i == tenth:
                read("10%")
            yield batch

    start = time.perf_counter()
    stats = collect_stats(model, metered(), device=device, progress=False)
    read("100%")
    sums = sum(s.sigma.numel() * 8 * (3 if s.sigma_pooled is not None else 2) for s in stats.values())
    return {
        "case": name, "what": case["what"], "model": case["model"], "images": stats.num_images,
        "batch": case["batch"], "device": device, "layers": len(stats), "sigma_bytes": sums,
        "rss_peak_10": marks["10%"]["rss_peak"], "rss_peak_100": marks["100%"]["rss_peak"],
        "rss_ratio": marks["100%"]["rss_peak"] / marks["10%"]["rss_peak"],
        "gpu_peak_10": marks["10%"].get("gpu_peak"), "gpu_peak_100": marks["100%"].get("gpu_peak"),
        "seconds": marks["100%"]["seconds"], "threads": torch.get_num_threads(),
    }


def report(rows: list[dict], env: dict) -> str:
    lines = ["## Memory: statistics stream with flat memory (`benchmarks/memory.py`)", "",
             "Peak resident memory (VmHWM) of the statistics process after the first 10 % of the batches and at the "
             "end; the goal is a ratio ≤ 1.10. Σ sums: the float64 sums of x xᵀ kept for every Conv2d/Linear "
             "(all images and the even-image fold, and the per-image pooled part where a layer sees several "
             "positions). On CUDA the sums live in GPU memory (torch.cuda.max_memory_allocated: the GPU peak column). Each "
             "case is measured in a fresh process.", "",
             "| case | device | images | layers | Σ sums | peak RSS @10 % | peak RSS @100 % | ratio | GPU peak @10 % → 100 % | time |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    gib = 1024 ** 3
    for r in rows:
        gpu = (f"{r['gpu_peak_10'] / gib:.2f} → {r['gpu_peak_100'] / gib:.2f} GiB" if r.get("gpu_peak_10") else "—")
        lines.append(f"| {r['what']} | {r['device']} | {r['images']:,} | {r['layers']} | {r['sigma_bytes'] / gib:.2f} GiB "
                     f"| {r['rss_peak_10'] / gib:.2f} GiB | {r['rss_peak_100'] / gib:.2f} GiB | {r['rss_ratio']:.3f} "
                     f"| {gpu} | {r['seconds']:.0f} s |")
    envs = {json.dumps(r.get("environment"), sort_keys=True) for r in rows if r.get("environment")}
    lines += [""] + [env_lines(json.loads(e)) for e in sorted(envs)] if envs else ["", env_lines(env)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, help="fewer images than the case's (a quick look; not for the table)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case in this process, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one, args.device, args.images)))
        return
    env = environment()
    rows = {r["case"]: r for r in read_results(NAME)}
    if not args.report_only:
        for name in args.case or sorted(CASES):
            command = [sys.executable, __file__, "--one", name, "--device", args.device]
            out = subprocess.run(command + (["--images", str(args.images)] if args.images else []), check=True,
                                 stdout=subprocess.PIPE, text=True).stdout
            rows[name] = {**json.loads(out.strip().splitlines()[-1]), "environment": env}
            print(f"{name}: peak RSS {rows[name]['rss_peak_10'] / 2**30:.2f} GiB at 10 %, "
                  f"{rows[name]['rss_peak_100'] / 2**30:.2f} GiB at 100 % ({rows[name]['rss_ratio']:.3f}), "
                  f"{rows[name]['seconds']:.0f} s", flush=True)
        write_results(NAME, [rows[k] for k in sorted(rows)])
    update_section(NAME, report([rows[k] for k in sorted(rows)], env))


if __name__ == "__main__":
    main()
