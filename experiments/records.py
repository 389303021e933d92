"""Finished runs as the reports read them (`experiments.report`, `experiments.frontier`).

Every `record.json` under the sweep folders (found recursively) is read through `gradmap.record.RunRecord.from_dict`,
the one adapter: a record written before `schema_version` existed is upgraded (its config in today's shape, so old
and new runs of the same configuration share a row), one written by a newer gradmap is refused with a note. Only
`status: done` runs are returned, the newest per (model, ratio, metric, compensation, seed), each as a
`ReportedRun`: the record, where it was found, when it finished, and its row labels. The accessors below (`choice`,
`ratio_of`, `result_columns`, `pruning_tokens`, ...) are what both reports compute from a record.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from gradmap.jobs import same_job
from gradmap.record import RecordVersionError, RunRecord

# Config keys that never make a variant: `calibration.seed` interpolates the run's `seed`, the axis the table
# averages over (labelling by it would give every seed a row of its own).
LABEL_IGNORE = ("calibration.seed",)


class NoRecordsError(RuntimeError):
    """No usable record.json under the folders given."""


@dataclass
class ReportedRun(RunRecord):
    """A finished run's record, with where it was found (`path`), when it finished (`finish_time`, Unix seconds)
    and its metric/compensation row labels (`labels`, see `label_variants`)."""

    path: str = ""
    finish_time: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)


def read_record(path: Path) -> RunRecord:
    """One record.json through the adapter; OSError/ValueError (RecordVersionError included) when it cannot be."""
    return RunRecord.from_dict(json.loads(path.read_text()))


def load_records(sweep_dirs: list[str | Path]) -> tuple[list[ReportedRun], list[str]]:
    """Finished records under `sweep_dirs` (newest per model/ratio/metric/compensation/seed) and notes on the rest."""
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
            rec = read_record(path)
        except RecordVersionError as err:
            notes.append(f"refused, not in the table: {path} ({err})")
            continue
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as err:
            notes.append(f"unreadable, skipped: {path} ({err})")
            continue
        if rec.status != "done":
            err = rec.error or {}
            why = f" ({err.get('type')}: {err.get('message')})" if err else ""
            notes.append(f"{rec.status or 'unknown'}, not in the table: {path}{why}")
            continue
        done.append(ReportedRun(**{**vars(rec), "path": str(path), "finish_time": finish_time(rec, path)}))
    if not done:
        raise NoRecordsError(f"none of the {len(paths)} record.json files under {searched} has status 'done'")
    _label_variants(done)
    newest: dict[tuple, ReportedRun] = {}
    for rec in sorted(done, key=lambda r: r.finish_time):  # later ones overwrite: the newest is kept
        key = (*row_key(rec), rec.config.get("seed"))
        if key in newest:
            note = f"duplicate {key}: kept the newest {rec.path}, dropped {newest[key].path}"
            carried = carry_tasks(newest[key], rec)
            notes.append(note + (f" (its {', '.join(carried)} carried over: same pruned model)" if carried else ""))
        newest[key] = rec
    return list(newest.values()), notes


def carry_tasks(older: RunRecord, newer: RunRecord) -> list[str]:
    """The lm-eval tasks only `older` evaluated, copied into `newer` when both are the same pruned model (configs
    equal but for `eval`, same removed layers): e.g. an accuracy sweep (paper_accuracy) and a later rerun of the
    perplexity sweep (paper_main) of the same job, so keeping the newest record does not drop the accuracy."""
    def without_eval(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if k != "eval"}

    if (newer.results is None or older.removed_layers != newer.removed_layers
            or not same_job(without_eval(older.config), without_eval(newer.config))):
        return []
    carried = []
    for side in ("dense", "pruned"):
        old_lm = ((older.results or {}).get(side) or {}).get("lm_eval") or {}
        new_side = newer.results.setdefault(side, {})
        new_lm = new_side.setdefault("lm_eval", {})
        for task, value in old_lm.items():
            if task in ("versions", "n-samples", "config", "higher_is_better") or task in new_lm:
                continue
            new_lm[task] = value
            for extra in ("versions", "n-samples"):
                if task in (old_lm.get(extra) or {}):
                    new_lm.setdefault(extra, {})[task] = old_lm[extra][task]
            old_head = ((older.results or {}).get("headline") or {}).get(side) or {}
            new_head = newer.results.setdefault("headline", {}).setdefault(side, {})
            for column, number in old_head.items():  # the table's columns: `task/acc`, `task/acc_norm`
                if column.startswith(f"{task}/"):
                    new_head.setdefault(column, number)
            if side == "pruned":
                carried.append(task)
    return carried


def finish_time(rec: RunRecord, path: Path) -> float:
    for stamp in (rec.finished, rec.started):
        try:
            return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp()
        except (TypeError, ValueError):
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


def label_variants(records: list[RunRecord], field: str, sections: tuple[str, ...],
                   ignore: tuple[str, ...] = LABEL_IGNORE) -> list[str]:
    """Label of each record for config group `field`: its Hydra choice plus `[key=value, ...]` for the keys of the
    config `sections` whose values differ between records with the same choice (keys of `field` itself shown
    unprefixed, others as `section.key`). `ignore`: full config paths (`calibration.seed`) never shown."""
    flats = []
    for rec in records:
        flat = {}
        for s in sections:
            for k, v in _flatten(rec.config.get(s) or {}).items():
                if f"{s}.{k}" not in ignore:
                    flat[k if s == field else f"{s}.{k}"] = v
        flats.append(flat)
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for rec, flat in zip(records, flats):
        groups[choice(rec, field)].append(flat)
    labels = []
    for rec, flat in zip(records, flats):
        group = groups[choice(rec, field)]
        varying = sorted(k for k in set().union(*group) if len({g.get(k) for g in group}) > 1)
        extra = ", ".join(f"{k}={flat.get(k)}" for k in varying)
        labels.append(choice(rec, field) + (f" [{extra}]" if extra else ""))
    return labels


def _label_variants(records: list[ReportedRun]) -> None:
    """Label each record's metric/compensation by its Hydra choice plus the config values that set it apart from
    other records with the same choice, so distinct configurations never share a row or count as duplicates
    (e.g. the GradMAP ablation sweeps metric.reduction and calibration.num_samples under metric=gradmap)."""
    metric = label_variants(records, "metric", ("metric", "calibration"))
    compensation = label_variants(records, "compensation", ("compensation",))
    for rec, m, c in zip(records, metric, compensation):
        rec.labels = {"metric": m, "compensation": c}


# ------------------------------------------------------------------------------------------------ accessors

def choice(rec: RunRecord, group: str) -> str:
    """The Hydra option of `group` the run used (e.g. metric `gradmap`)."""
    name = (rec.choices or {}).get(group)
    if name is None:
        section = rec.config.get(group)
        name = section.get("name") if isinstance(section, dict) else None
    return str(name or "?")


def ratio_of(rec: RunRecord) -> float:
    # num_prune overrides the ratio in the runner; then the effective ratio is what was pruned.
    value = rec.prune_ratio if rec.config.get("num_prune") is None else None
    return float(value) if value is not None else rec.num_prune / rec.num_layers


def row_key(rec: RunRecord) -> tuple[str, float, str, str]:
    labels = getattr(rec, "labels", None) or {g: choice(rec, g) for g in ("metric", "compensation")}
    return choice(rec, "model"), ratio_of(rec), labels["metric"], labels["compensation"]


def num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan  # null (NaN in JSON) and missing -> NaN


def mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def failed_values(rec: RunRecord, side: str, cols: list[str]) -> list[str]:
    """Columns the run measured and got no number for (null or NaN in its record: a diverged or failed
    evaluation), as opposed to columns it did not measure at all. Such a value is never averaged away."""
    head = ((rec.results or {}).get("headline") or {}).get(side) or {}
    return [c for c in cols if c in head and not (isinstance(head[c], (int, float)) and not math.isnan(head[c]))]


def failed_notes(records: list[RunRecord], cols: list[str], label: Any) -> tuple[list[str], list[tuple]]:
    """For each run with a failed value: a note naming the run (its row, seed and record), and (run, column)."""
    notes, cells = [], []
    for rec in records:
        for col in failed_values(rec, "pruned", cols):
            cells.append((rec, col))
            notes.append(f"{col} of {label(rec)} seed {rec.config.get('seed')} is NaN ({getattr(rec, 'path', '?')}): "
                         "the row's mean is left empty, not averaged over the other seeds")
    return notes, cells


def out_dir_problem(out: str) -> str | None:
    """Why `--out` cannot be the report's folder (one line), or None."""
    path = Path(out).expanduser()
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                return f"--out {out}: {folder} is a file, not a folder"
            if not os.access(folder, os.W_OK | os.X_OK):
                return f"--out {out}: {folder} is not writable"
            return None
    return None


def result_columns(records: list[RunRecord]) -> tuple[list[str], list[str]]:
    """Perplexity columns by window length, and one accuracy column per task (acc_norm if any record has it)."""
    keys = {k for rec in records for side in ("dense", "pruned") for k in rec.results["headline"][side]}

    def window_then_text(k: str) -> tuple[float, str]:  # "ppl@128/wiki_test" -> (128, "wiki_test")
        length, _, text = k[4:].partition("/")
        return (int(length) if length.isdigit() else math.inf, text)

    ppl = sorted((k for k in keys if k.startswith("ppl@")), key=window_then_text)
    tasks = sorted({k.rsplit("/", 1)[0] for k in keys if k.endswith(("/acc", "/acc_norm"))})
    return ppl, [f"{t}/acc_norm" if f"{t}/acc_norm" in keys else f"{t}/acc" for t in tasks]


def pruning_tokens(rec: RunRecord) -> float:
    """Forward + backward tokens of the selection when it was computed + forward tokens of the compensation."""
    scoring = rec.original_scoring or {}
    compensate = ((rec.timings or {}).get("cost") or {}).get("compensate") or {}
    return (num(scoring.get("forward_tokens", 0)) + num(scoring.get("backward_tokens", 0))
            + num(compensate.get("forward_tokens", 0)))


def pruning_seconds(rec: RunRecord) -> float:
    """The selection's time when it was computed + prune + compensate (the run's own time if not recorded)."""
    seconds = rec.pruning_seconds_original
    return num(seconds if seconds is not None else (rec.timings or {}).get("pruning_seconds"))


def protocol(records: list[RunRecord]) -> str:
    """What every number was measured on: held-out texts (corpus, split, tokens), calibration budgets, seeds, tasks."""
    texts, budgets, seeds, tasks = {}, set(), set(), {}
    for rec in records:
        for name, t in (rec.heldout or {}).items():
            texts[name] = f"`{name}` ({t['corpus']} corpus, {t['split']} split, {t['tokens']:,} tokens)"
        cal = rec.calibration or {}
        if cal:
            budgets.add(f"{cal.get('num_samples')} x {cal.get('seq_len')} = {cal.get('tokens'):,} tokens "
                        f"({cal.get('split', 'calib')} split)")
        seeds.add(rec.config.get("seed"))
        lm = (rec.config.get("eval") or {}).get("lm_eval") or {}
        for task in lm.get("tasks") or []:
            tasks.setdefault(task, set()).add(lm.get("limit"))
    lines = ["Held-out text: " + ("; ".join(texts[k] for k in sorted(texts)) or "none recorded (old records)"),
             "Calibration: " + ("; ".join(sorted(budgets)) or "?"),
             "Seeds: " + ", ".join(str(s) for s in sorted(seeds, key=str))]
    if tasks:
        lines.append("Tasks: " + "; ".join(
            f"{t} ({', '.join('all' if n is None else f'{n} questions' for n in sorted(limits, key=str))})"
            for t, limits in sorted(tasks.items())))
    return "\n".join(f"- {line}" for line in lines)


def print_written(text: str, notes: list[str], files: list[Path]) -> None:
    """What a report command prints when it is done: its table or summary, one line per note, the files written."""
    print(text)
    for note in notes:
        print(f"note: {note}")
    print("wrote:\n" + "\n".join(f"  {f}" for f in files))
