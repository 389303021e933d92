"""End-to-end runner on the tiny random Llama: record contents, caches, skipping, failure records."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gradmap.cache import dense_cache_key, selection_key
from gradmap.jobs import run
from gradmap.validation import num_to_prune

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "tiny_text.jsonl"
ITERATIVE = "metric.iterative=true"
CHOICES = {"model": "tiny_random", "metric": "gradmap", "compensation": "projection", "calibration": "tiny",
           "eval": "tiny", "logger": "none"}


def make_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=tiny_random", "calibration=tiny", "eval=tiny", "logger=none", f"cache_dir={tmp_path / 'cache'}",
            f"calibration.path={TEXT}", f"eval.heldout.texts.tiny.path={TEXT}", "device=cpu", *overrides])
    return cfg


def test_num_to_prune_rounds_half_up_and_validates():
    assert num_to_prune(30, 0.25, None) == 8  # 7.5 -> 8
    assert num_to_prune(32, 0.25, None) == 8
    assert num_to_prune(30, 0.375, None) == 11  # 11.25 -> 11
    assert num_to_prune(30, 0.25, 3) == 3
    with pytest.raises(ValueError, match="prune_ratio=1.5"):
        num_to_prune(30, 1.5, None)
    with pytest.raises(ValueError, match="allowed: 1..29"):
        num_to_prune(30, None, 30)


def test_run_writes_complete_record(tmp_path):
    out = tmp_path / "job"
    rec = run(make_cfg(tmp_path, "metric.iterative=true"), out, CHOICES)  # the paper's iterative GradMAP
    saved = json.loads((out / "record.json").read_text())
    assert saved["status"] == "done" and rec["status"] == "done"
    assert saved["num_layers"] == 6 and saved["num_prune"] == 2  # floor(0.25 * 6 + 0.5)
    assert len(saved["removed_layers"]) == 2 and len(set(saved["removed_layers"])) == 2
    # Iterative GradMAP: one decision per removed layer, removed layers have no score afterwards.
    decisions = saved["selection"]["decisions"]
    assert len(decisions) == 2
    assert decisions[1]["scores"][decisions[0]["removed"][0]] is None
    assert saved["selection"]["removal_order"][0] == decisions[0]["removed"][0]
    # Timings for every stage, pruning time is their sum, and token costs are counted.
    seconds = saved["timings"]["seconds"]
    for stage in ("load", "calibration", "score", "select", "prune", "compensate", "evaluate"):
        assert stage in seconds and seconds[stage] >= 0
    assert saved["timings"]["pruning_seconds"] == pytest.approx(
        sum(seconds[s] for s in ("score", "select", "prune", "compensate")))
    calib_tokens = saved["calibration"]["tokens"]
    assert saved["timings"]["cost"]["score"]["backward_tokens"] == 2 * calib_tokens
    assert saved["timings"]["cost"]["score"]["forward_tokens"] == 2 * calib_tokens
    assert saved["timings"]["peak_memory"]["score"]["cpu_rss_bytes"] > 0
    # Compensation report, dense and pruned results, retained %.
    comp = saved["compensation"]
    assert comp["final_rel_error_after"] < comp["final_rel_error_before"]
    dense_ppl = saved["results"]["dense"]["perplexity"]["tiny"]
    assert (dense_ppl["corpus"], dense_ppl["split"]) == ("jsonl", "test") and dense_ppl["seq_lens"]["16"]["ppl"] > 1
    assert saved["heldout"] == {"tiny": {"corpus": "jsonl", "split": "test", "tokens": 512}}
    assert saved["calibration"]["split"] == "calib"
    assert "ppl@16/tiny" in saved["results"]["retained_pct"]
    # Environment: package versions and git commit.
    assert saved["environment"]["packages"]["torch"].startswith("2.")
    assert "git_commit" in saved["environment"]
    assert saved["config"]["prune_ratio"] == 0.25 and saved["choices"]["metric"] == "gradmap"
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 6 + 5  # decision 0 scores all 6 layers, decision 1 the 5 left
    assert (out / "scores.png").stat().st_size > 0


def test_second_run_is_skipped_and_sweep_reuses_selection(tmp_path):
    # Iterative GradMAP, whose greedy order a larger n extends (one-shot scores are reused whole).
    cfg = make_cfg(tmp_path, ITERATIVE, "num_prune=1")
    out = tmp_path / "job"
    first = run(cfg, out, CHOICES)
    assert first["selection_source"] == "computed"
    before = (out / "scores.csv").read_text()
    again = run(make_cfg(tmp_path, ITERATIVE, "num_prune=1"), out, CHOICES)
    assert again["status"] == "done" and len(again["reruns_skipped"]) == 1
    assert (out / "scores.csv").read_text() == before
    # A larger n in another folder extends the cached greedy order instead of rescoring from scratch.
    bigger = run(make_cfg(tmp_path, ITERATIVE, "num_prune=2"), tmp_path / "job2", CHOICES)
    assert bigger["selection_source"] == "cache+extended"
    assert bigger["selection"]["removal_order"][0] == first["selection"]["removal_order"][0]
    assert bigger["timings"]["cost"]["score"]["backward_tokens"] == first["calibration"]["tokens"]
    # The smaller n again in a new folder: pure cache hit, nothing scored.
    smaller = run(make_cfg(tmp_path, ITERATIVE, "num_prune=1"), tmp_path / "job3", CHOICES)
    assert smaller["selection_source"] == "cache"
    assert smaller["timings"]["cost"]["score"]["backward_tokens"] == 0
    assert smaller["original_scoring"]["backward_tokens"] == first["calibration"]["tokens"]
    # force=true reruns a finished job.
    forced = run(make_cfg(tmp_path, ITERATIVE, "num_prune=1", "force=true"), out, CHOICES)
    assert not forced["reruns_skipped"]


def test_failed_job_leaves_failed_record(tmp_path):
    out = tmp_path / "job"
    with pytest.raises(ValueError, match="prune_ratio=1.5"):
        run(make_cfg(tmp_path, "prune_ratio=1.5"), out, CHOICES)
    rec = json.loads((out / "record.json").read_text())
    assert rec["status"] == "failed" and "prune_ratio=1.5" in rec["error"]["message"]


def test_cache_keys_track_relevant_config_only(tmp_path):
    base = make_cfg(tmp_path)
    key = selection_key(base, False)
    assert selection_key(make_cfg(tmp_path, "prune_ratio=0.5"), False) == key  # the ratio is not part of the key
    assert selection_key(make_cfg(tmp_path, "compensation=none"), False) == key
    assert selection_key(make_cfg(tmp_path, "eval.perplexity.batch_size=2"), False) == key
    for change in ("metric.reduction=l2", "calibration.num_samples=2", "seed=1", "model.config.seed=3"):
        assert selection_key(make_cfg(tmp_path, change), False) != key, change
    dkey = dense_cache_key(base, False)
    assert dense_cache_key(make_cfg(tmp_path, "metric.reduction=l2"), False) == dkey
    assert dense_cache_key(make_cfg(tmp_path, "prune_ratio=0.5"), False) == dkey
    assert dense_cache_key(make_cfg(tmp_path, "eval.perplexity.seq_lens=[8]"), False) != dkey
    assert dense_cache_key(make_cfg(tmp_path, "model.config.seed=3"), False) != dkey
    # The seed matters only when lm-eval runs (eval=tiny is perplexity only): one dense evaluation per sweep.
    assert dense_cache_key(make_cfg(tmp_path, "seed=1"), False) == dkey
    with_tasks = dense_cache_key(make_cfg(tmp_path, "eval.lm_eval.tasks=[social_iqa_bigbench]"), False)
    assert dense_cache_key(make_cfg(tmp_path, "eval.lm_eval.tasks=[social_iqa_bigbench]", "seed=1"),
                           False) != with_tasks


def test_cache_keys_follow_what_window_bos_resolved_to(tmp_path):
    """`model.window_bos: null` on a family without BOS windows keeps the key the config had before the key
    existed (same computation, caches stay valid); BOS windows or an explicit value give other keys."""
    base = make_cfg(tmp_path)
    legacy = OmegaConf.create(OmegaConf.to_container(base))
    del legacy.model["window_bos"]
    for key in (selection_key, dense_cache_key):
        assert key(base, False) == key(legacy, False)
        assert key(base, True) != key(base, False)
        assert key(make_cfg(tmp_path, "model.window_bos=false"), False) != key(base, False)


def test_corrupt_selection_cache_is_recomputed(tmp_path):
    cfg = make_cfg(tmp_path, "num_prune=1")
    path = tmp_path / "cache" / "selections" / f"{selection_key(cfg, False)}.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    rec = run(cfg, tmp_path / "job", CHOICES)
    assert rec["selection_source"] == "computed"
    assert json.loads(path.read_text())["selections"]["1"]["removal_order"] == rec["selection"]["removal_order"]


def test_incompatible_pairing_is_refused_before_scoring(tmp_path, monkeypatch):
    from gradmap.compensation import IncompatibleCompensationError

    monkeypatch.setenv("GRADMAP_ALLOW_TARGETS", "tests.test_runner.RefusingCompensation")  # registered on purpose
    cfg = make_cfg(tmp_path)
    OmegaConf.update(cfg, "compensation", {"_target_": "tests.test_runner.RefusingCompensation"}, merge=False)
    with pytest.raises(IncompatibleCompensationError, match="refuses"):
        run(cfg, tmp_path / "job", CHOICES)
    rec = json.loads((tmp_path / "job" / "record.json").read_text())
    # Refused at validation, on the model's architecture: nothing was loaded, let alone scored.
    assert rec["status"] == "failed" and rec["timings"] is None
    assert rec["error"]["key"] == "compensation" and "refuses" in rec["error"]["message"]


@dataclass(eq=False)
class RefusingCompensation:
    """A user's compensation without options (a dataclass with no fields, as every config class is)."""

    def check_compatible(self, model, removed):
        from gradmap.compensation import IncompatibleCompensationError

        raise IncompatibleCompensationError("this compensation refuses every model")


def test_peak_rss_sees_a_short_lived_allocation():
    """The stage peak must include memory that was freed before the stage ended (the kernel's high-water mark)."""
    import torch

    from gradmap.memory import PeakRSS, rss_bytes

    size = 64 * 2**20
    try:  # glibc may serve the block from freed heap memory that is still resident: give that back first
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    base = rss_bytes()
    with PeakRSS() as outer:
        torch.ones(size // 4).add_(1)  # 64 MiB, touched, freed at once
        with PeakRSS() as inner:  # a nested block must not reset the outer one's mark
            pass
    if not outer.exact:
        pytest.skip("this kernel does not let a process reset its resident high-water mark")
    assert not inner.exact
    assert outer.peak - base >= 0.9 * size
