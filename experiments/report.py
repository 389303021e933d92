"""Paper-style report of finished sweeps: results table (Markdown, CSV, LaTeX), plots, optional W&B mirror.

    python -m experiments.report SWEEP_DIR [SWEEP_DIR ...] --out DIR [--baseline METHOD] [--wandb]

Every job's `record.json` (found recursively) is one run, read through `gradmap.record.RunRecord` (see
`experiments.records`: older records are upgraded, newer ones refused with a note); only `status: done` runs enter
the table. Rows are
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
- `folds_undone`: folds the compensation's guard undid (GradMAP projection's `guard=final_error`: a fold that raised
  the final-layer calibration error is reverted), mean per run; a row whose every fold was undone is its `none` row
  with the compensation's cost; the column is left out when no run reports a guard;
- `pruning_tokens`: forward + backward tokens of that original scoring + forward tokens of the compensation stage
  (tokens through trained sub-modules, `train_tokens`, are left out);
- `speedup`: time of the slowest method of the same (model, ratio), or of `--baseline`, divided by the row's time.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.records import (
    NoRecordsError,
    ReportedRun,
    failed_notes,
    load_records,
    mean,
    num,
    out_dir_problem,
    print_written,
    protocol,
    pruning_seconds,
    pruning_tokens,
    result_columns,
    row_key,
)
from experiments.report_plots import DENSE, plot_importance, plot_ppl_vs_ratio, plot_pruning_time

__all__ = ["NoRecordsError", "build_table", "load_records", "main", "to_latex", "to_markdown", "write_report"]

KEY = ["model", "prune_ratio", "metric", "compensation"]
SUMMARY = ["task_avg", "retained_pct", "pruning_seconds", "train_seconds", "folds_undone", "pruning_tokens", "speedup"]
HEADERS = {"prune_ratio": "ratio", "task_avg": "task avg", "retained_pct": "retained %",
           "pruning_seconds": "pruning time (s)", "train_seconds": "of which training (s)",
           "folds_undone": "folds undone", "pruning_tokens": "tokens (fwd+bwd)"}


# ------------------------------------------------------------------------------------------------------- table

def _stderr(rec: ReportedRun, side: str, col: str) -> float:
    """lm-eval's standard error of accuracy column `<task>/<metric>` in the record's `side` results."""
    task, metric = col.rsplit("/", 1)
    return num(((rec.results.get(side) or {}).get("lm_eval") or {}).get(task, {}).get(f"{metric}_stderr"))


def _scores(rec: ReportedRun, side: str, ppl: list[str], acc: list[str]) -> dict[str, float]:
    head = rec.results["headline"]
    values, dense = head[side], head["dense"]
    row = {c: num(values.get(c)) for c in ppl + acc}
    row.update({f"{c} se": _stderr(rec, side, c) for c in acc})
    row["task_avg"] = mean([row[c] for c in acc])
    row["retained_pct"] = mean([100.0 * row[c] / num(dense.get(c)) for c in acc if num(dense.get(c)) > 0])
    return row


def _folds_undone(rec: ReportedRun) -> float:
    """How many of the compensation's folds its guard undid; NaN when no guard checked them (`guard=none`, e.g.
    ReplaceMe's default, or a compensation without one): 0 would claim a check that never ran."""
    report = rec.compensation or {}
    if report.get("guard") in (None, "none"):
        return math.nan
    return float(len(report.get("sites_undone", [])))


def _matches(metric: str, compensation: str, baseline: str) -> bool:
    """`--baseline` names a metric ("sleb"), a labelled variant, or a method "metric+compensation"."""
    return baseline in (metric, metric.split(" [")[0], f"{metric}+{compensation}")


def build_table(records: list[ReportedRun], baseline: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """One row per (model, ratio, metric, compensation) averaged over seeds, plus a dense row per model.

    Columns: KEY, runs, ppl@*, task accuracies, SUMMARY (see the module docstring); all-empty columns are dropped.
    """
    notes: list[str] = []
    ppl, acc = result_columns(records)
    rows = []
    for rec in records:
        rows.append({**dict(zip(KEY, row_key(rec))), "runs": 1, **_scores(rec, "pruned", ppl, acc),
                     "pruning_seconds": pruning_seconds(rec),
                     "train_seconds": num((rec.compensation or {}).get("train_seconds")),
                     "folds_undone": _folds_undone(rec),
                     "pruning_tokens": pruning_tokens(rec)})
    pruned = pd.DataFrame(rows)
    groups = pruned.groupby(KEY)
    spread = groups[ppl].std(ddof=1).rename(columns=lambda c: f"{c} sd").reset_index()  # NaN for a single seed
    pruned = groups.agg({c: ("sum" if c == "runs" else "mean") for c in pruned.columns if c not in KEY}).reset_index()
    pruned = pruned.merge(spread, on=KEY)
    nan_notes, cells = failed_notes(records, ppl + acc, lambda r: "+".join(row_key(r)[2:]) + f" ({row_key(r)[0]}, "
                                    f"ratio {row_key(r)[1]:g})")
    notes += nan_notes
    for rec, col in cells:  # a failed seed makes the mean unknown: never the other seeds' mean under "N runs"
        row = (pruned[KEY] == pd.Series(dict(zip(KEY, row_key(rec))))).all(axis=1)
        spoilt = [col, f"{col} sd" if col in ppl else f"{col} se"]
        spoilt += ["task_avg", "retained_pct"] if col in acc else []
        pruned.loc[row, [c for c in spoilt if c in pruned.columns]] = math.nan

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
        mine = sorted((r for r in records if row_key(r)[0] == model), key=lambda r: r.finish_time)
        scored = [_scores(r, "dense", ppl, acc) for r in mine]
        # Per column, the newest record that measured it: a perplexity-only sweep merged with an accuracy sweep
        # (paper_main + paper_accuracy) still shows the dense accuracy.
        dense = {c: next((s[c] for s in reversed(scored) if not pd.isna(s[c])), math.nan) for c in scored[-1]}
        differ = [c for c in ppl + acc if len({round(s[c], 9) for s in scored if not pd.isna(s[c])}) > 1]
        if differ:
            notes.append(f"dense {', '.join(differ)} of {model} differ between records (other eval settings?); "
                         "the dense row shows the newest")
        dense_rows.append({"model": model, "prune_ratio": 0.0, "metric": DENSE, "compensation": "", **dense})
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
        if col == "folds_undone":
            return f"{v:.2g}"  # a count, or a mean over seeds (0.33)
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
    problem = out_dir_problem(args.out)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        markdown, files, notes = write_report(args.sweep_dirs, args.out, args.baseline, args.wandb)
    except NoRecordsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, a file where a plot goes
        print(f"error: --out {args.out}: cannot write the report ({err.strerror or err}: {err.filename})",
              file=sys.stderr)
        return 2
    print_written(markdown, notes, files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
