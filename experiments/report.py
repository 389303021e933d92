"""Paper-style report of finished sweeps: results table (Markdown, CSV, LaTeX), plots, optional W&B mirror.

    python -m experiments.report SWEEP_DIR [SWEEP_DIR ...] --out DIR [--baseline METHOD] [--wandb]

Every job's `record.json` (found recursively) is one run; only `status: done` runs enter the table. Rows are
(model, prune ratio, metric, compensation), plus one dense reference row per model; runs differing only in the seed
are averaged (`runs` counts them: the calibration seeds). Columns:

- `ppl@<len>/<text>`: perplexity per window length and held-out text (lower is better; the text's corpus and split
  are in its name and listed above the table), mean over seeds, with `<col> sd` the standard deviation over seeds;
- one accuracy per lm-eval task: `acc_norm` where the records have it (the usual headline for multiple-choice tasks,
  it corrects for answer length), else `acc`; mean over the runs that evaluated it, with `<col> se` its standard
  error from lm-eval (binomial, over the questions; mean over runs); `task_avg` is the mean of the tasks;
- `retained_pct`: mean over tasks of 100 * pruned / dense accuracy;
- `pruning_seconds`: `pruning_seconds_original` (scoring as originally computed, even when a later job reused a
  cached selection, + prune + compensate), so sweeps with selection caching still compare real costs;
- `train_seconds`: the part of the pruning time spent training (compensations that train, e.g. LLM-Streamline's
  layer); the column is left out when no run trained;
- `pruning_tokens`: forward + backward tokens of that original scoring + forward tokens of the compensation stage
  (tokens through trained sub-modules, `train_tokens`, are left out);
- `speedup`: time of the slowest method of the same (model, ratio), or of `--baseline`, divided by the row's time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

KEY = ["model", "prune_ratio", "metric", "compensation"]
DENSE = "dense"
SUMMARY = ["task_avg", "retained_pct", "pruning_seconds", "train_seconds", "pruning_tokens", "speedup"]
HEADERS = {"prune_ratio": "ratio", "task_avg": "task avg", "retained_pct": "retained %",
           "pruning_seconds": "pruning time (s)", "train_seconds": "of which training (s)",
           "pruning_tokens": "tokens (fwd+bwd)"}


class NoRecordsError(RuntimeError):
    """No usable record.json under the folders given."""


# ----------------------------------------------------------------------------------------------------- loading

def load_records(sweep_dirs: list[str | Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Finished records under `sweep_dirs` (newest per model/ratio/metric/compensation/seed) and notes on the rest.

    Each returned record gets `_path`, `_time` (finish time) and `_labels` (metric/compensation row labels).
    """
    dirs = [Path(d) for d in sweep_dirs]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise NoRecordsError(f"not a folder: {', '.join(missing)}")
    paths = sorted(p for d in dirs for p in d.rglob("record.json"))
    searched = ", ".join(str(d) for d in dirs)
    if not paths:
        raise NoRecordsError(f"no record.json found (searched recursively) under: {searched}")
    notes, done = [], []
    for path in paths:
        try:
            rec = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            notes.append(f"unreadable, skipped: {path} ({err})")
            continue
        if rec.get("status") != "done":
            err = rec.get("error") or {}
            why = f" ({err.get('type')}: {err.get('message')})" if err else ""
            notes.append(f"{rec.get('status', 'unknown')}, not in the table: {path}{why}")
            continue
        rec["_path"], rec["_time"] = str(path), _finish_time(rec, path)
        done.append(rec)
    if not done:
        raise NoRecordsError(f"none of the {len(paths)} record.json files under {searched} has status 'done'")
    _label_variants(done)
    newest: dict[tuple, dict[str, Any]] = {}
    for rec in sorted(done, key=lambda r: r["_time"]):  # later ones overwrite: the newest is kept
        key = (*row_key(rec), rec["config"].get("seed"))
        if key in newest:
            notes.append(f"duplicate {key}: kept the newest {rec['_path']}, dropped {newest[key]['_path']}")
        newest[key] = rec
    return list(newest.values()), notes


def _finish_time(rec: dict[str, Any], path: Path) -> float:
    for field in ("finished", "started"):
        try:
            return datetime.strptime(rec[field], "%Y-%m-%dT%H:%M:%S%z").timestamp()
        except (KeyError, TypeError, ValueError):
            pass
    return path.stat().st_mtime


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v)  # lists are unhashable
    return out


# Config keys that never make a variant: `calibration.seed` interpolates the run's `seed`, the axis the table
# averages over (labelling by it would give every seed a row of its own).
LABEL_IGNORE = ("calibration.seed",)


def label_variants(records: list[dict[str, Any]], field: str, sections: tuple[str, ...],
                   ignore: tuple[str, ...] = LABEL_IGNORE) -> list[str]:
    """Label of each record for config group `field`: its Hydra choice plus `[key=value, ...]` for the keys of the
    config `sections` whose values differ between records with the same choice (keys of `field` itself shown
    unprefixed, others as `section.key`). `ignore`: full config paths (`calibration.seed`) never shown."""
    flats = []
    for rec in records:
        flat = {}
        for s in sections:
            for k, v in _flatten(rec["config"].get(s) or {}).items():
                if f"{s}.{k}" not in ignore:
                    flat[k if s == field else f"{s}.{k}"] = v
        flats.append(flat)
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for rec, flat in zip(records, flats):
        groups[_choice(rec, field)].append(flat)
    labels = []
    for rec, flat in zip(records, flats):
        group = groups[_choice(rec, field)]
        varying = sorted(k for k in set().union(*group) if len({g.get(k) for g in group}) > 1)
        extra = ", ".join(f"{k}={flat.get(k)}" for k in varying)
        labels.append(_choice(rec, field) + (f" [{extra}]" if extra else ""))
    return labels


def _label_variants(records: list[dict[str, Any]]) -> None:
    """Label each record's metric/compensation by its Hydra choice plus the config values that set it apart from
    other records with the same choice, so distinct configurations never share a row or count as duplicates
    (e.g. the GradMAP ablation sweeps metric.reduction and calibration.num_samples under metric=gradmap)."""
    metric = label_variants(records, "metric", ("metric", "calibration"))
    compensation = label_variants(records, "compensation", ("compensation",))
    for rec, m, c in zip(records, metric, compensation):
        rec["_labels"] = {"metric": m, "compensation": c}


def _choice(rec: dict[str, Any], group: str) -> str:
    name = (rec.get("choices") or {}).get(group)
    if name is None:
        section = rec.get("config", {}).get(group)
        name = section.get("name") if isinstance(section, dict) else None
    return str(name or "?")


def _ratio(rec: dict[str, Any]) -> float:
    # num_prune overrides the ratio in the runner; then the effective ratio is what was pruned.
    ratio = rec.get("prune_ratio") if rec.get("config", {}).get("num_prune") is None else None
    return float(ratio) if ratio is not None else rec["num_prune"] / rec["num_layers"]


def row_key(rec: dict[str, Any]) -> tuple[str, float, str, str]:
    labels = rec.get("_labels") or {g: _choice(rec, g) for g in ("metric", "compensation")}
    return _choice(rec, "model"), _ratio(rec), labels["metric"], labels["compensation"]


# ------------------------------------------------------------------------------------------------------- table

def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan  # null (NaN in JSON) and missing -> NaN


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _measures(records: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Perplexity columns by window length, and one accuracy column per task (acc_norm if any record has it)."""
    keys = {k for rec in records for side in ("dense", "pruned") for k in rec["results"]["headline"][side]}
    def window_then_text(k: str) -> tuple[float, str]:  # "ppl@128/wiki_test" -> (128, "wiki_test")
        length, _, text = k[4:].partition("/")
        return (int(length) if length.isdigit() else math.inf, text)

    ppl = sorted((k for k in keys if k.startswith("ppl@")), key=window_then_text)
    tasks = sorted({k.rsplit("/", 1)[0] for k in keys if k.endswith(("/acc", "/acc_norm"))})
    return ppl, [f"{t}/acc_norm" if f"{t}/acc_norm" in keys else f"{t}/acc" for t in tasks]


def _stderr(rec: dict[str, Any], side: str, col: str) -> float:
    """lm-eval's standard error of accuracy column `<task>/<metric>` in the record's `side` results."""
    task, metric = col.rsplit("/", 1)
    return _num(((rec["results"].get(side) or {}).get("lm_eval") or {}).get(task, {}).get(f"{metric}_stderr"))


def _scores(rec: dict[str, Any], side: str, ppl: list[str], acc: list[str]) -> dict[str, float]:
    head = rec["results"]["headline"]
    values, dense = head[side], head["dense"]
    row = {c: _num(values.get(c)) for c in ppl + acc}
    row.update({f"{c} se": _stderr(rec, side, c) for c in acc})
    row["task_avg"] = _mean([row[c] for c in acc])
    row["retained_pct"] = _mean([100.0 * row[c] / _num(dense.get(c)) for c in acc if _num(dense.get(c)) > 0])
    return row


def _pruning_tokens(rec: dict[str, Any]) -> float:
    scoring = rec.get("original_scoring") or {}
    compensate = ((rec.get("timings") or {}).get("cost") or {}).get("compensate") or {}
    return (_num(scoring.get("forward_tokens", 0)) + _num(scoring.get("backward_tokens", 0))
            + _num(compensate.get("forward_tokens", 0)))


def _matches(metric: str, compensation: str, baseline: str) -> bool:
    """`--baseline` names a metric ("sleb"), a labelled variant, or a method "metric+compensation"."""
    return baseline in (metric, metric.split(" [")[0], f"{metric}+{compensation}")


def build_table(records: list[dict[str, Any]], baseline: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """One row per (model, ratio, metric, compensation) averaged over seeds, plus a dense row per model.

    Columns: KEY, runs, ppl@*, task accuracies, SUMMARY (see the module docstring); all-empty columns are dropped.
    """
    notes: list[str] = []
    ppl, acc = _measures(records)
    rows = []
    for rec in records:
        timings = rec.get("timings") or {}
        seconds = rec.get("pruning_seconds_original", timings.get("pruning_seconds"))
        rows.append({**dict(zip(KEY, row_key(rec))), "runs": 1, **_scores(rec, "pruned", ppl, acc),
                     "pruning_seconds": _num(seconds),
                     "train_seconds": _num((rec.get("compensation") or {}).get("train_seconds")),
                     "pruning_tokens": _pruning_tokens(rec)})
    pruned = pd.DataFrame(rows)
    groups = pruned.groupby(KEY)
    spread = groups[ppl].std(ddof=1).rename(columns=lambda c: f"{c} sd").reset_index()  # NaN for a single seed
    pruned = groups.agg({c: ("sum" if c == "runs" else "mean") for c in pruned.columns if c not in KEY}).reset_index()
    pruned = pruned.merge(spread, on=KEY)

    ref = pruned.groupby(["model", "prune_ratio"])["pruning_seconds"].transform("max")
    if baseline:
        is_base = pd.Series([_matches(m, c, baseline) for m, c in zip(pruned.metric, pruned.compensation)],
                            index=pruned.index)
        ref = pruned["pruning_seconds"].where(is_base).groupby([pruned.model, pruned.prune_ratio]).transform("max")
        for (model, ratio), missing in ref.isna().groupby([pruned.model, pruned.prune_ratio]):
            if missing.all():
                notes.append(f"baseline {baseline!r} not found for {model} at ratio {ratio:g}: no speedup there")
    pruned["speedup"] = ref / pruned["pruning_seconds"]

    dense_rows = []
    for model in sorted({row_key(r)[0] for r in records}):
        mine = sorted((r for r in records if row_key(r)[0] == model), key=lambda r: r["_time"])
        if len({json.dumps(r["results"]["headline"]["dense"], sort_keys=True) for r in mine}) > 1:
            notes.append(f"dense results of {model} differ between records (other eval settings?); "
                         "the dense row shows the newest")
        dense_rows.append({"model": model, "prune_ratio": 0.0, "metric": DENSE, "compensation": "",
                           **_scores(mine[-1], "dense", ppl, acc)})
    table = pd.concat([pd.DataFrame(dense_rows), pruned], ignore_index=True)
    measures = [x for c in ppl for x in (c, f"{c} sd")] + [x for c in acc for x in (c, f"{c} se")]
    table = table[KEY + ["runs"] + measures + SUMMARY].sort_values(KEY, ignore_index=True)
    return table.dropna(axis=1, how="all"), notes


def _cells(table: pd.DataFrame, na: str) -> list[list[str]]:
    def fmt(col: str, v: Any) -> str:
        if isinstance(v, str):
            return v
        if pd.isna(v):
            return na
        if col == "prune_ratio":
            return f"{v:g}"
        if col in ("runs", "pruning_tokens"):
            return f"{int(round(v)):,}"
        if col.startswith("ppl@"):
            return f"{v:.2f}"
        if col.endswith(" se"):
            return f"{v:.3f}"
        if col in ("retained_pct", "pruning_seconds", "train_seconds"):
            return f"{v:.1f}"
        if col == "speedup":
            return f"{v:.2f}x"
        return f"{v:.3f}"  # accuracies
    return [[fmt(c, v) for c, v in zip(table.columns, row)] for row in table.itertuples(index=False)]


SPREAD_SUFFIXES = (" sd", " se")


def combined(table: pd.DataFrame, na: str = "–") -> tuple[list[str], list[list[str]]]:
    """Column names and cells with each spread column folded into its value's cell: "97.42 ± 5.10"."""
    cells = _cells(table, na)
    cols = list(table.columns)
    keep = [i for i, c in enumerate(cols) if not c.endswith(SPREAD_SUFFIXES)]
    out = []
    for row in cells:
        new = []
        for i in keep:
            value = row[i]
            for suffix in SPREAD_SUFFIXES:
                j = cols.index(cols[i] + suffix) if cols[i] + suffix in cols else None
                if j is not None and row[j] != na:
                    value = f"{value} ± {row[j]}"
            new.append(value)
        out.append(new)
    return [cols[i] for i in keep], out


def to_markdown(table: pd.DataFrame) -> str:
    cols, cells = combined(table)
    heads = [HEADERS.get(c, c) for c in cols]
    align = ["---" if c in KEY else "---:" for c in cols]  # numbers right-aligned
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in heads) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in s)  # per character, so escapes are never escaped again


def to_latex(table: pd.DataFrame) -> str:
    """Booktabs tabular (needs \\usepackage{booktabs}); a rule between models; spreads as "mean ± sd"."""
    names, cells = combined(table, "--")
    cols = "".join("l" if c in KEY else "r" for c in names)
    lines = ["% generated by experiments.report; needs \\usepackage{booktabs}", f"\\begin{{tabular}}{{{cols}}}",
             "\\toprule", " & ".join(_tex(HEADERS.get(c, c)) for c in names) + r" \\", "\\midrule"]
    previous = None
    for model, row in zip(table["model"], cells):
        if previous is not None and model != previous:
            lines.append("\\midrule")
        previous = model
        lines.append(" & ".join(_tex(v).replace("±", r"$\pm$") for v in row) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _method(metric: str, compensation: str) -> str:
    return f"{metric} + {compensation}"


def plot_importance(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Heatmap per model: one row per metric (first scoring pass, min-max normalised per row), removed layers x'd.

    The removed layers shown are those of the metric's largest-ratio run (newest on ties).
    """
    plt = _pyplot()
    chosen: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for rec in sorted(records, key=lambda r: (_ratio(r), r["_time"])):  # later entries win
        if rec.get("selection", {}).get("decisions"):
            chosen[row_key(rec)[0]][rec["_labels"]["metric"]] = rec
    paths = []
    for model, by_metric in sorted(chosen.items()):
        metrics = sorted(by_metric)
        rows = [np.array([_num(s) for s in by_metric[m]["selection"]["decisions"][0]["scores"]]) for m in metrics]
        matrix = np.full((len(rows), max(len(r) for r in rows)), np.nan)
        for i, s in enumerate(rows):
            lo, hi = np.nanmin(s), np.nanmax(s)  # layers without a score (None) stay NaN: grey
            matrix[i, :len(s)] = (s - lo) / (hi - lo) if hi > lo else 0.5
        fig, ax = plt.subplots(figsize=(max(8.0, 0.28 * matrix.shape[1] + 4), 0.45 * len(rows) + 2.2))
        cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
        image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap=cmap, vmin=0, vmax=1,
                          interpolation="nearest")
        for i, m in enumerate(metrics):
            removed = by_metric[m].get("removed_layers") or []
            ax.scatter(removed, [i] * len(removed), marker="x", color="red", s=36,
                       label="removed layer" if i == 0 else None)
        ax.set_yticks(range(len(metrics)), [f"{m} (ratio {_ratio(by_metric[m]):g})" for m in metrics])
        ax.set_xticks(range(matrix.shape[1]))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("layer index (grey: no score)")
        ax.set_title(f"{model}: per-layer importance\n(first scoring pass, min-max normalised per metric)")
        fig.colorbar(image, ax=ax, label="importance (1 = highest)")
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.18), fontsize=8, frameon=False)
        fig.tight_layout()
        name = "importance_heatmap.png" if len(chosen) == 1 else f"importance_heatmap_{_safe(model)}.png"
        fig.savefig(out_dir / name, dpi=130, bbox_inches="tight")
        plt.close(fig)
        paths.append(out_dir / name)
    return paths


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def plot_ppl_vs_ratio(table: pd.DataFrame, out_dir: Path) -> Path | None:
    """First perplexity column against the prune ratio: one panel per (model, compensation), one line per metric,
    each metric the same colour in every panel, so a sweep of many methods stays readable."""
    ppl = [c for c in table.columns if c.startswith("ppl@")]
    if not ppl:
        return None
    plt, col = _pyplot(), ppl[0]
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
    plt = _pyplot()
    pruned = table[table["metric"] != DENSE]
    models = sorted(pruned["model"].unique())
    sizes = [len(pruned[pruned["model"] == m]) + pruned.loc[pruned["model"] == m, "prune_ratio"].nunique()
             for m in models]
    fig, axes = plt.subplots(len(models), 1, figsize=(9, 0.32 * sum(sizes) + 1.6 * len(models)), squeeze=False,
                             gridspec_kw={"height_ratios": sizes})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, model in zip(axes[:, 0], models):
        y, ticks, labels = 0, [], []
        for k, (ratio, g) in enumerate(pruned[pruned["model"] == model].groupby("prune_ratio")):
            ys = np.arange(y, y + len(g))
            ax.barh(ys, g["pruning_seconds"], color=colors[k % len(colors)], label=f"ratio {ratio:g}")
            for yy, v in zip(ys, g["pruning_seconds"]):
                if not math.isnan(v):
                    ax.text(v, yy, f" {v:.1f}s", va="center", fontsize=7)
            ticks += list(ys)
            labels += [_method(m, c) for m, c in zip(g["metric"], g["compensation"])]
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


# ----------------------------------------------------------------------------------------------------- outputs

def log_to_wandb(table: pd.DataFrame, images: list[Path], group: str, out_dir: Path) -> None:
    """Mirror the table and plots to one W&B run; mode from WANDB_MODE (default offline: no login needed)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gradmap"), group=group, job_type="report",
                     name=f"report-{group}", mode=os.environ.get("WANDB_MODE", "offline"), dir=str(out_dir),
                     reinit="finish_previous")
    run.log({"results": wandb.Table(dataframe=table), **{f"plots/{p.stem}": wandb.Image(str(p)) for p in images}})
    run.finish()


def protocol(records: list[dict[str, Any]]) -> str:
    """What every number was measured on: held-out texts (corpus, split, tokens), calibration budgets, seeds, tasks."""
    texts, budgets, seeds, tasks = {}, set(), set(), {}
    for rec in records:
        for name, t in (rec.get("heldout") or {}).items():
            texts[name] = f"`{name}` ({t['corpus']} corpus, {t['split']} split, {t['tokens']:,} tokens)"
        cal = rec.get("calibration") or {}
        if cal:
            budgets.add(f"{cal.get('num_samples')} x {cal.get('seq_len')} = {cal.get('tokens'):,} tokens "
                        f"({cal.get('split', 'calib')} split)")
        seeds.add(rec.get("config", {}).get("seed"))
        lm = (rec.get("config", {}).get("eval") or {}).get("lm_eval") or {}
        for task in lm.get("tasks") or []:
            tasks.setdefault(task, set()).add(lm.get("limit"))
    lines = ["Held-out text: " + ("; ".join(texts[k] for k in sorted(texts)) or "none recorded (old records)"),
             "Calibration: " + ("; ".join(sorted(budgets)) or "?"),
             "Seeds: " + ", ".join(str(s) for s in sorted(seeds, key=str))]
    if tasks:
        lines.append("Tasks: " + "; ".join(f"{t} ({', '.join('all' if n is None else f'{n} questions' for n in sorted(limits, key=str))})"
                                         for t, limits in sorted(tasks.items())))
    return "\n".join(f"- {line}" for line in lines)


def write_report(sweep_dirs: list[str | Path], out_dir: str | Path, baseline: str | None = None,
                 use_wandb: bool = False) -> tuple[str, list[Path], list[str]]:
    """Load, tabulate, plot and write everything; returns (Markdown table, files written, notes)."""
    records, notes = load_records(sweep_dirs)
    table, table_notes = build_table(records, baseline)
    notes += table_notes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(table)
    sources = ", ".join(f"`{d}`" for d in sweep_dirs)
    doc = (f"# Results\n\nFrom {len(records)} finished runs under {sources}.\n\n{protocol(records)}\n\n"
           "Columns: see `experiments/report.py` (perplexity: mean ± standard deviation over seeds; accuracy = "
           "acc_norm where available, else acc, ± lm-eval's standard error; retained % = mean over tasks of "
           f"pruned/dense; speedup vs {baseline or 'the slowest method'} of the same model and ratio).\n\n{markdown}")
    if notes:
        doc += "\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes)
    files = [out / "results.md", out / "results.csv", out / "results.tex"]
    files[0].write_text(doc)
    table.to_csv(files[1], index=False)
    files[2].write_text(to_latex(table))
    images = plot_importance(records, out) + [p for p in (plot_ppl_vs_ratio(table, out),
                                                          plot_pruning_time(table, out)) if p is not None]
    if use_wandb:
        log_to_wandb(table, images, Path(sweep_dirs[0]).resolve().name, out)
    return markdown, files + images, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR", help="folders searched for **/record.json")
    parser.add_argument("--out", required=True, help="folder for results.{md,csv,tex} and the PNG plots")
    parser.add_argument("--baseline", metavar="METHOD",
                        help="speedup reference: a metric (e.g. sleb) or metric+compensation; default the slowest")
    parser.add_argument("--wandb", action="store_true", help="also log table and plots to W&B (WANDB_MODE)")
    args = parser.parse_args(argv)
    try:
        markdown, files, notes = write_report(args.sweep_dirs, args.out, args.baseline, args.wandb)
    except NoRecordsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown)
    for note in notes:
        print(f"note: {note}")
    print("wrote:\n" + "\n".join(f"  {f}" for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
