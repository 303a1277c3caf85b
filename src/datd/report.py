"""Human- and machine-readable results of a compression run: report.json, report.md, plan.json, plots."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_path, write_json, write_text  # noqa: E402


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _propagation_lines(report: dict) -> list[str]:
    """With propagated fits: the images their paired statistics came from and whether residuals were compensated."""
    cfg = report["config"]
    if not cfg.get("propagate"):
        return []
    images = cfg.get("propagate_images")
    used = f"the first {images}" if images and images < report["statistics"]["num_images"] else "all"
    residual = "with" if cfg.get("propagate_residual", True) else "without"
    return [f"- propagated fits: paired statistics from {used} calibration images, {residual} residual compensation"]


def markdown(report: dict) -> str:
    """The report as a Markdown page: summary, then one table row per layer."""
    cfg = report["config"]
    lines = [
        "# datd compression report",
        "",
        f"- target: `{cfg['target']}`, method: `{cfg['method']}`, norm: `{cfg['norm']}`, ranks: `{cfg['ranks']}`, "
        f"bias correction: `{cfg['bias_correction']}`, seed: {cfg['seed']}",
        f"- statistics: {report['statistics']['num_images']} images ({report['statistics']['description'] or 'no description'})",
        *_propagation_lines(report),
        *([f"- damage weighed by: {report['sensitivity']}"] if report.get("sensitivity") else []),
        f"- top-1 accuracy: {_pct(report.get('accuracy_before'))} → {_pct(report.get('accuracy_after'))}",
        f"- parameters: {report['params_before']:,} → {report['params_after']:,} ({report['params_ratio']:.3f})",
        f"- MACs per image: {report['macs_before']:,} → {report['macs_after']:,} ({report['macs_ratio']:.3f})",
        *_latency_lines(report),
        f"- time: {report['seconds']:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in report["timings"].items()) + ")",
        *_curve_lines(report),
        "",
        "| layer | shape | method | ranks | form | params | MACs | Σ-error | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    forms = report.get("inference", {}).get("forms", {})
    for layer in report["layers"]:
        shape = "×".join(map(str, layer["shape"]))
        params = f"{layer.get('params_before', 0):,} → {layer.get('params_after', 0):,}"
        macs = f"{layer.get('macs_before', 0):,} → {layer.get('macs_after', 0):,}"
        if "skipped" in layer:
            lines.append(f"| {layer['name']} | {shape} | — | — | — | {params} | {macs} | — | {layer['skipped']} |")
        else:
            notes = [f"Σ shrunk by α = {layer['shrinkage']:g}"] if layer.get("shrinkage") else []
            if layer.get("shrinkage") and layer.get("shrinkage_batchnorm") == layer["shrinkage"]:
                notes[-1] += " (the BatchNorm check)"
            notes += ["propagated fit"] if layer.get("propagated") else []
            pruned = layer.get("pruned")
            if pruned:
                removed = pruned["removed_upstream"]
                notes.append(f"{pruned['kept']} of {pruned['channels']} input channels kept; removed with '{pruned['producer']}'"
                             f"{' and ' + ', '.join(pruned['between']) if pruned['between'] else ''}: "
                             f"{removed['params']:,} params, {removed['macs']:,} MACs")
            form = "—" if pruned else forms.get(layer['name'], 'chain')
            lines.append(f"| {layer['name']} | {shape} | {layer['method']} | {layer['ranks']} | "
                         f"{form} | {params} | {macs} | {layer['sigma_error']:.4f} | "
                         f"{'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def _curve_lines(report: dict) -> list[str]:
    """One line: the plan's predicted damage at other budgets of the same metric (what is reachable)."""
    curve = report.get("budget_curve")
    if not curve:
        return []

    def point(c: dict) -> str:
        return f"{c['target'].split('=')[1]}: " + ("unreachable" if c["damage"] is None else f"{c['damage']:.3g}")

    return [f"- predicted damage (nats per image, corrected by the probes) at other {curve[0]['target'].split('=')[0]} "
            f"budgets: " + ", ".join(point(c) for c in curve)]


def _latency_lines(report: dict) -> list[str]:
    lat = report.get("latency")
    if not lat:
        return ["- latency: not measured"]
    lines = [
        f"- latency per batch of {lat['batch']} ({lat['device']}, {lat['threads']} threads, {lat['memory_format']}, "
        f"torch {lat['torch']}; BatchNorms folded in both): {1e3 * lat['original_s']:.2f} ms → "
        f"{1e3 * lat['compressed_s']:.2f} ms ({lat['ratio']:.3f}, {lat['speedup']:.2f}× faster; "
        f"{lat['speedup_vs_as_given']:.2f}× faster than the original as given, {1e3 * lat['original_as_given_s']:.2f} ms)",
        f"- allocator: {lat['allocator']}",
    ]
    for i, r in enumerate(lat.get("rounds", []), 1):
        judged = f", KL to the original {r['kl']:.4f} nats" if "kl" in r else ""
        returned = " (returned)" if lat.get("returned_round") == i - 1 else ""
        lines.append(f"  - latency round {i}: budget {1e3 * r['budget_s']:.2f} ms, predicted {r['predicted_ratio']:.3f}, "
                     f"measured {r['ratio']:.3f}{judged}{returned}")
    return lines


def _save_figure(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_layers(report: dict, path: str | os.PathLike) -> None:
    """Per-layer kept-parameter fraction and relative Σ-error (bar charts sharing the layer axis)."""
    layers = [l for l in report["layers"] if "params_before" in l]
    names = [l["name"] for l in layers]
    kept = [l["params_after"] / l["params_before"] for l in layers]
    errors = [l.get("sigma_error", 0.0) for l in layers]
    colors = {"tucker2": "tab:blue", "cp": "tab:orange", "svd": "tab:green", "prune": "tab:purple"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.28 * len(names)), 6), sharex=True)
    top.bar(range(len(names)), kept, color=[colors.get(l.get("method"), "lightgray") for l in layers])
    top.set_ylabel("kept parameter fraction")
    top.set_title("per layer (colour = method: blue Tucker-2, orange CP, green SVD, purple pruned, grey kept)")
    bottom.bar(range(len(names)), errors, color="tab:red")
    bottom.set_ylabel("relative Σ-error")
    bottom.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    _save_figure(fig, Path(path))


def plot_accuracy(report: dict, path: str | os.PathLike) -> None:
    """Accuracy before/after as two bars, with parameter and MAC ratios in the title."""
    fig, ax = plt.subplots(figsize=(4, 3.5))
    values = [100 * report["accuracy_before"], 100 * report["accuracy_after"]]
    ax.bar(["original", "compressed"], values, color=["tab:gray", "tab:blue"])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2f}%", ha="center", va="bottom")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"params ×{report['params_ratio']:.2f}, MACs ×{report['macs_ratio']:.2f}")
    _save_figure(fig, Path(path))


def write_report(report: dict, directory: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md, plan.json and the PNG plots into ``directory``; return their paths."""
    directory = Path(directory)
    paths = {
        "json": directory / "report.json", "markdown": directory / "report.md", "plan": directory / "plan.json",
        "layers_plot": directory / "layers.png",
    }
    write_json(paths["json"], report)
    write_text(paths["markdown"], markdown(report))
    write_json(paths["plan"], report["plan"])
    plot_layers(report, paths["layers_plot"])
    if report.get("accuracy_after") is not None:
        paths["accuracy_plot"] = directory / "accuracy.png"
        plot_accuracy(report, paths["accuracy_plot"])
    return paths
