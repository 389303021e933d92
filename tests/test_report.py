"""experiments.report on hand-written records with known numbers: table values, notes, files, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.report import NoRecordsError, build_table, load_records, main, to_latex, to_markdown

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2_135m"
# Dense: task_a has acc and acc_norm (the table must use acc_norm), task_b only acc.
DENSE = {"ppl@128": 20.0, "task_a/acc": 0.5, "task_a/acc_norm": 0.6, "task_b/acc": 0.4}


def write_record(root: Path, folder: str, metric: str, compensation: str, ratio: float, ppl: float,
                 a_norm: float, b_acc: float, seconds: float, finished: str = "2025-01-01T12:00:00+0000",
                 status: str = "done", metric_cfg: dict | None = None, seed: int = 0,
                 a_norm_stderr: float | None = None, compensation_report: dict | None = None) -> None:
    """A record.json as gradmap.runner writes it, reduced to what the report reads (`compensation_report`: the
    record's `compensation` field, what the compensation stage reported)."""
    pruned = {"ppl@128": ppl, "task_a/acc": a_norm - 0.05, "task_a/acc_norm": a_norm, "task_b/acc": b_acc}
    rec = {
        "status": status, "finished": finished,
        "choices": {"model": MODEL, "metric": metric, "compensation": compensation, "calibration": "tiny",
                    "eval": "tiny", "logger": "none"},
        "config": {"prune_ratio": ratio, "num_prune": None, "seed": seed, "metric": metric_cfg or {"name": metric},
                   "compensation": {"name": compensation}, "calibration": {"num_samples": 8}},
        "num_layers": 6, "num_prune": round(ratio * 6), "prune_ratio": ratio, "removed_layers": [2, 3],
        "selection": {"decisions": [{"step": 0, "scores": [6.0, 5.0, 1.0, 2.0, 4.0, None], "removed": [2]}]},
        "original_scoring": {"seconds": seconds - 1, "forward_tokens": 1000, "backward_tokens": 500},
        "pruning_seconds_original": seconds,
        "timings": {"pruning_seconds": 999.0, "cost": {"compensate": {"forward_tokens": 64, "backward_tokens": 0}}},
        "results": {"headline": {"dense": DENSE, "pruned": pruned}},
        "heldout": {"wiki_test": {"corpus": "wiki", "split": "test", "tokens": 8192}},
        "calibration": {"num_samples": 8, "seq_len": 128, "tokens": 1024, "split": "calib"},
    }
    if compensation_report is not None:
        rec["compensation"] = compensation_report
    if a_norm_stderr is not None:
        rec["results"]["pruned"] = {"lm_eval": {"task_a": {"acc_norm": a_norm, "acc_norm_stderr": a_norm_stderr}}}
    if status == "failed":
        rec = {k: rec[k] for k in ("status", "choices", "config")}
        rec["error"] = {"type": "RuntimeError", "message": "out of memory"}
    path = root / folder / "record.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    write_record(root, "0_a", "gradmap", "projection", 0.25, 30.0, 0.45, 0.30, 10.0)
    write_record(root, "1_b", "gradmap", "none", 0.25, 40.0, 0.30, 0.20, 8.0)
    write_record(root, "2_c", "bi", "projection", 0.25, 50.0, 0.36, 0.36, 4.0)
    write_record(root, "3_d", "bi", "none", 0.25, 60.0, 0.24, 0.24, 2.0)
    write_record(root, "4_e", "gradmap", "projection", 0.5, 80.0, 0.30, 0.20, 12.0)
    write_record(root, "5_f", "bi", "none", 0.5, 0, 0, 0, 1.0, status="failed")
    # An older run of job 0_a (e.g. before a code fix): must be dropped in favour of the newer one.
    write_record(root / "older", "0_a", "gradmap", "projection", 0.25, 99.0, 0.1, 0.1, 50.0,
                 finished="2024-12-31T12:00:00+0000")
    return root


def row(table, metric, compensation, ratio):
    hit = table[(table.metric == metric) & (table.compensation == compensation) & (table.prune_ratio == ratio)]
    assert len(hit) == 1
    return hit.iloc[0]


def test_table_values(sweep):
    records, notes = load_records([sweep])
    table, _ = build_table(records)
    assert list(table.columns) == ["model", "prune_ratio", "metric", "compensation", "runs", "ppl@128",
                                   "task_a/acc_norm", "task_b/acc", "task_avg", "retained_pct",
                                   "pruning_seconds", "pruning_tokens", "speedup"]
    # dense row first, then sorted by ratio, metric, compensation; the failed job is not there
    assert list(zip(table.prune_ratio, table.metric, table.compensation)) == [
        (0.0, "dense", ""), (0.25, "bi", "none"), (0.25, "bi", "projection"), (0.25, "gradmap", "none"),
        (0.25, "gradmap", "projection"), (0.5, "gradmap", "projection")]
    dense = row(table, "dense", "", 0.0)
    assert dense["ppl@128"] == 20.0 and dense["task_avg"] == pytest.approx(0.5) and dense["retained_pct"] == 100.0
    a = row(table, "gradmap", "projection", 0.25)  # the newer of the duplicates
    assert a["ppl@128"] == 30.0 and a["runs"] == 1
    assert a["task_avg"] == pytest.approx((0.45 + 0.30) / 2)
    assert a["retained_pct"] == pytest.approx((0.45 / 0.6 + 0.30 / 0.4) / 2 * 100)  # 75
    assert a["pruning_seconds"] == 10.0  # pruning_seconds_original, not timings.pruning_seconds
    assert a["pruning_tokens"] == 1000 + 500 + 64
    # speedup: slowest method of the same ratio (gradmap+projection, 10 s) / own time
    assert [row(table, m, c, 0.25)["speedup"] for m, c in
            [("gradmap", "projection"), ("gradmap", "none"), ("bi", "projection"), ("bi", "none")]] == \
        pytest.approx([1.0, 1.25, 2.5, 5.0])
    assert row(table, "gradmap", "projection", 0.5)["speedup"] == 1.0  # alone in its ratio group
    assert any("failed" in n and "5_f" in n and "out of memory" in n for n in notes)
    assert any("duplicate" in n and "older" in n for n in notes)


def test_training_time_column_only_when_a_run_trained(sweep, tmp_path):
    table, _ = build_table(load_records([sweep])[0])
    assert "train_seconds" not in table.columns  # nothing trained in this sweep
    write_record(sweep, "6_g", "bi", "streamline_layer", 0.25, 45.0, 0.4, 0.3, 7.0,
                 compensation_report={"train_seconds": 5.5, "sites": []})
    table, _ = build_table(load_records([sweep])[0])
    assert row(table, "bi", "streamline_layer", 0.25)["train_seconds"] == 5.5
    assert math.isnan(row(table, "bi", "projection", 0.25)["train_seconds"])  # did not train
    assert list(table.columns).index("train_seconds") == list(table.columns).index("pruning_seconds") + 1


def test_folds_undone_column_counts_the_guards_reverts(sweep):
    assert "folds_undone" not in build_table(load_records([sweep])[0])[0].columns  # no run reports a guard
    sites = [{"original_layer": 12}, {"original_layer": 20}]
    for folder, seed, undone in [("6_g", 0, [12, 20]), ("7_h", 1, [])]:
        write_record(sweep, folder, "sleb", "projection", 0.25, 45.0, 0.4, 0.3, 7.0, seed=seed,
                     compensation_report={"sites": sites, "guard": "final_error", "sites_undone": undone})
    write_record(sweep, "8_i", "sleb", "replaceme", 0.25, 45.0, 0.4, 0.3, 7.0,  # guard=none: nothing was checked
                 compensation_report={"sites": sites, "guard": "none", "sites_undone": []})
    table, _ = build_table(load_records([sweep])[0])
    assert row(table, "sleb", "projection", 0.25)["folds_undone"] == 1.0  # 2 of 2, then 0 of 2: mean 1 per run
    assert math.isnan(row(table, "sleb", "replaceme", 0.25)["folds_undone"])  # not 0: no guard ran
    assert math.isnan(row(table, "gradmap", "projection", 0.25)["folds_undone"])  # its report has no guard
    assert "| folds undone |" in to_markdown(table)


def test_baseline_speedup(sweep):
    table, notes = build_table(load_records([sweep])[0], baseline="bi+none")
    assert row(table, "gradmap", "projection", 0.25)["speedup"] == pytest.approx(2 / 10)
    assert row(table, "bi", "none", 0.25)["speedup"] == pytest.approx(1.0)
    assert any("baseline 'bi+none' not found" in n and "0.5" in n for n in notes)  # bi+none failed at 0.5
    table, _ = build_table(load_records([sweep])[0], baseline="bi")  # a metric name: its slowest row (4 s)
    assert row(table, "gradmap", "projection", 0.25)["speedup"] == pytest.approx(0.4)


def test_variants_of_one_choice_are_separate_rows(tmp_path):
    for i, reduction in enumerate(["l2", "mean_abs"]):
        write_record(tmp_path, f"{i}", "gradmap", "projection", 0.25, 30.0 + i, 0.4, 0.3, 5.0,
                     metric_cfg={"name": "gradmap", "reduction": reduction})
    records, notes = load_records([tmp_path])
    table, _ = build_table(records)
    assert set(table.metric) == {"dense", "gradmap [reduction=l2]", "gradmap [reduction=mean_abs]"}
    assert not any("duplicate" in n for n in notes)


def test_markdown_and_latex(sweep):
    table, _ = build_table(load_records([sweep])[0])
    md = to_markdown(table).splitlines()
    assert len(md) == 2 + len(table) and md[0].startswith("| model | ratio |")
    assert "| smollm2_135m | 0.25 | gradmap | projection | 1 | 30.00 | 0.450 | 0.300 | 0.375 | 75.0 | 10.0 |" \
        in to_markdown(table)
    tex = to_latex(table)
    assert "\\toprule" in tex and "\\bottomrule" in tex and "task\\_a/acc\\_norm" in tex and "retained \\%" in tex


def test_cli_writes_all_files(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| smollm2_135m |" in printed and "wrote:" in printed
    for name in ("results.md", "results.csv", "results.tex", "importance_heatmap.png", "ppl_vs_ratio.png",
                 "pruning_time.png"):
        assert (out / name).stat().st_size > 0, name
        assert str(out / name) in printed
    assert (out / "importance_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Notes" in (out / "results.md").read_text()
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 6


def test_wandb_mirror(sweep, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no login or network; the run is written under --out
    assert main([str(sweep), "--out", str(tmp_path / "report"), "--wandb"]) == 0
    assert list((tmp_path / "report" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty_sweep"
    empty.mkdir()
    with pytest.raises(NoRecordsError, match="no record.json found.*empty_sweep"):
        load_records([empty])
    assert main([str(empty), "--out", str(tmp_path / "out")]) == 2
    assert "empty_sweep" in capsys.readouterr().err
    with pytest.raises(NoRecordsError, match="not a folder"):
        load_records([tmp_path / "missing"])


def test_module_entry_point(sweep, tmp_path):
    done = subprocess.run([sys.executable, "-m", "experiments.report", str(sweep), "--out", str(tmp_path / "r")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r" / "results.md").exists()


def test_seeds_are_averaged_with_their_spread(tmp_path):
    root = tmp_path / "sweep"
    for seed, (ppl, a_norm, se) in enumerate([(30.0, 0.40, 0.020), (40.0, 0.50, 0.022), (50.0, 0.60, 0.024)]):
        write_record(root, f"{seed}_gradmap", "gradmap", "none", 0.25, ppl, a_norm, 0.3, 10.0, seed=seed,
                     a_norm_stderr=se)
    records, _ = load_records([root])
    assert len(records) == 3  # one per seed, none dropped as duplicates
    table, _ = build_table(records)
    r = row(table, "gradmap", "none", 0.25)
    assert r["runs"] == 3 and r["ppl@128"] == pytest.approx(40.0)
    assert r["ppl@128 sd"] == pytest.approx(10.0)  # sample standard deviation over the 3 seeds
    assert r["task_a/acc_norm"] == pytest.approx(0.5) and r["task_a/acc_norm se"] == pytest.approx(0.022)
    markdown = to_markdown(table)
    assert "40.00 ± 10.00" in markdown and "0.500 ± 0.022" in markdown
    assert "sd" not in markdown.splitlines()[0]  # spread folded into the value's cell, not a column of its own
    assert r"$\pm$" in to_latex(table)


def test_calibration_seed_does_not_split_the_seeds(tmp_path):
    """The runner records `calibration.seed` (it interpolates `${seed}`): it is the seed axis that the table averages
    over, not a metric variant, so three seeds are one row of runs=3 (a multi-seed sweep used to give three rows)."""
    for seed, ppl in enumerate([30.0, 40.0, 50.0]):
        write_record(tmp_path, f"{seed}", "gradmap", "none", 0.25, ppl, 0.4, 0.3, 10.0, seed=seed)
        path = tmp_path / f"{seed}" / "record.json"
        rec = json.loads(path.read_text())
        rec["config"]["calibration"] = {"num_samples": 8, "seq_len": 128, "seed": seed}
        path.write_text(json.dumps(rec))
    table, _ = build_table(load_records([tmp_path])[0])
    r = row(table, "gradmap", "none", 0.25)
    assert r["runs"] == 3 and r["ppl@128"] == pytest.approx(40.0)


def test_dense_row_merges_a_perplexity_sweep_with_an_accuracy_sweep(tmp_path):
    """paper_main (perplexity only) + paper_accuracy (accuracy too): the dense row shows the dense accuracy even when
    the newest record has none, and no 'differ' note is written for columns that agree."""
    root = tmp_path / "sweeps"
    write_record(root, "acc", "gradmap", "none", 0.25, 40.0, 0.30, 0.20, 8.0, finished="2025-01-01T12:00:00+0000")
    write_record(root, "ppl", "bi", "none", 0.25, 60.0, 0.24, 0.24, 2.0, finished="2025-01-02T12:00:00+0000")
    path = root / "ppl" / "record.json"
    rec = json.loads(path.read_text())
    rec["results"]["headline"] = {"dense": {"ppl@128": 20.0}, "pruned": {"ppl@128": 60.0}}
    path.write_text(json.dumps(rec))
    table, notes = build_table(load_records([root])[0])
    dense = table[table.metric == "dense"].iloc[0]
    assert dense["ppl@128"] == 20.0 and dense["task_a/acc_norm"] == 0.6 and dense["task_b/acc"] == 0.4
    assert not any("differ" in n for n in notes)
    # a dense value that really differs (other eval settings) is still reported, naming the column
    rec["results"]["headline"]["dense"]["ppl@128"] = 21.0
    path.write_text(json.dumps(rec))
    table, notes = build_table(load_records([root])[0])
    assert table[table.metric == "dense"].iloc[0]["ppl@128"] == 21.0  # the newest
    assert any(n.startswith("dense ppl@128 of smollm2_135m differ") for n in notes)


def test_duplicate_keeps_the_accuracy_of_the_same_pruned_model(tmp_path):
    """An accuracy sweep's record and a later rerun of the perplexity sweep of the same job (configs equal but for
    `eval`, same removed layers): the newest is kept with the older one's task carried over; a different pruned model
    carries nothing."""
    root = tmp_path / "multirun"
    write_record(root / "accuracy", "0", "gradmap", "none", 0.25, 40.0, 0.30, 0.20, 8.0, a_norm_stderr=0.02,
                 finished="2025-01-01T10:00:00+0000")
    write_record(root / "main", "0", "gradmap", "none", 0.25, 41.0, 0.30, 0.20, 8.0,
                 finished="2025-01-01T12:00:00+0000")
    for folder, when in (("accuracy", "10"), ("main", "12")):  # the rerun evaluated perplexity only
        path = root / folder / "0" / "record.json"
        rec = json.loads(path.read_text())
        rec["config"]["eval"] = {"lm_eval": {"tasks": ["task_a"] if folder == "accuracy" else []}}
        if folder == "main":
            rec["results"]["headline"]["pruned"] = {"ppl@128": 41.0}
            rec["results"]["headline"]["dense"] = {"ppl@128": 20.0}
        path.write_text(json.dumps(rec))
    records, notes = load_records([root])
    assert len(records) == 1 and any("task_a carried over" in n for n in notes)
    table, _ = build_table(records)
    r = row(table, "gradmap", "none", 0.25)
    assert r["ppl@128"] == 41.0 and r["task_a/acc_norm"] == pytest.approx(0.30)
    assert r["task_a/acc_norm se"] == pytest.approx(0.02)

    other = json.loads((root / "accuracy" / "0" / "record.json").read_text())
    other["removed_layers"] = [1, 2]  # another pruned model: nothing carried
    (root / "accuracy" / "0" / "record.json").write_text(json.dumps(other))
    records, notes = load_records([root])
    assert not any("carried" in n for n in notes)
    assert "task_a/acc_norm" not in build_table(records)[0].columns
