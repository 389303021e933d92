"""Quality versus pruning cost: for the pruning compute one can afford, which method gives the best model?

    python -m experiments.frontier SWEEP_DIR [SWEEP_DIR ...] --out DIR [--text TEXT]... [--cost tokens|seconds]
                                   [--compensation CHOICE ...]

Reads every finished `record.json` under the folders (`experiments.records.load_records`: the newest run per
configuration and seed; failed jobs become notes) and builds one row per (model, prune ratio, metric, compensation,
calibration budget). The metric label is the Hydra choice plus the metric settings that differ between runs of
that choice (`gradmap [iterative=false]`, `gradmap_verify [candidates=4]`); the calibration budget is a column of
its own, not part of the label. Columns:

- `budget_tokens` (`calib_samples` x `calib_seq_len`): calibration tokens the method was given;
- `seeds`: how many calibration seeds the row averages;
- `ppl@<len>/<text>`, `ppl@<len>/<text> sd`: test perplexity of the pruned model per held-out text, mean and sample
  standard deviation over the seeds (sd empty for one seed);
- `pruning_tokens`: forward + backward tokens of the selection when it was computed (cached selections keep their
  original cost) + forward tokens of the compensation, as in experiments.report; mean over seeds;
- `pruning_seconds`: `pruning_seconds_original` (that scoring's wall time + prune + compensate), mean over seeds;
  wall time depends on the machine and on what else ran on it, the token count does not;
- `<ppl column> pareto`: the row is Pareto-optimal for that text and the chosen `--cost`: no other row of the same
  model and ratio is at most as costly and at most as perplex, and strictly better in one of the two (identical
  points are all kept).

Writes `results.csv`, `results.md` (the command, the protocol, the best method affordable under each cost cap of a
1-2-5 series, listed where it changes, and the table) and `frontier.png` (x: pruning cost, log; y: test perplexity,
log when it spans more than 10x, rows above 30x the best drawn on the top edge; colour per metric, marker per
compensation, error bars = sd over seeds; the Pareto front as a step line, its points numbered with a key under
the panel; one panel per held-out text and per model/ratio).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pandas as pd

from experiments.frontier_plot import dense_reference, plot_frontier
from experiments.records import (
    LABEL_IGNORE,
    NoRecordsError,
    ReportedRun,
    choice,
    failed_notes,
    failed_values,
    label_variants,
    load_records,
    num,
    out_dir_problem,
    print_written,
    protocol,
    pruning_seconds,
    pruning_tokens,
    ratio_of,
    result_columns,
)
from experiments.stability import mean_jaccard

GROUP = ["model", "prune_ratio", "metric", "compensation", "budget_tokens", "calib_samples", "calib_seq_len"]
COSTS = {"tokens": "pruning_tokens", "seconds": "pruning_seconds"}
COST_LABELS = {"pruning_tokens": "pruning cost: forward + backward tokens",
               "pruning_seconds": "pruning time (s): scoring + prune + compensate"}
COST_DEFS = {"tokens": "pruning tokens = forward + backward tokens of the selection when it was computed (a cached "
                       "selection keeps its original cost) + forward tokens of the compensation (machine-independent)",
             "seconds": "pruning seconds = wall time of the selection when it was computed + prune + compensate, "
                        "on the machine that ran it (other jobs may have shared it)"}
# The calibration budget is a column, the seed the averaging axis: neither may split a method's label.
BUDGET_KEYS = ("calibration.num_samples", "calibration.seq_len")


class FrontierError(RuntimeError):
    """The records cannot make a frontier (no perplexity, unknown --text)."""


# ----------------------------------------------------------------------------------------------------- Pareto

def pareto_front(points: Iterable[Sequence[float]]) -> list[int]:
    """Indices of the Pareto-optimal (cost, loss) points, both lower-is-better, sorted by cost (then loss, index).

    Point j dominates point i when cost_j <= cost_i and loss_j <= loss_i with at least one strict: at equal cost
    the lower loss wins, at equal loss the lower cost wins; identical points do not dominate each other, so all of
    them stay on the front. Points with a non-finite cost or loss (NaN, inf) are ignored: never on the front, never
    dominating. Pure: O(n^2), for the tens of rows of a sweep.
    """
    pts = [(float(c), float(q)) for c, q in points]
    ok = [i for i, (c, q) in enumerate(pts) if math.isfinite(c) and math.isfinite(q)]

    def dominates(j: int, i: int) -> bool:
        (cj, qj), (ci, qi) = pts[j], pts[i]
        return cj <= ci and qj <= qi and (cj < ci or qj < qi)

    front = [i for i in ok if not any(dominates(j, i) for j in ok)]
    return sorted(front, key=lambda i: (pts[i][0], pts[i][1], i))


# ------------------------------------------------------------------------------------------------------- table

def _budget(rec: ReportedRun) -> tuple[float, float, float]:
    """(tokens, windows, window length) of the calibration set the run used (recorded, else from its config)."""
    used, cfg = rec.calibration or {}, rec.config.get("calibration") or {}
    samples = num(used.get("num_samples", cfg.get("num_samples")))
    seq_len = num(used.get("seq_len", cfg.get("seq_len")))
    tokens = num(used.get("tokens", samples * seq_len))
    return tokens, samples, seq_len


def ppl_columns(records: list[ReportedRun], texts: list[str] | None = None) -> list[str]:
    """The perplexity headline columns (`ppl@<len>/<text>`), restricted to `texts`: held-out text names
    (`wiki_test`, every window length) or full column names; an unknown name raises FrontierError."""
    cols = result_columns(records)[0]
    if not cols:
        raise FrontierError("the records hold no perplexity (ppl@<len>/<text>) results")
    if not texts:
        return cols
    chosen = []
    for text in texts:
        hits = [c for c in cols if text in (c, c.partition("/")[2])]
        if not hits:
            raise FrontierError(f"--text {text!r} not in the records; available: "
                                + ", ".join(sorted({c.partition('/')[2] or c for c in cols} | set(cols))))
        chosen += [c for c in hits if c not in chosen]
    return chosen


def build_frontier(records: list[ReportedRun], ppl: list[str], cost: str = "tokens") -> pd.DataFrame:
    """One row per GROUP: `seeds`, each ppl column's mean and sd over seeds, mean pruning tokens and seconds, and
    a `<ppl column> pareto` flag per column for the `cost` ("tokens" or "seconds") within each (model, ratio)."""
    ignore = LABEL_IGNORE + BUDGET_KEYS
    metrics = label_variants(records, "metric", ("metric", "calibration"), ignore)
    comps = label_variants(records, "compensation", ("compensation",), ignore)
    rows = []
    for rec, metric, comp in zip(records, metrics, comps):
        tokens, samples, seq_len = _budget(rec)
        pruned = rec.results["headline"]["pruned"]
        rows.append({"model": choice(rec, "model"), "prune_ratio": ratio_of(rec), "metric": metric,
                     "compensation": comp, "budget_tokens": tokens, "calib_samples": samples,
                     "calib_seq_len": seq_len, "seed": rec.config.get("seed"),
                     **{c: num(pruned.get(c)) for c in ppl},
                     **{f"{c} failed": c in failed_values(rec, "pruned", ppl) for c in ppl},
                     "pruning_tokens": pruning_tokens(rec), "pruning_seconds": pruning_seconds(rec),
                     "removed": frozenset(rec.removed_layers or [])})
    runs = pd.DataFrame(rows)
    groups = runs.groupby(GROUP, dropna=False)
    table = groups.agg(seeds=("seed", "size"), **{c: (c, "mean") for c in ppl},
                       **{f"{c} sd": (c, lambda v: v.std(ddof=1) if v.notna().sum() > 1 else math.nan)
                          for c in ppl},
                       pruning_tokens=("pruning_tokens", "mean"),
                       pruning_seconds=("pruning_seconds", "mean"),
                       removed_jaccard=("removed", lambda s: mean_jaccard(list(s))),
                       **{f"{c} failed": (f"{c} failed", "any") for c in ppl}).reset_index()
    for c in ppl:  # a seed whose value is NaN makes the mean unknown (never the other seeds' mean)
        table.loc[table[f"{c} failed"], [c, f"{c} sd"]] = math.nan
    spread = [x for c in ppl for x in (c, f"{c} sd")]
    table = table[GROUP + ["seeds"] + spread + ["pruning_tokens", "pruning_seconds", "removed_jaccard"]]
    cost_col = COSTS[cost]
    for c in ppl:
        flag = pd.Series(False, index=table.index)
        for _, g in table.groupby(["model", "prune_ratio"]):
            front = pareto_front(zip(g[cost_col], g[c]))
            flag[g.index[front]] = True
        table[f"{c} pareto"] = flag
    return table.sort_values(GROUP, ignore_index=True)


def method_label(row: Any) -> str:
    """"metric + compensation @ samples x seq_len" for one table row."""
    n, length = row["calib_samples"], row["calib_seq_len"]
    budget = f"{int(n)} x {int(length)}" if not (math.isnan(n) or math.isnan(length)) else \
        f"{row['budget_tokens']:,.0f} tokens"
    return f"{row['metric']} + {row['compensation']} @ {budget}"


# ----------------------------------------------------------------------------------------------------- summary

def _fmt_cost(value: float, cost_col: str) -> str:
    if math.isnan(value):
        return "?"
    return f"{value:,.0f} tokens" if cost_col == "pruning_tokens" else f"{value:,.1f} s"


def _fmt_ppl(mean: float, sd: float) -> str:
    return f"{mean:.2f}" + ("" if math.isnan(sd) else f" ± {sd:.2f}")


def cost_caps(costs: Iterable[float]) -> list[float]:
    """Budget caps for the summary: 0 when something is free, then the 1-2-5 series (..., 1,000, 2,000, 5,000,
    10,000, ...) from the first value >= the cheapest positive cost to the first value >= the most expensive."""
    values = [float(c) for c in costs if math.isfinite(float(c))]
    caps = [0.0] if any(c <= 0 for c in values) else []
    positive = [c for c in values if c > 0]
    if positive:
        lo, hi = min(positive), max(positive)
        series = [m * 10.0 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                  for m in (1, 2, 5)]
        first, last = min(x for x in series if x >= lo), min(x for x in series if x >= hi)
        caps += [x for x in series if first <= x <= last]
    return caps


def affordable(table: pd.DataFrame, col: str, cost: str = "tokens") -> list[dict[str, Any]]:
    """For one ppl column and each (model, ratio): the best row one can afford at each cap of `cost_caps`, listed
    only where it changes (the first cap always). Best = lowest mean perplexity among the rows costing at most the
    cap (ties: the cheaper, then the label); always a Pareto row."""
    cost_col = COSTS[cost]
    out = []
    for (model, ratio), g in table.groupby(["model", "prune_ratio"]):
        g = g[g[cost_col].notna() & g[col].notna()]
        g = g.assign(_label=[method_label(r) for _, r in g.iterrows()])
        previous = None
        for cap in cost_caps(g[cost_col]):
            mine = g[g[cost_col] <= cap]
            if mine.empty:
                continue
            best = mine.sort_values([col, cost_col, "_label"]).iloc[0]
            if best["_label"] == previous:
                continue
            previous = best["_label"]
            out.append({"model": model, "prune_ratio": ratio, "text": col, "cap": cap, "method": best["_label"],
                        "mean": best[col], "sd": best[f"{col} sd"], "cost": best[cost_col],
                        "seeds": int(best["seeds"])})
    return out


def affordable_groups(table: pd.DataFrame, ppl: list[str], cost: str) -> Iterator[tuple[str, str, float,
                                                                                    pd.DataFrame]]:
    """(text column, model, ratio, its best-affordable rows) for every text and (model, ratio) that has any: what both
    the plain-text and the Markdown summary render."""
    for col in ppl:
        rows = affordable(table, col, cost)
        if rows:
            for (model, ratio), mine in pd.DataFrame(rows).groupby(["model", "prune_ratio"]):
                yield col, model, ratio, mine


def summary_lines(table: pd.DataFrame, ppl: list[str], cost: str) -> list[str]:
    """Plain-text summary: per text (and model, ratio), the best method affordable at each cost cap."""
    cost_col, lines = COSTS[cost], []
    for col, model, ratio, mine in affordable_groups(table, ppl, cost):
        lines.append(f"{col} ({model}, ratio {ratio:g}): best method with pruning cost <= cap "
                     "(caps where it changes)")
        for _, r in mine.iterrows():
            cap = "0 (free)" if r["cap"] == 0 else _fmt_cost(r["cap"], cost_col)
            lines.append(f"  <= {cap}: {r['method']}: {_fmt_ppl(r['mean'], r['sd'])} "
                         f"(seeds {r['seeds']}, cost {_fmt_cost(r['cost'], cost_col)})")
    return lines


def affordable_markdown(table: pd.DataFrame, ppl: list[str], cost: str) -> str:
    cost_col, parts = COSTS[cost], []
    unit = "tokens" if cost == "tokens" else "s"
    for col, model, ratio, mine in affordable_groups(table, ppl, cost):
        parts.append(f"### `{col}` ({model}, ratio {ratio:g})\n\n"
                     f"| pruning cost ≤ ({unit}) | best method | test perplexity (mean ± sd) | seeds "
                     "| its cost |\n"
                     "| ---: | --- | ---: | ---: | ---: |\n"
                     + "".join(f"| {'0' if r['cap'] == 0 else _fmt_cost(r['cap'], cost_col).split()[0]} "
                               f"| {r['method']} | {_fmt_ppl(r['mean'], r['sd'])} | {r['seeds']} "
                               f"| {_fmt_cost(r['cost'], cost_col)} |\n" for _, r in mine.iterrows()))
    return "\n".join(parts)


def to_markdown(table: pd.DataFrame, ppl: list[str]) -> str:
    """All rows; perplexity as "mean ± sd", a ★ after the value on the Pareto front of its text."""
    heads = ["model", "ratio", "metric", "compensation", "calibration", "budget_tokens", "seeds", *ppl,
             "pruning tokens", "pruning time (s)", "removed-set Jaccard"]
    lines = ["| " + " | ".join(heads) + " |",
             "| " + " | ".join("---" if i < 5 else "---:" for i in range(len(heads))) + " |"]
    for _, r in table.iterrows():
        calib = "?" if math.isnan(r["calib_samples"]) else f"{int(r['calib_samples'])} x {int(r['calib_seq_len'])}"
        cells = [r["model"], f"{r['prune_ratio']:g}", r["metric"], r["compensation"], calib,
                 "?" if math.isnan(r["budget_tokens"]) else f"{r['budget_tokens']:,.0f}", str(int(r["seeds"]))]
        cells += [("–" if math.isnan(r[c]) else _fmt_ppl(r[c], r[f"{c} sd"])) + (" ★" if r[f"{c} pareto"] else "")
                  for c in ppl]
        cells += ["?" if math.isnan(r["pruning_tokens"]) else f"{r['pruning_tokens']:,.0f}",
                  "?" if math.isnan(r["pruning_seconds"]) else f"{r['pruning_seconds']:.1f}",
                  "–" if math.isnan(r["removed_jaccard"]) else f"{r['removed_jaccard']:.2f}"]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------- outputs

def write_frontier(sweep_dirs: list[str | Path], out_dir: str | Path, texts: list[str] | None = None,
                   cost: str = "tokens", command: str | None = None,
                   compensations: list[str] | None = None) -> tuple[str, list[Path], list[str]]:
    """Load, tabulate, summarise, plot and write; returns (plain-text summary, files written, notes).
    `compensations`: keep only runs with these compensation choices (default: all)."""
    records, notes = load_records(sweep_dirs)
    if compensations:
        found = {choice(r, "compensation") for r in records}
        unknown = sorted(set(compensations) - found)
        if unknown:
            raise FrontierError(f"--compensation {', '.join(unknown)} not in the records; available: "
                                + ", ".join(sorted(found)))
        left = [r for r in records if choice(r, "compensation") in compensations]
        notes.append(f"{len(records) - len(left)} finished run(s) with another compensation left out "
                     f"(--compensation {' '.join(compensations)})")
        records = left
    ppl = ppl_columns(records, texts)
    table = build_frontier(records, ppl, cost)
    notes += failed_notes(records, ppl, lambda r: f"{choice(r, 'metric')}+{choice(r, 'compensation')} "
                          f"({choice(r, 'model')}, ratio {ratio_of(r):g})")[0]
    for (model, ratio), g in table.groupby(["model", "prune_ratio"]):
        few = g[g["seeds"] < g["seeds"].max()]
        for _, r in few.iterrows():
            notes.append(f"{method_label(r)} ({model}, ratio {ratio:g}) has {int(r['seeds'])} seed(s), "
                         f"others up to {int(g['seeds'].max())}")
        missing = g[g[COSTS[cost]].isna()]
        for _, r in missing.iterrows():
            notes.append(f"{method_label(r)}: no recorded {cost} cost, left out of the front and the plot")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dense = dense_reference(records, ppl)
    summary = summary_lines(table, ppl, cost)
    command = command or ("python -m experiments.frontier " + " ".join(shlex.quote(str(d)) for d in sweep_dirs)
                          + f" --out {shlex.quote(str(out_dir))} --cost {cost}")
    sources = ", ".join(f"`{d}`" for d in sweep_dirs)
    dense_line = "; ".join(f"{col} {v:.2f} ({model})" for (model, col), v in sorted(dense.items()))
    doc = (f"# Quality versus pruning cost\n\n```\n{command}\n```\n\nFrom {len(records)} finished runs under "
           f"{sources}.\n\n{protocol(records)}\n- Dense model: {dense_line or '?'}\n"
           f"- Cost (x axis, front, caps): {COST_DEFS[cost]}; mean over seeds\n"
           "- Perplexity: mean ± sample sd over the calibration seeds (no sd for one seed)\n"
           "- ★ Pareto-optimal for that text: no other row is at most as costly and at most as perplex, and "
           "strictly better in one\n\n"
           "## Best method affordable at each pruning cost\n\nFor a cap on the pruning cost (1-2-5 series; listed "
           "where the best changes): the lowest mean test perplexity among the rows costing at most the cap.\n\n"
           f"{affordable_markdown(table, ppl, cost)}\n"
           f"## All rows\n\n{to_markdown(table, ppl)}\n![frontier](frontier.png)\n")
    if notes:
        doc += "\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes)
    files = [out / "results.md", out / "results.csv", out / "frontier.png"]
    files[0].write_text(doc)
    table.to_csv(files[1], index=False)
    plot_frontier(table, ppl, COSTS[cost], COST_LABELS[COSTS[cost]], files[2], method_label, dense)
    return "\n".join(summary), files, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.frontier", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR", help="folders searched for **/record.json")
    parser.add_argument("--out", required=True, help="folder for results.{md,csv} and frontier.png")
    parser.add_argument("--text", action="append", metavar="TEXT",
                        help="held-out text to show (wiki_test, or a column such as ppl@128/wiki_test); repeat for "
                             "several; default all")
    parser.add_argument("--compensation", nargs="+", metavar="CHOICE",
                        help="only runs with these compensations (e.g. none projection: trained compensations' "
                             "one-layer training tokens are not full-model tokens, so their cost is not comparable)")
    parser.add_argument("--cost", choices=sorted(COSTS), default="tokens",
                        help="x axis, Pareto front and summary: pruning tokens (machine-independent, default) or "
                             "seconds")
    args = parser.parse_args(argv)
    command = "python -m experiments.frontier " + shlex.join(sys.argv[1:] if argv is None else argv)
    problem = out_dir_problem(args.out)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        summary, files, notes = write_frontier(args.sweep_dirs, args.out, args.text, args.cost, command,
                                               args.compensation)
    except (NoRecordsError, FrontierError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: --out {args.out}: cannot write the report ({err.strerror or err}: {err.filename})",
              file=sys.stderr)
        return 2
    print_written(summary, notes, files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
