"""experiments.frontier on hand-written records with known numbers; the frontier experiment's documented commands."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import hydra.utils
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import run  # noqa: F401  (registers the `split` resolver)
from experiments.frontier import affordable, build_frontier, cost_caps, main, pareto_front, ppl_columns
from experiments.records import load_records
from gradmap.metric import LayerMetric

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
WIKI, NEWS = "ppl@128/wiki_test", "ppl@128/news_test"
DENSE = {WIKI: 25.0, NEWS: 40.0}


# ------------------------------------------------------------------------------------------------- pareto_front

def test_pareto_front_hand_checked():
    points = [(1, 10), (2, 8), (2, 9), (3, 8), (4, 5), (4, 5), (5, 6), (0, 100), (math.nan, 1), (6, math.inf),
              (7, 4)]
    # (2, 9): same cost as (2, 8), worse. (3, 8): costlier than (2, 8), no better. (5, 6): dominated by (4, 5).
    # (4, 5) twice: identical points, both kept. NaN / inf: ignored. (0, 100): cheapest of all, so optimal.
    assert pareto_front(points) == [7, 0, 1, 4, 5, 10]
    assert pareto_front([]) == []
    assert pareto_front([(3, 3)]) == [0]
    assert pareto_front([(1, 5), (1, 5), (1, 6)]) == [0, 1]  # equal cost: the lower loss wins, ties both stay
    assert pareto_front([(2, 5), (1, 5)]) == [1]  # equal loss: the cheaper wins


def test_pareto_front_takes_any_iterable_and_is_pure():
    points = [[3.0, 1.0], [1.0, 3.0], [2.0, 2.0], [2.5, 2.5]]
    assert pareto_front(iter(points)) == [1, 2, 0]
    assert points == [[3.0, 1.0], [1.0, 3.0], [2.0, 2.0], [2.5, 2.5]]


# -------------------------------------------------------------------------------------------------- the table

def write_record(root: Path, folder: str, metric: str, compensation: str, samples: int, seed: int,
                 wiki: float, news: float, scoring_tokens: tuple[int, int], comp_tokens: int, seconds: float,
                 metric_cfg: dict | None = None, status: str = "done", removed: list[int] | None = None) -> None:
    """A record.json as gradmap.runner writes it (calibration.seed interpolates the seed, as in the real config),
    reduced to what the reports read."""
    rec = {
        "status": status, "finished": "2025-01-01T12:00:00+0000",
        "choices": {"model": "smollm2_135m", "metric": metric, "compensation": compensation,
                    "calibration": "wiki_offline", "eval": "offline", "logger": "none"},
        "config": {"prune_ratio": 0.25, "num_prune": None, "seed": seed,
                   "metric": {"_target_": f"x.{metric}", **(metric_cfg or {})},
                   "compensation": {"_target_": f"y.{compensation}"},
                   "calibration": {"source": "offline_wiki", "num_samples": samples, "seq_len": 128,
                                   "batch_size": 8, "seed": seed}},
        "num_layers": 30, "num_prune": 8, "prune_ratio": 0.25,
        "removed_layers": list(range(8)) if removed is None else removed,
        "original_scoring": {"seconds": seconds - 1, "forward_tokens": scoring_tokens[0],
                             "backward_tokens": scoring_tokens[1]},
        "pruning_seconds_original": seconds,
        "timings": {"pruning_seconds": 999.0,
                    "cost": {"compensate": {"forward_tokens": comp_tokens, "backward_tokens": 0}}},
        "results": {"headline": {"dense": DENSE, "pruned": {WIKI: wiki, NEWS: news}}},
        "heldout": {"wiki_test": {"corpus": "wiki", "split": "test", "tokens": 8192},
                    "news_test": {"corpus": "news", "split": "test", "tokens": 8192}},
        "calibration": {"num_samples": samples, "seq_len": 128, "tokens": samples * 128, "split": "calib"},
    }
    path = root / folder / "record.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "frontier" / "smollm2_135m"
    one_shot, iterative = {"iterative": False}, {"iterative": True}
    # gradmap one-shot at 8 x 128 (1,024 tokens): 3 seeds, wiki 60/70/80 (mean 70, sd 10), news 90/100/110.
    # Removed sets {0..7}, {0..7}, {1..8}: pairwise Jaccard 1, 7/9, 7/9.
    for seed, (wiki, news) in enumerate([(60.0, 90.0), (70.0, 100.0), (80.0, 110.0)]):
        write_record(root, f"os8_{seed}", "gradmap", "none", 8, seed, wiki, news, (1024, 1024), 0, 4.0 + seed,
                     one_shot, removed=list(range(8)) if seed < 2 else list(range(1, 9)))
    # gradmap one-shot at 32 x 128: 2 seeds, wiki 50/54 (mean 52, sd 2*sqrt(2)); cost 8,192 scoring tokens.
    for seed, wiki in enumerate([50.0, 54.0]):
        write_record(root, f"os32_{seed}", "gradmap", "none", 32, seed, wiki, 80.0, (4096, 4096), 0, 10.0,
                     one_shot)
    # gradmap one-shot + projection at 8 x 128: compensation tokens count too (2,048 + 6,144 = 8,192).
    for seed in range(3):
        write_record(root, f"osp8_{seed}", "gradmap", "projection", 8, seed, 52.0, 70.0, (1024, 1024), 6144, 15.0,
                     one_shot)
    # gradmap iterative at 8 x 128: 16,384 tokens, worse than one-shot + projection at 8,192: dominated.
    for seed in range(3):
        write_record(root, f"it8_{seed}", "gradmap", "none", 8, seed, 90.0, 95.0, (8192, 8192), 0, 35.0, iterative)
    # bi at 8 x 128: 1,024 tokens, wiki 75: the cheapest non-free point, on the front.
    for seed in range(3):
        write_record(root, f"bi8_{seed}", "bi", "none", 8, seed, 75.0, 60.0, (1024, 0), 0, 2.0)
    # sleb at 8 x 128, one seed: 217,088 tokens, wiki 40: the best, on the front.
    write_record(root, "sleb8_0", "sleb", "none", 8, 0, 40.0, 65.0, (217088, 0), 0, 330.0)
    # random: free (0 tokens), very bad: on the front (nothing is cheaper).
    for seed in range(3):
        write_record(root, f"rnd8_{seed}", "random", "none", 8, seed, 5000.0, 9000.0, (0, 0), 0, 0.0)
    write_record(root, "failed", "sleb", "none", 32, 0, 0.0, 0.0, (0, 0), 0, 0.0, status="failed")
    return root


def frow(table, metric, compensation, budget):
    hit = table[(table.metric == metric) & (table.compensation == compensation) & (table.budget_tokens == budget)]
    assert len(hit) == 1, (metric, compensation, budget, list(table.metric))
    return hit.iloc[0]


def test_table_means_sds_costs_and_budget(sweep):
    records, notes = load_records([sweep])
    assert any("failed" in n for n in notes)
    ppl = ppl_columns(records)
    assert ppl == [NEWS, WIKI]
    table = build_frontier(records, ppl, "tokens")
    # the budget is a column, not part of the label; the seed never is; the iterative flag is
    assert set(table.metric) == {"gradmap [iterative=false]", "gradmap [iterative=true]", "bi", "sleb", "random"}
    assert len(table) == 7
    os8 = frow(table, "gradmap [iterative=false]", "none", 1024)
    assert os8["seeds"] == 3 and os8["calib_samples"] == 8 and os8["calib_seq_len"] == 128
    assert os8[WIKI] == pytest.approx(70.0) and os8[f"{WIKI} sd"] == pytest.approx(10.0)
    assert os8[NEWS] == pytest.approx(100.0) and os8[f"{NEWS} sd"] == pytest.approx(10.0)
    assert os8["pruning_tokens"] == 2048
    assert os8["pruning_seconds"] == pytest.approx(5.0)  # mean of 4, 5, 6 (pruning_seconds_original)
    assert os8["removed_jaccard"] == pytest.approx((1 + 7 / 9 + 7 / 9) / 3)  # how alike the seeds' removed sets are
    os32 = frow(table, "gradmap [iterative=false]", "none", 4096)
    assert os32["seeds"] == 2 and os32[WIKI] == pytest.approx(52.0)
    assert os32[f"{WIKI} sd"] == pytest.approx(2 * math.sqrt(2))
    assert os32["pruning_tokens"] == 8192
    assert frow(table, "gradmap [iterative=false]", "projection", 1024)["pruning_tokens"] == 1024 + 1024 + 6144
    sleb = frow(table, "sleb", "none", 1024)
    assert sleb["seeds"] == 1 and math.isnan(sleb[f"{WIKI} sd"]) and math.isnan(sleb["removed_jaccard"])
    # Pareto on wiki with tokens (cost, ppl): random (0, 5000), bi (1,024, 75), one-shot @ 8 (2,048, 70), one-shot +
    # projection @ 8 (8,192, 52) and one-shot @ 32 (8,192, 52: identical, both stay), sleb (217,088, 40).
    # Dominated: iterative (16,384, 90).
    front = table[table[f"{WIKI} pareto"]]
    assert set(zip(front.metric, front.compensation, front.budget_tokens)) == {
        ("random", "none", 1024), ("bi", "none", 1024), ("gradmap [iterative=false]", "none", 1024),
        ("gradmap [iterative=false]", "projection", 1024), ("gradmap [iterative=false]", "none", 4096),
        ("sleb", "none", 1024)}
    # news (cost, ppl): random (0, 9000), bi (1,024, 60), the rest is worse than bi at a higher cost
    news_front = table[table[f"{NEWS} pareto"]]
    assert set(news_front.metric) == {"random", "bi"}
    assert list(table.columns)[-2:] == [f"{NEWS} pareto", f"{WIKI} pareto"]


def test_pareto_by_seconds_and_best_affordable(sweep):
    records, _ = load_records([sweep])
    table = build_frontier(records, [WIKI], "seconds")
    front = table[table[f"{WIKI} pareto"]]
    # seconds: random 0, bi 2, one-shot@8 5 (70), one-shot@32 10 (52), one-shot+proj 15 (52: dominated by the 10 s
    # row now), sleb 330 (40)
    assert sorted(front.pruning_seconds) == [0.0, 2.0, 5.0, 10.0, 330.0]
    best = affordable(build_frontier(records, [WIKI], "tokens"), WIKI, "tokens")
    # caps 0, 2,000, 5,000, 10,000, ..., 500,000 tokens; listed where the best changes
    assert [(b["cap"], b["method"], b["mean"], b["seeds"]) for b in best] == [
        (0, "random + none @ 8 x 128", 5000.0, 3),
        (2000, "bi + none @ 8 x 128", 75.0, 3),  # one-shot costs 2,048 > 2,000
        (5000, "gradmap [iterative=false] + none @ 8 x 128", pytest.approx(70.0), 3),
        (10000, "gradmap [iterative=false] + none @ 32 x 128", pytest.approx(52.0), 2),  # tie at 8,192: label order
        (500000, "sleb + none @ 8 x 128", 40.0, 1)]
    assert best[2]["sd"] == pytest.approx(10.0) and best[2]["cost"] == 2048


def test_cost_caps():
    assert cost_caps([0, 1024, 2048, 217088]) == [0, 2000, 5000, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5]
    assert cost_caps([1000.0]) == [1000]
    assert cost_caps([2.5, 330.0, math.nan]) == [5, 10, 20, 50, 100, 200, 500]
    assert cost_caps([]) == []


def test_cli_writes_csv_md_png(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "best method with pruning cost <= cap" in printed and "wrote:" in printed
    csv = (out / "results.csv").read_text().splitlines()
    assert csv[0].split(",")[:8] == ["model", "prune_ratio", "metric", "compensation", "budget_tokens",
                                     "calib_samples", "calib_seq_len", "seeds"]
    assert len(csv) == 1 + 7
    md = (out / "results.md").read_text()
    assert md.startswith("# Quality versus pruning cost\n\n```\npython -m experiments.frontier ")
    assert "test split" in md and "wiki_test" in md and "news_test" in md  # the protocol names texts and split
    assert "8 x 128 = 1,024 tokens" in md and "Seeds: 0, 1, 2" in md
    assert "70.00 ± 10.00 ★" in md  # one-shot @ 8 x 128 on wiki, on the front
    assert "## Best method affordable at each pruning cost" in md and "## Notes" in md
    assert "sleb + none @ 8 x 128 (smollm2_135m, ratio 0.25) has 1 seed(s)" in md
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_text_and_cost_options(sweep, tmp_path):
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out), "--text", "wiki_test", "--cost", "seconds"]) == 0
    md = (out / "results.md").read_text()
    assert "--text wiki_test --cost seconds" in md.splitlines()[3]
    assert "`ppl@128/wiki_test`" in md and "`ppl@128/news_test`" not in md
    assert "ppl@128/news_test" not in (out / "results.csv").read_text()


def test_compensation_filter(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out), "--compensation", "none"]) == 0
    table = pd.read_csv(out / "results.csv")
    assert set(table.compensation) == {"none"} and len(table) == 6  # the projection row is left out
    text = (out / "results.md").read_text()
    assert "3 finished run(s) with another compensation left out (--compensation none)" in text
    assert main([str(sweep), "--out", str(tmp_path / "r2"), "--compensation", "replaceme"]) == 2
    assert "--compensation replaceme not in the records; available: none, projection" in capsys.readouterr().err


def test_no_records_exits_2_with_one_line(tmp_path):
    empty = tmp_path / "empty_sweep"
    empty.mkdir()
    done = subprocess.run([sys.executable, "-m", "experiments.frontier", str(empty), "--out", str(tmp_path / "r")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: no record.json found")
    assert "empty_sweep" in done.stderr and not (tmp_path / "r").exists()


def test_unknown_text_exits_2(sweep, tmp_path, capsys):
    assert main([str(sweep), "--out", str(tmp_path / "r"), "--text", "c4_test"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --text 'c4_test' not in the records; available:") and "wiki_test" in err


# ---------------------------------------------------------------------------------- the experiment's commands

def header_commands() -> list[list[str]]:
    """The command-line overrides of every `python run.py -m experiment=frontier ...` line in the YAML header."""
    text = (CONF / "experiment" / "frontier.yaml").read_text()
    lines = [line for line in text.splitlines() if line.startswith("#")]
    return [m.group(1).split() for line in lines
            if (m := re.search(r"python run\.py -m experiment=frontier((?: \S+)*)\s*$", line))]


def jobs_of(args: list[str]) -> list[list[str]]:
    """The jobs Hydra's basic sweeper launches: the YAML's sweep axes, replaced by command-line ones of the same key
    (its own `split_arguments`, so this follows Hydra)."""
    params = OmegaConf.load(CONF / "experiment" / "frontier.yaml").hydra.sweeper.params
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + args)
    return BasicSweeper.split_arguments(overrides, None)[0]


def test_every_documented_command_composes_and_the_design_is_covered():
    commands = header_commands()
    sweep_dir = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / "frontier.yaml").hydra.sweep)["dir"]
    assert sweep_dir == "multirun/frontier/${hydra.runtime.choices.model}"  # one folder for every command
    assert commands[0] == [] and len(commands) == 12  # the sweep itself, six more, five supplement commands
    seen: dict[tuple[str, int], set[int]] = {}
    comps_seen: dict[tuple[str, int], set[str]] = {}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for args in commands:
            for job in jobs_of(args):
                cfg = compose("config", overrides=["experiment=frontier", *job])
                assert isinstance(hydra.utils.instantiate(cfg.metric), LayerMetric), job
                hydra.utils.instantiate(cfg.compensation)
                assert cfg.tuning is False and list(cfg.eval.lm_eval.tasks) == []
                assert {t.split for t in cfg.eval.heldout.texts.values()} == {"test"}
                assert cfg.prune_ratio == 0.25 and cfg.calibration.seq_len == 128
                choice = dict(o.split("=", 1) for o in job)["metric"]
                if choice == "gradmap":
                    choice += "-iterative" if cfg.metric.iterative else "-oneshot"
                if choice == "gradmap_verify":
                    choice += f"-{cfg.metric.candidates}"
                key = (choice, cfg.calibration.num_samples)
                seen.setdefault(key, set()).add(cfg.seed)
                comps_seen.setdefault(key, set()).add(cfg.compensation._target_.rsplit(".", 1)[1])
    three = {0, 1, 2}
    for metric in ("bi", "taylor", "streamline", "angular", "random", "gradmap-oneshot"):
        assert all(seen[(metric, n)] == three for n in (8, 32, 128)), metric
    for metric in ("gradmap-iterative", "ppl", "gradmap_verify-2"):
        assert seen[(metric, 8)] == seen[(metric, 32)] == three and seen[(metric, 128)] == {0}, metric
    for metric in ("gradmap_verify-4", "gradmap_verify-8", "sleb"):
        assert seen[(metric, 8)] == three and seen[(metric, 32)] == {0}, metric
    assert len(seen) == 6 * 3 + 3 * 3 + 3 * 2
    assert all(c == {"NoCompensation", "ProjectionCompensation"} for c in comps_seen.values())
