"""Faults: a job killed with SIGKILL and rerun, Ctrl-C and SIGTERM, corrupt and wrong-shaped cache entries, a
failed save, a sweep with a failing job, bf16 on CPU end to end, group-readable cache files, progress and the
per-decision log."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradmap import surgery
from gradmap.cache import selection_key
from gradmap.jobs import run
from gradmap.validation import ConfigError
from tests.test_bad_inputs import cli_args, run_cli
from tests.test_runner import CHOICES, make_cfg

ROOT = Path(__file__).resolve().parents[1]


# SLEB scores every candidate layer per decision: with this calibration set, seconds of scoring to interrupt.
SLOW = ["metric=sleb", "num_prune=2", "compensation=none", "calibration.num_samples=64", "calibration.seq_len=64",
        "calibration.batch_size=16"]


def _record(folder: Path) -> dict:
    return json.loads((folder / "record.json").read_text())


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update({"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_stage(run_dir: Path, proc: subprocess.Popen, stage: str, timeout: float = 120) -> None:
    """Until the job's stdout says `stage` started (the record says running by then)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if f"stage {stage} ..." in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"the job ended before stage {stage}: {proc.stderr.read()[-2000:]}")
    raise AssertionError(f"stage {stage} did not start within {timeout} s")


# ------------------------------------------------------------------------------------------- kill and signals

def test_sigkill_mid_run_then_rerun_finishes_and_history_says_so(tmp_path):
    (tmp_path / "work").mkdir()
    args = cli_args(SLOW, cache=tmp_path / "cache", run=tmp_path / "run")
    proc = _start(args, tmp_path / "work")
    _wait_for_stage(tmp_path / "run", proc, "score")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed = _record(tmp_path / "run")
    assert killed["status"] == "running"  # SIGKILL cannot be caught: the record is left as it was
    dead_pid = killed["attempts"][-1]["pid"]

    again = run_cli(args, tmp_path / "work")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "previous attempt was interrupted" in again.stdout
    rec = _record(tmp_path / "run")
    assert rec["status"] == "done"
    first, second = rec["attempts"]
    assert first["status"] == "interrupted" and first["pid"] == dead_pid
    assert "ended without finishing" in first["reason"] and "detected" in first
    assert second["status"] == "done" and second["pid"] != dead_pid and second["ended"]


@pytest.mark.parametrize("signum,code,words", [(signal.SIGTERM, 143, "terminated by SIGTERM"),
                                               (signal.SIGINT, 130, "interrupted by Ctrl-C (SIGINT)")])
def test_sigterm_and_ctrl_c_record_the_reason_and_print_one_line(tmp_path, signum, code, words):
    (tmp_path / "work").mkdir()
    args = cli_args(SLOW, cache=tmp_path / "cache", run=tmp_path / "run")
    proc = _start(args, tmp_path / "work")
    _wait_for_stage(tmp_path / "run", proc, "score")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("[gradmap] interrupted: ") and words in lines[0]
    rec = _record(tmp_path / "run")
    assert rec["status"] == "interrupted" and rec["failed_stage"] == "score"
    assert rec["attempts"][-1]["status"] == "interrupted" and rec["attempts"][-1]["reason"] == words
    assert rec["error"]["message"] == words and rec["error"]["traceback"]


# -------------------------------------------------------------------------------------------------- caches

def _selection_path(tmp_path: Path, cfg) -> Path:
    return tmp_path / "cache" / "selections" / f"{selection_key(cfg, False)}.json"


@pytest.mark.parametrize("bad", [
    "{not json",  # invalid JSON
    json.dumps(["a", "list"]),  # valid JSON, not an entry
    json.dumps({"selections": {"1": {"removal_order": [0], "decisions": [{"step": 0}]}}}),  # decision fields missing
    json.dumps({"selections": {"1": {"removed": [9], "removal_order": [9], "decisions": [  # index out of range
        {"step": 0, "scores": [0.0] * 6, "removed": [9], "seconds": 0.0, "score_seconds": 0.0, "forward_tokens": 0,
         "backward_tokens": 0}]}}}),
    json.dumps({"selections": {"1": {"removed": [1], "removal_order": [1], "decisions": [  # scores of 3 layers, not 6
        {"step": 0, "scores": [0.0, 1.0, 2.0], "removed": [1], "seconds": 0.0, "score_seconds": 0.0,
         "forward_tokens": 0, "backward_tokens": 0}]}}}),
    json.dumps({"selections": {"1": {"removed": [1], "removal_order": [1], "decisions": [  # order != decisions
        {"step": 0, "scores": [0.0] * 6, "removed": [2], "seconds": 0.0, "score_seconds": 0.0, "forward_tokens": 0,
         "backward_tokens": 0}]}}}),
], ids=["invalid_json", "a_list", "missing_fields", "out_of_range", "wrong_layer_count", "inconsistent_order"])
def test_bad_selection_entry_is_reported_moved_aside_and_recomputed(tmp_path, capsys, bad):
    cfg = make_cfg(tmp_path, "num_prune=1")
    path = _selection_path(tmp_path, cfg)
    path.parent.mkdir(parents=True)
    path.write_text(bad)
    rec = run(cfg, tmp_path / "job", CHOICES)
    assert rec["selection_source"] == "computed"
    assert "is unusable" in capsys.readouterr().out
    (aside,) = path.parent.glob(f"{path.name}.bad-*")
    assert aside.read_text() == bad  # kept for inspection
    assert json.loads(path.read_text())["selections"]["1"]["removal_order"] == rec["selection"]["removal_order"]
    # ... and the next run with this config uses the repaired entry.
    again = run(make_cfg(tmp_path, "num_prune=1"), tmp_path / "job2", CHOICES)
    assert again["selection_source"] == "cache"


@pytest.mark.parametrize("mangle", [
    lambda e: "{broken",
    lambda e: json.dumps({**e, "results": {"perplexity": {}, "lm_eval": {}}}),  # no perplexity for the text
    lambda e: json.dumps({**e, "key": "another"}),  # another entry's content
    lambda e: json.dumps({**e, "results": {**e["results"], "perplexity": {"tiny": {"corpus": "jsonl", "split": "test",
                                                                                 "seq_lens": {"16": {"ppl": "x"}}}}}}),
], ids=["invalid_json", "missing_text", "wrong_key", "ppl_not_a_number"])
def test_bad_dense_entry_is_reported_moved_aside_and_recomputed(tmp_path, mangle):
    cfg = make_cfg(tmp_path, "num_prune=1", "eval.cache_dense=true")
    first = run(cfg, tmp_path / "job", CHOICES)
    (entry,) = (tmp_path / "cache" / "dense_eval").glob("*.json")
    good = json.loads(entry.read_text())
    entry.write_text(mangle(good))
    rec = run(make_cfg(tmp_path, "num_prune=1", "eval.cache_dense=true", "force=true"), tmp_path / "job", CHOICES)
    assert rec["dense_from_cache"] is None  # recomputed, not trusted
    assert rec["results"]["dense"] == first["results"]["dense"]
    assert list(entry.parent.glob(f"{entry.name}.bad-*"))
    assert json.loads(entry.read_text()) == good  # rewritten, valid again


def test_cache_files_are_group_readable(tmp_path):
    old = os.umask(0o027)  # a cluster-style umask: group may read, others nothing
    try:
        rec = run(make_cfg(tmp_path, "num_prune=1", "eval.cache_dense=true"), tmp_path / "job", CHOICES)
    finally:
        os.umask(old)
    assert rec["status"] == "done"
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] + [tmp_path / "job" / "record.json"]
    assert len(files) >= 3
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o640, (path, oct(mode))  # not mkstemp's 0600


# ---------------------------------------------------------------------------------------------------- saving

def test_failed_save_leaves_no_folder_behind(tmp_path, monkeypatch):
    import gradmap.checkpoint

    real = gradmap.checkpoint.save_plain_checkpoint

    def half_then_fail(model, tokenizer, out_dir):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "config.json").write_text("{}")  # config written, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gradmap.checkpoint, "save_plain_checkpoint", half_then_fail)
    target = tmp_path / "saved" / "model"
    with pytest.raises(ConfigError, match="save_dir=.*No space left on device.*nothing was left"):
        run(make_cfg(tmp_path, "num_prune=1", f"save_dir={target}"), tmp_path / "job", CHOICES)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temporary sibling either
    rec = _record(tmp_path / "job")
    assert rec["status"] == "failed" and rec["error"]["key"] == "save_dir" and rec["failed_stage"] == "save"
    assert rec["results"]["pruned"]  # the evaluation before the save is kept

    # An existing checkpoint is replaced only with save_overwrite=true, and a failure leaves it untouched.
    monkeypatch.setattr(gradmap.checkpoint, "save_plain_checkpoint", real)
    first = run(make_cfg(tmp_path, "num_prune=1", f"save_dir={target}"), tmp_path / "job1", CHOICES)
    assert Path(first["saved_to"]) == target and (target / "pruning_info.json").is_file()
    with pytest.raises(ConfigError, match="non-empty folder"):
        run(make_cfg(tmp_path, "num_prune=2", f"save_dir={target}"), tmp_path / "job2", CHOICES)
    before = sorted(p.name for p in target.iterdir())
    monkeypatch.setattr(gradmap.checkpoint, "save_plain_checkpoint", half_then_fail)
    with pytest.raises(ConfigError, match="save_dir"):
        run(make_cfg(tmp_path, "num_prune=2", f"save_dir={target}", "save_overwrite=true"), tmp_path / "job3",
            CHOICES)
    assert sorted(p.name for p in target.iterdir()) == before
    assert json.loads((target / "pruning_info.json").read_text())["removed_layers"] == first["removed_layers"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]
    monkeypatch.setattr(gradmap.checkpoint, "save_plain_checkpoint", real)
    second = run(make_cfg(tmp_path, "num_prune=2", f"save_dir={target}", "save_overwrite=true"), tmp_path / "job4",
                 CHOICES)
    assert json.loads((target / "pruning_info.json").read_text())["removed_layers"] == second["removed_layers"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]


# ----------------------------------------------------------------------------------------------------- sweeps

def test_sweep_with_a_failing_job_exits_non_zero_and_lists_it(tmp_path):
    (tmp_path / "work").mkdir()
    sweep = tmp_path / "sweep"
    args = [a for a in cli_args([], cache=tmp_path / "cache", run=tmp_path / "run") if not a.startswith("hydra.")]
    args = ["-m", *args, f"hydra.sweep.dir={sweep}", "metric=random", "compensation=none", "num_prune=1,9"]
    first = run_cli(args, tmp_path / "work")
    assert first.returncode == 1, first.stderr[-2000:]
    assert "Traceback" not in first.stderr
    assert "[gradmap] error: num_prune=9" in first.stderr  # the job's own line, as it failed
    assert f"[gradmap] sweep {sweep}: 2 jobs: 1 done, 0 skipped, 1 failed" in first.stdout
    failed = [line for line in first.stdout.splitlines() if "  failed " in line]
    assert len(failed) == 1 and "num_prune=9" in failed[0] and "1..5" in failed[0]
    (bad,) = [p.parent for p in sweep.rglob("record.json") if "num_prune=9" in str(p)]
    assert _record(bad)["status"] == "failed" and _record(bad)["error"]["key"] == "num_prune"

    again = run_cli(args, tmp_path / "work")  # the finished job is skipped, the failing one fails again
    assert again.returncode == 1
    assert f"[gradmap] sweep {sweep}: 2 jobs: 0 done, 1 skipped, 1 failed" in again.stdout

    ok = run_cli([a.replace("num_prune=1,9", "num_prune=1,2") for a in args], tmp_path / "work")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "2 jobs: 1 done, 1 skipped, 0 failed" in ok.stdout


def test_sweep_summary_reports_a_killed_job_as_interrupted(tmp_path):
    from gradmap.jobs import new_attempt
    from gradmap.sweep import summarize

    for name, status in (("0_ok", "done"), ("1_killed", "running"), ("2_other_sweep", "failed")):
        (tmp_path / name).mkdir()
        attempt = {**new_attempt(), "status": status, "sweep": "other" if name.startswith("2") else "s1"}
        if status == "running":
            attempt["pid"] = 2**22 + 12345  # beyond pid_max: no such process
        (tmp_path / name / "record.json").write_text(json.dumps({"status": status, "attempts": [attempt]}))
    summary = summarize(tmp_path, "s1")
    assert summary.done == ["0_ok"] and summary.skipped == []
    assert summary.failed == [("1_killed", f"interrupted: process {2**22 + 12345} ended without finishing")]


# -------------------------------------------------------------------------------------------------------- bf16

def test_bf16_on_cpu_score_prune_project_evaluate_save(tmp_path):
    """The tiny model in bfloat16 through scoring, pruning, the projection (fitted in float64), evaluation and save."""
    from safetensors import safe_open

    target = tmp_path / "bf16_model"
    rec = run(make_cfg(tmp_path, "dtype=bfloat16", "num_prune=2", "compensation=projection",
                       f"save_dir={target}"), tmp_path / "job", CHOICES)
    assert rec["status"] == "done" and rec["dtype"] == "torch.bfloat16"
    assert len(rec["removed_layers"]) == 2
    comp = rec["compensation"]
    assert comp["sites"] and all(torch.isfinite(torch.tensor(s["identity_distance"])) for s in comp["sites"])
    assert comp["final_rel_error_after"] <= comp["final_rel_error_before"] + 1e-6  # the guard keeps it no worse
    ppl = rec["results"]["pruned"]["perplexity"]["tiny"]["seq_lens"]["16"]["ppl"]
    assert 1 < ppl < float("inf")
    with safe_open(str(target / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    info = json.loads((target / "pruning_info.json").read_text())
    assert info["removed_layers"] == rec["removed_layers"] and info["original_num_layers"] == 6


def test_projection_fit_is_float64_for_a_bf16_model():
    from gradmap.metric import Calibration, Cost
    from gradmap.models import tiny_random_llama
    from gradmap.projection import ProjectionCompensation

    model = tiny_random_llama(num_layers=6).to(torch.bfloat16)
    removed = surgery.remove_layers(model, [2])
    comp = ProjectionCompensation()
    seen = []
    real = comp._normal_equations

    def spy(*args, **kwargs):
        yty, ytt, err = real(*args, **kwargs)
        seen.append((yty.dtype, ytt.dtype))
        return yty, ytt, err

    comp._normal_equations = spy
    comp.apply(model, removed, Calibration(torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0)),
                                           2), Cost())
    assert seen and all(d == (torch.float64, torch.float64) for d in seen)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# ----------------------------------------------------------------------------------------- progress and W&B

class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_on_a_terminal_and_silent_in_logs(monkeypatch):
    from baselines.sleb import SLEB
    from gradmap.metric import Calibration, Cost
    from gradmap.models import tiny_random_llama

    model = tiny_random_llama(num_layers=5)
    calib = Calibration(torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0)), 2)
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    SLEB().select(model, calib, 2, Cost())
    shown = tty.getvalue()
    assert "sleb: pruning decisions" in shown and "2/2" in shown  # one step per decision, with ETA
    assert "sleb: candidate layers" in shown  # one step per candidate layer
    pipe = io.StringIO()  # not a TTY: nothing
    monkeypatch.setattr(sys, "stderr", pipe)
    SLEB().select(model, calib, 2, Cost())
    assert pipe.getvalue() == ""


def test_each_decision_is_logged_as_it_happens(tmp_path, monkeypatch, capsys):
    import gradmap.runner

    events = []

    class Recorder:
        def log_decision(self, decision, cached=False):
            events.append(("decision", decision.step, list(decision.removed), cached))

        def log_run(self, rec, plot):
            events.append(("run",))

        def finish(self, status):
            events.append(("finish", status))

    monkeypatch.setattr(gradmap.runner, "make_logger", lambda *a: Recorder())
    rec = run(make_cfg(tmp_path, "num_prune=2", "metric.iterative=true"), tmp_path / "job", CHOICES)
    assert events[:2] == [("decision", 0, [rec["selection"]["removal_order"][0]], False),
                          ("decision", 1, [rec["selection"]["removal_order"][1]], False)]
    assert events[2:] == [("run",), ("finish", "done")]
    out = capsys.readouterr().out  # and one line per decision in the log
    assert f"[gradmap] decision 0: removed [{rec['selection']['removal_order'][0]}]" in out
    assert f"[gradmap] decision 1: removed [{rec['selection']['removal_order'][1]}]" in out
    # A cached selection is logged too, marked as such.
    events.clear()
    run(make_cfg(tmp_path, "num_prune=2", "metric.iterative=true"), tmp_path / "job2", CHOICES)
    assert [e[3] for e in events if e[0] == "decision"] == [True, True]


def test_a_logger_that_cannot_start_is_one_line_and_leaves_a_record(tmp_path, monkeypatch):
    import gradmap.runner

    def no_login(*_):
        raise RuntimeError("api_key not configured (no-tty)")

    monkeypatch.setattr(gradmap.runner, "make_logger", no_login)
    with pytest.raises(ConfigError, match=r"^logger='none': the none logger cannot start .*logger=none") as info:
        run(make_cfg(tmp_path, "num_prune=1"), tmp_path / "job", CHOICES)
    assert "\n" not in str(info.value)
    rec = _record(tmp_path / "job")
    assert rec["status"] == "failed" and rec["error"]["key"] == "logger" and "api_key" in rec["error"]["message"]
    assert rec["attempts"][-1]["status"] == "failed"


def test_wandb_logger_logs_a_decision_as_a_step():
    from gradmap.loggers import WandbLogger, decision_row
    from gradmap.metric import Decision

    logged = []
    logger = WandbLogger.__new__(WandbLogger)
    logger.run = type("FakeRun", (), {"log": lambda self, row: logged.append(row)})()
    logger.log_decision(Decision(step=3, scores=[0.5, None, 0.25], removed=[2], seconds=1.5))
    assert logged == [decision_row(Decision(step=3, scores=[0.5, None, 0.25], removed=[2], seconds=1.5))]
    row = logged[0]
    assert row["decision/step"] == 3 and row["decision/removed_layer"] == 2
    assert row["decision/score/layer_000"] == 0.5 and row["decision/score/layer_002"] == 0.25
    assert "decision/score/layer_001" not in row


# ------------------------------------------------------------------------------------------ asset verification

def test_assets_verify_reports_corrupt_folders(tmp_path, monkeypatch, capsys):
    from gradmap import assets
    from tests.test_bad_inputs import _fake_model_asset

    monkeypatch.setenv("GRADMAP_CACHE", str(tmp_path))
    folder = _fake_model_asset(tmp_path)
    assert assets.main(["--verify", "smollm2_135m"]) == 0
    assert "ok" in capsys.readouterr().out
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert assets.main(["--verify", "smollm2_135m"]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT" in out and "sha256" in out and "--rebuild smollm2_135m" in out
    assert assets.main(["--list"]) == 0
    assert "smollm2_135m   cached " in capsys.readouterr().out  # sizes match: only --verify hashes
    (folder / "tokenizer.json").unlink()
    assert assets.main(["--list"]) == 0
    assert "smollm2_135m   corrupt" in capsys.readouterr().out


def test_manifest_is_written_at_build_time(tmp_path, monkeypatch):
    """`ensure` records sizes and checksums of the built folder before the marker."""
    from gradmap import assets

    monkeypatch.setenv("GRADMAP_CACHE", str(tmp_path / "cache"))

    def build(paths, out):
        (out / "test.jsonl").write_text('{"text": "x"}\n')
        (out / "meta.json").write_text("{}")

    monkeypatch.setitem(assets.ASSETS, "social_iqa", assets.Asset((), build, "fake", files=("test.jsonl",)))
    folder = assets.ensure("social_iqa")
    manifest = json.loads((folder / assets.MANIFEST).read_text())["files"]
    assert set(manifest) == {"test.jsonl", "meta.json"} and manifest["test.jsonl"]["size"] == 14
    assert assets.verify("social_iqa") == ([], True)
    (folder / "test.jsonl").write_text('{"text": "y"}\n')  # same size, other bytes
    problems, _ = assets.verify("social_iqa")
    assert problems and "sha256" in problems[0]


def test_a_finished_job_is_skipped_whatever_the_run_only_keys(tmp_path):
    """`force` and `save_overwrite` say how to run, not what: a record made before `save_overwrite` existed, or
    with force=true, still counts as the same finished job."""
    out = tmp_path / "job"
    first = run(make_cfg(tmp_path, "num_prune=1", "force=true"), out, CHOICES)
    rec = _record(out)
    del rec["config"]["save_overwrite"]  # as written by the previous version
    (out / "record.json").write_text(json.dumps(rec))
    again = run(make_cfg(tmp_path, "num_prune=1"), out, CHOICES)
    assert len(again["reruns_skipped"]) == 1 and again["removed_layers"] == first["removed_layers"]
    assert [a["status"] for a in again["attempts"]] == ["done", "skipped"]
    changed = run(make_cfg(tmp_path, "num_prune=2"), out, CHOICES)  # another computation: rerun
    assert not changed["reruns_skipped"] and len(changed["removed_layers"]) == 2
