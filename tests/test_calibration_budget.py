"""experiments.calibration_budget: the stability numbers on hand-made sets, and an end-to-end run on the tiny model
whose second run reads every selection from the cache."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from experiments.calibration_budget import main, parse_metric
from experiments.stability import jaccard, mean_jaccard, stability

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "tiny_text.jsonl"


def test_stability_numbers():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(2 / 4)
    same = stability([{1, 2}, {1, 2}, {1, 2}])
    assert same == {"mean_jaccard": 1.0, "distinct_sets": 1, "removed_by_every_seed": [1, 2]}
    mixed = stability([{1, 2}, {1, 3}, {1, 2}])
    assert mixed["mean_jaccard"] == pytest.approx((1 / 3 + 1.0 + 1 / 3) / 3)
    assert mixed["distinct_sets"] == 2 and mixed["removed_by_every_seed"] == [1]
    assert jaccard(set(), set()) == 1.0 and math.isnan(mean_jaccard([{1, 2}]))  # one seed: no pair, no number


def test_parse_metric():
    assert parse_metric("bi") == ("bi", ["metric=bi"])
    assert parse_metric("g1=gradmap,metric.iterative=false") == ("g1", ["metric=gradmap", "metric.iterative=false"])


def test_end_to_end_on_the_tiny_model_and_cache_reuse(tmp_path, capsys):
    args = ["--model", "tiny_random", "--metrics", "bi", "gradmap-oneshot=gradmap,metric.iterative=false",
            "--samples", "2", "4", "--seq-len", "16", "--seeds", "0", "1", "--limit", "bi=2",
            "--out", str(tmp_path / "out"),
            "--override", "calibration=tiny", f"calibration.path={TEXT}", f"cache_dir={tmp_path / 'cache'}"]
    assert main(args) == 0
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    # bi capped at 2 samples; gradmap one-shot at both budgets
    assert list(zip(table.metric, table.samples)) == [("bi", 2), ("gradmap-oneshot", 2), ("gradmap-oneshot", 4)]
    assert (table.seeds == 2).all() and (table.layers_removed == 2).all()  # 25% of 6 layers, rounded half up
    assert table.mean_jaccard.between(0, 1).all()
    assert (tmp_path / "out" / "results.md").read_text().startswith("# Stability")
    assert (tmp_path / "out" / "stability_vs_budget.png").stat().st_size > 0
    capsys.readouterr()
    assert main(args) == 0  # the second run computes nothing
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[budget]")]
    assert len(lines) == 6 and all("cached" in line for line in lines)
