"""The plots of `experiments.report`: per-layer importance heatmaps, perplexity vs prune ratio, pruning time."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.records import ReportedRun, num, ratio_of, row_key

DENSE = "dense"  # the metric label of the dense reference row


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def method(metric: str, compensation: str) -> str:
    return f"{metric} + {compensation}"


def plot_importance(records: list[ReportedRun], out_dir: Path) -> list[Path]:
    """Heatmap per model: one row per metric (first scoring pass, min-max normalised per row), removed layers x'd.

    The removed layers shown are those of the metric's largest-ratio run (newest on ties).
    """
    plt = pyplot()
    chosen: dict[str, dict[str, ReportedRun]] = defaultdict(dict)
    for rec in sorted(records, key=lambda r: (ratio_of(r), r.finish_time)):  # later entries win
        if (rec.selection or {}).get("decisions"):
            chosen[row_key(rec)[0]][rec.labels["metric"]] = rec
    paths = []
    for model, by_metric in sorted(chosen.items()):
        metrics = sorted(by_metric)
        rows = [np.array([num(s) for s in by_metric[m].selection["decisions"][0]["scores"]]) for m in metrics]
        matrix = np.full((len(rows), max(len(r) for r in rows)), np.nan)
        for i, s in enumerate(rows):
            lo, hi = np.nanmin(s), np.nanmax(s)  # layers without a score (None) stay NaN: grey
            matrix[i, :len(s)] = (s - lo) / (hi - lo) if hi > lo else 0.5
        fig, ax = plt.subplots(figsize=(max(8.0, 0.28 * matrix.shape[1] + 4), 0.45 * len(rows) + 2.2))
        cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
        image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap=cmap, vmin=0, vmax=1,
                          interpolation="nearest")
        for i, m in enumerate(metrics):
            removed = by_metric[m].removed_layers or []
            ax.scatter(removed, [i] * len(removed), marker="x", color="red", s=36,
                       label="removed layer" if i == 0 else None)
        ax.set_yticks(range(len(metrics)), [f"{m} (ratio {ratio_of(by_metric[m]):g})" for m in metrics])
        ax.set_xticks(range(matrix.shape[1]))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("layer index (grey: no score)")
        ax.set_title(f"{model}: per-layer importance\n(first scoring pass, min-max normalised per metric)")
        fig.colorbar(image, ax=ax, label="importance (1 = highest)")
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.18), fontsize=8, frameon=False)
        fig.tight_layout()
        name = "importance_heatmap.png" if len(chosen) == 1 else f"importance_heatmap_{safe_name(model)}.png"
        fig.savefig(out_dir / name, dpi=130, bbox_inches="tight")
        plt.close(fig)
        paths.append(out_dir / name)
    return paths


def safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def plot_ppl_vs_ratio(table: pd.DataFrame, out_dir: Path) -> Path | None:
    """First perplexity column against the prune ratio: one panel per (model, compensation), one line per metric,
    each metric the same colour in every panel, so a sweep of many methods stays readable."""
    ppl = [c for c in table.columns if c.startswith("ppl@")]
    if not ppl:
        return None
    plt, col = pyplot(), ppl[0]
    pruned = table[table["metric"] != DENSE]
    models = sorted(table["model"].unique())
    comps = sorted(pruned["compensation"].unique(), key=lambda c: (c != "none", c))  # uncompensated first
    metrics = sorted(pruned["metric"].unique())
    cmap = plt.get_cmap("tab10" if len(metrics) <= 10 else "tab20")
    color = {m: cmap(i % cmap.N) for i, m in enumerate(metrics)}
    fig, axes = plt.subplots(len(models), max(len(comps), 1), figsize=(4.2 * max(len(comps), 1), 3.6 * len(models)),
                             squeeze=False, sharey="row")
    for row, model in zip(axes, models):
        mine = table[table["model"] == model]
        values = mine[col].dropna()
        log = len(values) > 0 and values.min() > 0 and values.max() / values.min() > 10
        dense = mine.loc[mine["metric"] == DENSE, col]
        for ax, comp in zip(row, comps):
            for metric, g in mine[(mine["metric"] != DENSE) & (mine["compensation"] == comp)].groupby("metric"):
                g = g.sort_values("prune_ratio")
                ax.plot(g["prune_ratio"], g[col], marker="o", color=color[metric], label=metric)
            if len(dense) and not math.isnan(dense.iloc[0]):
                ax.axhline(dense.iloc[0], ls="--", color="black", label="dense")
            if log:  # pruned perplexities can span orders of magnitude
                ax.set_yscale("log")
            ax.set_title(f"{model} | compensation={comp}", fontsize=9)
            ax.set_xlabel("prune ratio")
            ax.grid(alpha=0.3)
        row[0].set_ylabel(f"perplexity ({col}{', log scale' if log else ''})")
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               title="metric")
    fig.tight_layout()
    path = out_dir / "ppl_vs_ratio.png"
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_pruning_time(table: pd.DataFrame, out_dir: Path) -> Path:
    """Horizontal bars of pruning time per method, grouped (and coloured) by ratio, one panel per model."""
    plt = pyplot()
    pruned = table[table["metric"] != DENSE]
    models = sorted(pruned["model"].unique())
    sizes = [len(pruned[pruned["model"] == m]) + pruned.loc[pruned["model"] == m, "prune_ratio"].nunique()
             for m in models]
    fig, axes = plt.subplots(len(models), 1, figsize=(9, 0.32 * sum(sizes) + 1.6 * len(models)), squeeze=False,
                             gridspec_kw={"height_ratios": sizes})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, model in zip(axes[:, 0], models):
        y, ticks, labels = 0, [], []
        for k, (prune_ratio, g) in enumerate(pruned[pruned["model"] == model].groupby("prune_ratio")):
            ys = np.arange(y, y + len(g))
            ax.barh(ys, g["pruning_seconds"], color=colors[k % len(colors)], label=f"ratio {prune_ratio:g}")
            for yy, v in zip(ys, g["pruning_seconds"]):
                if not math.isnan(v):
                    ax.text(v, yy, f" {v:.1f}s", va="center", fontsize=7)
            ticks += list(ys)
            labels += [method(m, c) for m, c in zip(g["metric"], g["compensation"])]
            y += len(g) + 1  # a blank slot between ratio groups
        ax.set_yticks(ticks, labels, fontsize=8)
        ax.invert_yaxis()
        ax.margins(x=0.12)  # room for the value labels
        ax.set_xlabel("pruning time (s): scoring + prune + compensate")
        ax.set_title(f"{model}: pruning time per method")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "pruning_time.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
