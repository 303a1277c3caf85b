"""Time and Σ-error of datd's Tucker-2 and CP (Σ and Frobenius) next to TensorLy's partial_tucker/parafac, and
datd's Σ-ALS against the textbook form of the algorithm (``_textbook.py``) at equal Σ-error.

Conv weights and their input statistics Σ:
- 64×64×3×3: the shipped CIFAR-10 ResNet-56 (trained weights, Σ from 2048 CIFAR-10 training images);
- 128, 256, 512 ×3×3: torchvision ResNet-18 (no pretrained weights offline: random-init weights, Σ of
  the 1,000 real ImageNet sample images flowing through it; a realistic Σ, not a trained weight).
Every method gets the same sweep budget (``--iters``) with its stopping tolerance disabled, the ranks that
keep about ``--fraction`` of the layer's parameters, and all errors are measured in the same Σ-norm.

The textbook comparison (``--sections textbook``) runs the textbook ALS for ``--textbook-sweeps`` sweeps and times
datd's fit (library defaults, fresh start) to the first sweep whose Σ-error is within 0.1 % of the textbook's.

    python benchmarks/decompose.py [--quick] [--iters 25] [--fraction 0.25] [--sections tensorly,textbook]
"""

from __future__ import annotations

import argparse
import math
import time

import tensorly
import torch
from tensorly.decomposition import parafac, partial_tucker

import _textbook
from _common import env_lines, environment, sigma_error, update_section, write_results
from datd.data import calibration_loader
from datd.decompose import cp, tucker2
from datd.models import load_model
from datd.stats import collect_stats

tensorly.set_backend("pytorch")
IMAGENET = "imagefolder:../shared/data/imagenet-sample/val"
LAYERS = {64: ("cifar_resnet56", "layer3.4.conv1"), 128: ("resnet18", "layer2.1.conv1"),
          256: ("resnet18", "layer3.1.conv1"), 512: ("resnet18", "layer4.1.conv1")}


def layer_problems(channels: list[int], images: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for model_name in sorted({LAYERS[c][0] for c in channels}):
        wanted = {c: LAYERS[c][1] for c in channels if LAYERS[c][0] == model_name}
        loaded = load_model(model_name, None if model_name.startswith("cifar") else "none")
        data = "cifar10" if model_name.startswith("cifar") else IMAGENET
        n = 2048 if model_name.startswith("cifar") else images
        stats = collect_stats(loaded.model, calibration_loader(data, loaded.preprocessing, n, batch_size=32),
                              list(wanted.values()), progress=False)
        for c, name in wanted.items():
            out[c] = (loaded.model.get_submodule(name).weight.detach(), stats[name].sigma)
    return out


def ranks_for(channels: int, fraction: float) -> tuple[tuple[int, int], int]:
    """Tucker-2 (R, R) and CP R keeping ≈ ``fraction`` of a C×C×3×3 conv's parameters."""
    budget = fraction * 9 * channels**2
    r_tucker = int((-2 * channels + math.sqrt(4 * channels**2 + 36 * budget)) / 18)
    return (r_tucker, r_tucker), int(budget / (2 * channels + 6))


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def run(channels: list[int], iters: int, fraction: float, images: int) -> list[dict]:
    rows = []
    for c, (weight, sigma) in layer_problems(channels, images).items():
        (r_t, r_s), r_cp = ranks_for(c, fraction)
        w64 = weight.double()

        def tl_tucker():
            (core, factors), _ = partial_tucker(w64, rank=[r_t, r_s], modes=[0, 1], n_iter_max=iters, tol=0, init="svd")
            return torch.einsum("abij,ta,sb->tsij", core, factors[0], factors[1])

        def tl_cp():
            cpt = parafac(w64, rank=r_cp, n_iter_max=iters, tol=0, init="svd", random_state=0)
            return tensorly.cp_to_tensor(cpt)

        runs = {
            ("tucker2", "datd Σ"): lambda: tucker2(weight, sigma, (r_t, r_s), max_iter=iters, tol=0).reconstruct(),
            ("tucker2", "datd Frobenius"): lambda: tucker2(weight, None, (r_t, r_s), max_iter=iters, tol=0).reconstruct(),
            ("tucker2", "TensorLy partial_tucker"): tl_tucker,
            ("cp", "datd Σ"): lambda: cp(weight, sigma, r_cp, max_iter=iters, tol=0).reconstruct(),
            ("cp", "datd Frobenius"): lambda: cp(weight, None, r_cp, max_iter=iters, tol=0).reconstruct(),
            ("cp", "TensorLy parafac"): tl_cp,
        }
        for (method, impl), fn in runs.items():
            approx, seconds = timed(fn)
            rows.append({
                "shape": [c, c, 3, 3], "method": method, "implementation": impl,
                "ranks": [r_t, r_s] if method == "tucker2" else [r_cp], "iterations": iters, "seconds": seconds,
                "sigma_error": sigma_error(weight, approx, sigma),
                "frobenius_error": sigma_error(weight, approx, None),
                "source": f"{LAYERS[c][0]}:{LAYERS[c][1]}",
            })
            print(f"{c:4d} {method:8s} {impl:24s} {seconds:8.2f}s  Σ-err {rows[-1]['sigma_error']:.4f}  "
                  f"F-err {rows[-1]['frobenius_error']:.4f}", flush=True)
    return rows


TEXTBOOK_MARGIN = 1e-3  # datd's fit counts as equal once its Σ-error is within 0.1 % of the textbook's


def run_textbook(problems: dict[int, tuple[torch.Tensor, torch.Tensor]], fraction: float, sweeps: int) -> list[dict]:
    """Each method: the textbook ALS for ``sweeps`` sweeps, then datd's fit timed to the first sweep at that error."""
    rows = []
    for c, (weight, sigma) in problems.items():
        (r_t, r_s), r_cp = ranks_for(c, fraction)
        methods = {
            "tucker2": (lambda: _textbook.tucker2(weight, sigma, (r_t, r_s), sweeps), [r_t, r_s],
                        lambda n: tucker2(weight, sigma, (r_t, r_s), max_iter=n, tol=0)),
            "cp": (lambda: _textbook.cp(weight, sigma, r_cp, sweeps), [r_cp],
                   lambda n: cp(weight, sigma, r_cp, max_iter=n, tol=0)),
        }
        for method, (textbook, ranks, fit) in methods.items():
            history = textbook()
            seconds, target = history[-1]
            full = fit(100).history  # datd's errors sweep by sweep (100 sweeps at most)
            needed = next((n for n, e in enumerate(full) if e <= target * (1 + TEXTBOOK_MARGIN)), None)
            row = {"shape": [c, c, 3, 3], "method": method, "ranks": ranks, "textbook_sweeps": sweeps,
                   "textbook_seconds": seconds, "textbook_sigma_error": target,
                   "textbook_history": [list(h) for h in history], "source": f"{LAYERS[c][0]}:{LAYERS[c][1]}",
                   "minres_tol": _textbook.MINRES_TOL}
            if needed is not None:
                fitted, datd_seconds = timed(lambda: fit(needed))
                row.update(datd_sweeps=needed, datd_seconds=datd_seconds, datd_sigma_error=fitted.history[-1],
                           speedup=seconds / datd_seconds)
            rows.append(row)
            print(f"{c:4d} {method:8s} textbook {sweeps} sweeps {seconds:8.1f}s err {target:.4f}; datd "
                  + (f"{needed} sweeps {row['datd_seconds']:.2f}s err {row['datd_sigma_error']:.4f}: "
                     f"{row['speedup']:.1f}x" if needed is not None else "never reaches it in 100 sweeps"), flush=True)
    return rows


def textbook_markdown(rows: list[dict], env: dict) -> str:
    lines = [
        "## Σ-ALS: datd against the textbook algorithm at equal Σ-error (`benchmarks/decompose.py --sections textbook`)",
        "",
        "Textbook form (`benchmarks/_textbook.py`): separate least-squares updates of every factor (Tucker-2: U_T, "
        "core, U_S; CP: B, C, D, A), the input-channel factor from its full normal equations by unpreconditioned "
        f"MINRES (SciPy, rtol {rows[0]['minres_tol']:g}, from zero) with a generic einsum matrix-vector product through "
        "the whole Σ; float64. datd: the library's fits with their defaults (Tucker-2: joint closed-form (U_T, core) "
        "step, U_S by 5 warm-started CG steps with a Kronecker preconditioner; CP: the same solver for B, proximal "
        f"updates), timed from a fresh start to the first sweep whose Σ-error is within {100 * TEXTBOOK_MARGIN:g} % "
        "of the textbook's after its sweeps. Layers and Σ as in the first table (datd vs TensorLy); ranks keep ≈ "
        f"{rows[0].get('fraction', 0.25):g} of the parameters.",
        "",
        "| shape | method | ranks | textbook sweeps | textbook s | textbook Σ-error | datd sweeps | datd s | datd Σ-error "
        "| speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        datd_cells = (f"{r['datd_sweeps']} | {r['datd_seconds']:.2f} | {r['datd_sigma_error']:.4f} | "
                      f"**{r['speedup']:.1f}×**" if "speedup" in r else "— | — | — | not reached in 100 sweeps")
        lines.append(f"| {'×'.join(map(str, r['shape']))} | {r['method']} | {r['ranks']} | {r['textbook_sweeps']} | "
                     f"{r['textbook_seconds']:.1f} | {r['textbook_sigma_error']:.4f} | {datd_cells} |")
    lines += ["", env_lines(env)]
    return "\n".join(lines)


def markdown(rows: list[dict], env: dict) -> str:
    lines = [
        "## Decompositions: datd vs TensorLy on single conv layers (`benchmarks/decompose.py`)",
        "",
        "Same sweep budget for every implementation (stopping tolerance off), ranks keeping ≈ "
        f"{rows[0].get('fraction', 0.25):g} of the layer's parameters; errors are relative, ‖(W−W̃)Σ^{{1/2}}‖/‖WΣ^{{1/2}}‖ "
        "(Σ-error) and ‖W−W̃‖/‖W‖ (F-error). The 64-channel layer is a trained ResNet-56 layer with Σ from CIFAR-10; "
        "the larger ones are random-init ResNet-18 layers with Σ of real ImageNet images (no pretrained weights offline). "
        "Time ratio = this row's time / TensorLy's time for the same decomposition and shape.",
        "",
        "| shape | method | implementation | ranks | sweeps | time (s) | × TensorLy time | Σ-error | F-error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    peer = {(tuple(r["shape"]), r["method"]): r["seconds"] for r in rows if r["implementation"].startswith("TensorLy")}
    for r in rows:
        ratio = r["seconds"] / peer[(tuple(r["shape"]), r["method"])]
        lines.append(f"| {'×'.join(map(str, r['shape']))} | {r['method']} | {r['implementation']} | {r['ranks']} | "
                     f"{r['iterations']} | {r['seconds']:.2f} | {ratio:.2f} | {r['sigma_error']:.4f} | {r['frobenius_error']:.4f} |")
    lines += ["", env_lines(env)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 and 128 channels only")
    parser.add_argument("--iters", type=int, default=25)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--images", type=int, default=512, help="ImageNet sample images for the ResNet-18 Σ")
    parser.add_argument("--sections", default="tensorly,textbook")
    parser.add_argument("--textbook-channels", default="256,512")
    parser.add_argument("--textbook-sweeps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    sections = args.sections.split(",")
    env = environment()
    if "tensorly" in sections:
        channels = [64, 128] if args.quick else [64, 128, 256, 512]
        rows = run(channels, args.iters, args.fraction, args.images)
        for r in rows:
            r.update(fraction=args.fraction, **{k: env[k] for k in ("machine", "versions", "commit", "command", "date")})
        write_results("decompose", rows)
        update_section("decompose", markdown(rows, env))
    if "textbook" in sections:
        channels = [int(c) for c in args.textbook_channels.split(",")]
        rows = run_textbook(layer_problems(channels, args.images), args.fraction, args.textbook_sweeps)
        for r in rows:
            r.update(fraction=args.fraction, **{k: env[k] for k in ("machine", "versions", "commit", "command", "date")})
        write_results("decompose_textbook", rows)
        update_section("decompose_textbook", textbook_markdown(rows, env))


if __name__ == "__main__":
    main()
