"""The typed, versioned RunRecord: what the runner writes, and the one adapter through which jobs, sweeps and reports
read records written before `schema_version` existed (tests/data/record_v0.json: the default run's record as the
code before RunRecord wrote it) or refuse those of a newer schema."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.records import load_records
from experiments.report import build_table
from gradmap.jobs import run, same_job
from gradmap.record import SCHEMA_VERSION, RecordVersionError, RunRecord
from tests.test_runner import CHOICES, make_cfg

ROOT = Path(__file__).resolve().parents[1]
OLD = ROOT / "tests" / "data" / "record_v0.json"


def test_a_new_record_carries_the_schema_version(tmp_path):
    rec = run(make_cfg(tmp_path, "num_prune=1"), tmp_path / "job", CHOICES)
    saved = json.loads((tmp_path / "job" / "record.json").read_text())
    assert saved["schema_version"] == rec["schema_version"] == SCHEMA_VERSION == 1
    assert set(saved) == set(RunRecord().to_dict())  # every key of the schema, always (null until set)
    assert RunRecord.from_dict(saved).to_dict() == saved


def test_an_old_record_is_read_in_todays_shape():
    raw = json.loads(OLD.read_text())
    assert "schema_version" not in raw and raw["config"]["model"]["source"] == "offline"
    rec = RunRecord.from_dict(raw)
    assert rec.schema_version == SCHEMA_VERSION and rec.status == "done" and rec.extra == {}
    assert rec.removed_layers == [12, 13, 14, 15, 17, 18, 25, 26]
    # Its config is what the same command composes today (logger=none cache_dir=/tmp/wt10cache), key for key: the
    # values the old code used for keys it read with a default are filled in. (The default evaluation has since
    # gained the wiki cloze task, issue 15; without it, today's command is the old one.)
    # Likewise GradMAP's memory knobs (issue 17), which change no result: the old code had no chunked loss and no
    # recomputation; finished jobs compare without them (`gradmap.jobs.same_job`).
    without_cloze = ["eval.lm_eval.tasks=[social_iqa_bigbench]", "~eval.lm_eval.local_tasks.wiki_cloze_test"]
    old_knobs = ["metric.gradient_checkpointing=false", "~metric.loss_chunk_tokens"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        today = OmegaConf.to_container(compose("config", overrides=["logger=none", "cache_dir=/tmp/wt10cache",
                                                                    *without_cloze, *old_knobs]), resolve=True)
    assert rec.config == today
    new_knobs = compose_today(["logger=none", "cache_dir=/tmp/wt10cache", *without_cloze])
    assert new_knobs != today and same_job(rec.config, new_knobs)


def compose_today(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)


def test_memory_knobs_change_neither_the_job_nor_the_selection_key():
    from gradmap.cache import selection_key

    base = ["logger=none", "cache_dir=/tmp/x"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        a = compose("config", overrides=base)
        b = compose("config", overrides=[*base, "metric.gradient_checkpointing=false", "metric.loss_chunk_tokens=0"])
        c = compose("config", overrides=[*base, "metric.reduction=l2"])
    assert selection_key(a, False) == selection_key(b, False) != selection_key(c, False)
    as_dict = [OmegaConf.to_container(x, resolve=True) for x in (a, b, c)]
    assert same_job(as_dict[0], as_dict[1]) and not same_job(as_dict[0], as_dict[2])


def test_a_finished_old_job_is_still_skipped(tmp_path):
    """A sweep resumed across the change does not rerun its finished jobs: the old record's config is upgraded and
    compared with today's."""
    out = tmp_path / "job"
    first = run(make_cfg(tmp_path, "num_prune=1"), out, CHOICES)
    old = dict(first)
    del old["schema_version"]
    config = old["config"]
    config["model"] = {"source": "tiny_random", **{k: v for k, v in config["model"].items() if k != "_target_"}}
    config["calibration"] = {"source": "offline_wiki",
                             **{k: v for k, v in config["calibration"].items() if k != "_target_"}}
    config["eval"] = {k: v for k, v in config["eval"].items() if k != "_target_"}
    del config["eval"]["lm_eval"]["seed"]
    config["logger"] = {"kind": "none"}
    (out / "record.json").write_text(json.dumps(old))
    again = run(make_cfg(tmp_path, "num_prune=1"), out, CHOICES)
    assert again["reruns_skipped"] and again["schema_version"] == SCHEMA_VERSION
    assert [a["status"] for a in again["attempts"]] == ["done", "skipped"]


def test_the_report_reads_old_records_and_refuses_newer_ones(tmp_path):
    shutil.copy(OLD, tmp_path / "record.json")
    newer = json.loads(OLD.read_text()) | {"schema_version": SCHEMA_VERSION + 1}
    (tmp_path / "future").mkdir()
    (tmp_path / "future" / "record.json").write_text(json.dumps(newer))
    records, notes = load_records([tmp_path])
    assert len(records) == 1 and records[0].schema_version == SCHEMA_VERSION
    assert any("refused" in n and "schema_version 2 is newer" in n and "future" in n for n in notes)
    table, _ = build_table(records)
    assert table.loc[table.metric == "gradmap", "ppl@128/wiki_test"].item() == pytest.approx(72.64197166170106)
    with pytest.raises(RecordVersionError, match="schema_version 2"):
        RunRecord.from_dict(newer)


def test_a_job_never_overwrites_a_newer_record(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    (out / "record.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1, "status": "done"}))
    with pytest.raises(ValueError, match="hydra.run.dir=.*schema_version 2 is newer"):
        run(make_cfg(tmp_path, "num_prune=1"), out, CHOICES)
    assert json.loads((out / "record.json").read_text())["schema_version"] == SCHEMA_VERSION + 1


@pytest.mark.parametrize("overrides", [["metric=gradmap", "compensation=projection"],
                                       ["metric=sleb", "compensation=replaceme"],
                                       ["metric=bi", "compensation=prune_and_comp"]])
def test_classes_that_moved_keep_their_jobs_and_cache_keys(overrides):
    """Issue #19 moved GradMAP and the baselines into methods/: a record written with the old class paths is still
    the same job, and the selection/interleaved keys hash the old paths, so caches built before are still found."""
    from gradmap.cache import interleaved_key, selection_key
    from gradmap.targets import MOVED_TARGETS, shipped_targets

    assert set(MOVED_TARGETS.values()) <= set(shipped_targets("metric")) | set(shipped_targets("compensation"))
    today = compose_today(overrides)
    old_paths = {new: old for old, new in MOVED_TARGETS.items()}
    before = json.loads(json.dumps(today))
    for group in ("metric", "compensation"):
        before[group]["_target_"] = old_paths[today[group]["_target_"]]
    assert before != today
    assert same_job(RunRecord.from_dict({"schema_version": SCHEMA_VERSION, "config": before}).config, today)
    for key in (selection_key, interleaved_key):
        assert key(today, False) == key(before, False)


def test_metric_keys_added_later_keep_their_jobs_and_cache_keys():
    """A metric key added later (`ADDED_METRIC_KEYS`, e.g. gradmap_verify's `screen_windows`): a record written before
    it is the same job as today's default, and the selection key hashes as before while the key keeps that value."""
    from gradmap.cache import selection_key
    from gradmap.record import ADDED_METRIC_KEYS

    today = compose_today(["metric=gradmap_verify"])
    added = ADDED_METRIC_KEYS[today["metric"]["_target_"]]
    before = json.loads(json.dumps(today))
    for key in added:
        del before["metric"][key]
    assert same_job(RunRecord.from_dict({"schema_version": SCHEMA_VERSION, "config": before}).config, today)
    assert selection_key(today, False) == selection_key(before, False)
    changed = json.loads(json.dumps(today))
    changed["metric"]["screen_windows"] = 2
    assert selection_key(changed, False) != selection_key(today, False)
