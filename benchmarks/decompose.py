"""Time and Σ-error of datd's Tucker-2 and CP (Σ and Frobenius) next to TensorLy's partial_tucker/parafac.

Conv weights and their input statistics Σ:
- 64×64×3×3: the shipped CIFAR-10 ResNet-56 (trained weights, Σ from 2048 CIFAR-10 training images);
- 128, 256, 512 ×3×3: torchvision ResNet-18 (no pretrained weights offline: random-init weights, Σ of
  the 1,000 real ImageNet sample images flowing through it; a realistic Σ, not a trained weight).
Every method gets the same sweep budget (``--iters``) with its stopping tolerance disabled, the ranks that
keep about ``--fraction`` of the layer's parameters, and all errors are measured in the same Σ-norm.

    python benchmarks/decompose.py [--quick] [--iters 25] [--fraction 0.25]
"""

from __future__ import annotations

import argparse
import math
import time

import tensorly
import torch
from tensorly.decomposition import parafac, partial_tucker

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
    args = parser.parse_args()
    torch.manual_seed(0)
    channels = [64, 128] if args.quick else [64, 128, 256, 512]
    rows = run(channels, args.iters, args.fraction, args.images)
    env = environment()
    for r in rows:
        r.update(fraction=args.fraction, **{k: env[k] for k in ("machine", "versions", "commit", "command", "date")})
    write_results("decompose", rows)
    update_section("decompose", markdown(rows, env))


if __name__ == "__main__":
    main()
