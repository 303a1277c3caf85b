"""Shared benchmark plumbing: the environment of a run, result files, BENCHMARKS.md sections."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from datd.decompose import DEFAULT_SIGMA_REG
from datd.decompose._linalg import prepare_sigma, relative_error
from datd.io import write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def environment() -> dict:
    """Machine, library versions, git commit and the command of this run."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "tensorly", "tltorch", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "unknown", False
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
                   f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
        "versions": versions,
        "commit": commit + ("+uncommitted" if dirty else ""),
        "command": " ".join(["python"] + [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
    }


def sigma_error(weight: torch.Tensor, approx: torch.Tensor, sigma: torch.Tensor | None) -> float:
    """‖(W − W̃)Σ^{1/2}‖/‖WΣ^{1/2}‖ for weights of any shape (T, …) with Σ (D, D) regularized as the fits do it;
    ``sigma=None``: the Frobenius error."""
    w1 = weight.double().reshape(weight.shape[0], -1)
    return relative_error(w1, approx.double().reshape(w1.shape), prepare_sigma(sigma, w1.shape[1], DEFAULT_SIGMA_REG))


def write_results(name: str, rows: list[dict]) -> Path:
    """One JSON object per line in benchmarks/results/<name>.jsonl (replacing the previous run's file)."""
    path = RESULTS / f"{name}.jsonl"
    write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return path


def read_results(name: str) -> list[dict]:
    path = RESULTS / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def update_section(name: str, markdown: str) -> None:
    """Replace the section between <!-- name:start --> and <!-- name:end --> of BENCHMARKS.md (appended if absent)."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.is_file() else "# Benchmarks\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    write_text(BENCHMARKS_MD, text)


def env_lines(env: dict) -> str:
    return (f"Machine: {env['machine']}. Versions: "
            + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
            + f". Commit {env['commit']}, {env['date']}. Command: `{env['command']}`.")
