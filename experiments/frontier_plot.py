"""The frontier plot of `experiments.frontier`: test perplexity against pruning cost, one panel per held-out text
and (model, prune ratio); Pareto points joined and numbered (see experiments/frontier.py for the table)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from experiments.records import ReportedRun, choice, num
from experiments.report_plots import pyplot

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def dense_reference(records: list[ReportedRun], ppl: list[str]) -> dict[tuple[str, str], float]:
    """(model, ppl column) -> dense perplexity, from the newest record of the model."""
    out = {}
    for rec in sorted(records, key=lambda r: r.finish_time):
        for col in ppl:
            value = num(rec.results["headline"]["dense"].get(col))
            if not math.isnan(value):
                out[(choice(rec, "model"), col)] = value
    return out


Y_RANGE = 30.0  # the y axis shows up to this many times the best mean perplexity of the panel; above: off scale


def plot_frontier(table: pd.DataFrame, ppl: list[str], cost_col: str, x_label: str, path: Path,
                  label: Callable[[Any], str], dense: dict[tuple[str, str], float] | None = None) -> Path:
    """Test perplexity against pruning cost (`cost_col` of `table`), one panel per (model, ratio) x ppl column;
    `label(row)` names a Pareto point in the key under its panel. See experiments/frontier.py's docstring.

    Rows worse than Y_RANGE x the panel's best mean are drawn as triangles on the top edge (their values are in
    results.md), so one collapsed model (random pruning) does not squash the competitive range. Pareto points are
    numbered; the key under each panel names them."""
    from matplotlib.lines import Line2D

    plt, dense = pyplot(), dense or {}
    groups = sorted(table.groupby(["model", "prune_ratio"]).groups)
    metrics = sorted(table["metric"].unique())
    comps = sorted(table["compensation"].unique(), key=lambda c: (c != "none", c != "projection", c))
    if len(metrics) <= 10:
        palette = [plt.get_cmap("tab10")(i) for i in range(10)]
    else:  # the 10 saturated colours of tab20 first, its light shades only beyond 10 metrics
        palette = [plt.get_cmap("tab20")(i) for i in list(range(0, 20, 2)) + list(range(1, 20, 2))]
    color = {m: palette[i % len(palette)] for i, m in enumerate(metrics)}
    marker = {c: MARKERS[i % len(MARKERS)] for i, c in enumerate(comps)}
    longest = max((int(table[f"{c} pareto"].sum()) for c in ppl), default=0)
    fig, axes = plt.subplots(len(groups), len(ppl), squeeze=False,
                             figsize=(7.5 * len(ppl), (5.0 + 0.16 * longest) * len(groups)))
    zero_drawn = clipped = False
    for row_axes, (model, ratio) in zip(axes, groups):
        g = table[(table["model"] == model) & (table["prune_ratio"] == ratio) & table[cost_col].notna()].copy()
        positive = g.loc[g[cost_col] > 0, cost_col]
        floor = positive.min() / 3 if len(positive) else 1.0  # a log axis has no 0: free methods drawn here
        g["_x"] = g[cost_col].where(g[cost_col] > 0, floor)
        zero_drawn |= bool((g[cost_col] <= 0).any())
        for ax, col in zip(row_axes, ppl):
            d = g[g[col].notna()]
            if d.empty:
                ax.set_title(f"{col} | {model}, prune ratio {ratio:g}: no data", fontsize=10)
                continue
            ref = dense.get((model, col))
            top = Y_RANGE * d[col].min()
            y = d[col].clip(upper=top).to_numpy()
            off = (d[col] > top).to_numpy()
            sd = d[f"{col} sd"].fillna(0.0).to_numpy()
            for (metric, comp), m in d.groupby(["metric", "compensation"]):
                m = m.sort_values("_x")
                if len(m) > 1:  # the same method at its budgets, faintly joined
                    ax.plot(m["_x"], m[col].clip(upper=top), color=color[metric], alpha=0.25, lw=1,
                            ls="-" if comp == "none" else "--")
            for i, (_, r) in enumerate(d.iterrows()):
                if off[i]:
                    ax.plot([r["_x"]], [top], marker=6, color=color[r["metric"]], ms=8, mec="black", mew=0.4,
                            ls="", zorder=3, clip_on=False)
                    clipped = True
                    continue
                low = min(sd[i], 0.95 * y[i])  # keep the bar above 0 on a log axis
                ax.errorbar([r["_x"]], [y[i]], yerr=[[low], [min(sd[i], top - y[i])]], fmt=marker[r["compensation"]],
                            color=color[r["metric"]], ms=6, capsize=2, lw=1, mec="black", mew=0.4, zorder=3)
            front = d.assign(_y=y)[d[f"{col} pareto"]].sort_values(["_x", "_y"])
            key = []
            if len(front):
                ax.plot(front["_x"], front["_y"], color="black", lw=1.4, drawstyle="steps-post", zorder=4)
                spots: dict[tuple[float, float], list[str]] = defaultdict(list)  # identical points: one number
                for _, r in front.iterrows():
                    spots[(r["_x"], r["_y"])].append(label(r))
                for k, ((x, yy), names) in enumerate(spots.items(), start=1):
                    ax.annotate(str(k), (x, yy), xytext=(4, 4), textcoords="offset points", fontsize=8,
                                fontweight="bold", zorder=5)
                    key += [f"{k}: {n}" for n in names]
            if ref is not None:
                ax.axhline(ref, color="grey", ls=":", lw=1)
            ax.set_xscale("log")
            low_end = min(float(np.min(y - np.minimum(sd, 0.95 * y))), ref if ref else math.inf)
            if top / low_end > 10:  # perplexities can span orders of magnitude
                ax.set_yscale("log")
            ax.set_ylim(top=top * (1.15 if ax.get_yscale() == "log" else 1.03))
            ax.set_xlabel(x_label + ", log scale")
            ax.set_ylabel(f"test perplexity {col}" + (", log scale" if ax.get_yscale() == "log" else ""))
            ax.set_title(f"{col} | {model}, prune ratio {ratio:g}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
            if key:
                ax.text(0.0, -0.13, "Pareto front:\n" + "\n".join(key), transform=ax.transAxes, va="top",
                        fontsize=7, family="monospace")
    handles = [Line2D([], [], color=color[m], marker="o", ls="", label=m) for m in metrics]
    handles += [Line2D([], [], color="black", mfc="white", marker=marker[c], ls="", label=f"compensation: {c}")
                for c in comps]
    handles += [Line2D([], [], color="black", lw=1.4, label="Pareto front (best affordable)"),
                Line2D([], [], color="grey", ls=":", label="dense model")]
    if clipped:
        handles.append(Line2D([], [], color="grey", marker=6, ms=8, mec="black", mew=0.4, ls="",
                              label=f"> {Y_RANGE:g}x best: off scale"))
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
               title="metric / compensation")
    fig.tight_layout()
    note = ("Error bars: sd over calibration seeds. Faint lines join one method's calibration budgets (dashed: "
            "compensated). Pareto front: no other point is both cheaper and better; labels: metric + compensation "
            "@ calibration windows x tokens per window.")
    if zero_drawn:
        note += " Cost 0 (free) is drawn at the left edge."
    fig.text(1.0, 0.0, note, fontsize=7, va="bottom", ha="left", wrap=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


