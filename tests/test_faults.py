"""Faults: a job killed with SIGKILL and rerun, Ctrl-C and SIGTERM, corrupt and wrong-shaped cache entries, a
failed save, a sweep with a failing job, bf16 on CPU end to end, group-readable cache files, progress and the
per-decision log."""

from __future__ import annotations

import io
import json
import math
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
from tests.tiny_models import method

ROOT = Path(__file__).resolve().parents[1]


# SLEB scores every candidate layer per decision: with this calibration set, seconds of scoring to interrupt (a text
# long enough for 64 x 64 tokens: more than a text holds is refused).
LONG = ROOT / "tests" / "data" / "long_text.jsonl"
SLOW = ["metric=sleb", "num_prune=2", "compensation=none", "calibration.num_samples=64", "calibration.seq_len=64",
        "calibration.batch_size=16", "!calibration.path", f"calibration.path={LONG}"]


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
    from gradmap.data import Calibration
    from gradmap.models import tiny_random_llama
    from gradmap.stages import Cost

    model = tiny_random_llama(num_layers=6).to(torch.bfloat16)
    removed = surgery.remove_layers(model, [2])
    comp = method("compensation/projection")
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
    from gradmap.data import Calibration
    from gradmap.models import tiny_random_llama
    from gradmap.stages import Cost

    model = tiny_random_llama(num_layers=5)
    calib = Calibration(torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0)), 2)
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    method("metric/sleb").select(model, calib, 2, Cost())
    shown = tty.getvalue()
    assert "sleb: pruning decisions" in shown and "2/2" in shown  # one step per decision, with ETA
    assert "sleb: candidate layers" in shown  # one step per candidate layer
    pipe = io.StringIO()  # not a TTY: nothing
    monkeypatch.setattr(sys, "stderr", pipe)
    method("metric/sleb").select(model, calib, 2, Cost())
    assert pipe.getvalue() == ""


def test_each_decision_is_logged_as_it_happens(tmp_path, monkeypatch, capsys):
    import gradmap.loggers

    events = []

    class Recorder:
        def log_decision(self, decision, cached=False):
            events.append(("decision", decision.step, list(decision.removed), cached))

        def log_run(self, rec, plot):
            events.append(("run",))

        def finish(self, status):
            events.append(("finish", status))

    monkeypatch.setattr(gradmap.loggers.NullLogger, "start", lambda *a: Recorder())
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
    import gradmap.loggers

    def no_login(*_):
        raise RuntimeError("api_key not configured (no-tty)")

    monkeypatch.setattr(gradmap.loggers.NullLogger, "start", no_login)
    with pytest.raises(ConfigError, match=r"^logger='none': the none logger cannot start .*logger=none") as info:
        run(make_cfg(tmp_path, "num_prune=1"), tmp_path / "job", CHOICES)
    assert "\n" not in str(info.value)
    rec = _record(tmp_path / "job")
    assert rec["status"] == "failed" and rec["error"]["key"] == "logger" and "api_key" in rec["error"]["message"]
    assert rec["attempts"][-1]["status"] == "failed"


def test_wandb_logger_logs_a_decision_as_a_step():
    from gradmap.loggers import WandbLogger, decision_row
    from gradmap.selection import Decision

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


# ------------------------------------------------------------------------ second round (issue 16): owners

def test_two_processes_on_one_run_folder(tmp_path):
    """The second process is refused in one line before it writes anything (not even Hydra's `.hydra/`); the first
    keeps the record to itself."""
    (tmp_path / "work").mkdir()
    run_dir = tmp_path / "run"
    first = _start(cli_args(SLOW, cache=tmp_path / "cache", run=run_dir), tmp_path / "work")
    try:
        _wait_for_stage(run_dir, first, "score")
        hydra_config = (run_dir / ".hydra" / "config.yaml").read_text()
        second = run_cli(cli_args([*SLOW, "seed=1"], cache=tmp_path / "cache", run=run_dir), tmp_path / "work")
        assert second.returncode == 2, second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr + second.stdout, second.stderr
        assert lines[0].startswith("[gradmap] error: hydra.run.dir=") and f"pid {first.pid}" in lines[0]
        assert (run_dir / ".hydra" / "config.yaml").read_text() == hydra_config
        rec = _record(run_dir)
        assert rec["status"] == "running" and [a["pid"] for a in rec["attempts"]] == [first.pid]
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    rec = _record(run_dir)
    assert rec["status"] == "interrupted" and [a["pid"] for a in rec["attempts"]] == [first.pid]


def test_triple_ctrl_c_leaves_an_interrupted_attempt_and_no_traceback(tmp_path):
    (tmp_path / "work").mkdir()
    proc = _start(cli_args(SLOW, cache=tmp_path / "cache", run=tmp_path / "run"), tmp_path / "work")
    _wait_for_stage(tmp_path / "run", proc, "score")
    for _ in range(3):  # pressed three times quickly: the 2nd and 3rd arrive while the 1st is being recorded
        proc.send_signal(signal.SIGINT)
        time.sleep(0.005)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("[gradmap] interrupted: "), err
    rec = _record(tmp_path / "run")
    assert rec["status"] == "interrupted" and rec["attempts"][-1]["status"] == "interrupted"
    assert rec["attempts"][-1]["reason"] == "interrupted by Ctrl-C (SIGINT)" and rec["attempts"][-1]["ended"]


def test_repeated_signals_raise_once():
    from gradmap.jobs import _STOPPING, Interrupted, install_signal_handlers

    old = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        install_signal_handlers()
        handler = signal.getsignal(signal.SIGINT)
        with pytest.raises(Interrupted):
            handler(signal.SIGINT, None)
        assert handler(signal.SIGINT, None) is None and handler(signal.SIGTERM, None) is None  # ignored
        assert _STOPPING == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])


# ----------------------------------------------------------------------- second round: bounded input

def test_a_100_mb_single_line_calibration_file_is_read_within_a_memory_bound(tmp_path):
    """One 100 MB line: read and cut into 1M-character pieces, only the drawn pieces tokenized. The bound: 5x the
    line (its bytes and text are held a few times while it is read, parsed and cut; 412 MiB measured) plus 100 MB;
    tokenizing the whole line (the old behaviour) holds 100M token ids, 8+ bytes each (over 900 MB)."""
    path = tmp_path / "long_line.jsonl"
    chunk = "the river rises in the hills and flows to the sea " * 20_000  # 1 MB
    with open(path, "w") as fh:
        fh.write('{"text": "')
        for _ in range(100):
            fh.write(chunk)
        fh.write('"}\n')
    size = path.stat().st_size
    assert size >= 100_000_000
    script = f"""
import json
import math
from gradmap.data import WikiCalibration
from gradmap.memory import PeakRSS, rss_bytes
from gradmap.models import ByteTokenizer
before = rss_bytes()
with PeakRSS() as rss:
    calib = WikiCalibration(path={str(path)!r}, num_samples=4, seq_len=16, batch_size=2, seed=0).load(ByteTokenizer())
print(json.dumps({{"grew": rss.peak - before, "shape": list(calib.input_ids.shape),
                  "distinct": calib.distinct_tokens}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["shape"] == [4, 16] and out["distinct"] == 64
    print(f"100 MB line: peak grew {out['grew'] / 2**20:.0f} MiB (bound {(5 * size + 100 * 2**20) / 2**20:.0f})")
    assert out["grew"] < 5 * size + 100 * 2**20, out


def test_long_documents_are_cut_into_pieces_that_tokenize_alike():
    from gradmap.data import _tokenize_bounded, distinct_tokens, split_long
    from gradmap.models import ByteTokenizer

    text = ("word " * 50).strip()
    pieces = split_long(text, limit=32)
    assert "".join(pieces) == text and all(len(p) <= 32 for p in pieces) and len(pieces) > 1
    assert all(p.startswith(" ") for p in pieces[1:])  # cut before a space: the next word keeps its space
    assert split_long("x" * 70, limit=32) == ["x" * 32, "x" * 32, "x" * 6]  # no space: a hard cut
    assert _tokenize_bounded(ByteTokenizer(), text) == ByteTokenizer().encode(text)
    assert distinct_tokens([(0, 0), (0, 4), (1, 0), (0, 100)], 8) == 12 + 8 + 8


def test_calibration_records_its_distinct_tokens(tmp_path):
    rec = run(make_cfg(tmp_path, "num_prune=1"), tmp_path / "job", CHOICES)
    cal = rec["calibration"]
    assert cal["tokens"] == 4 * 16 and 16 <= cal["distinct_tokens"] <= cal["tokens"]


# ----------------------------------------------------------------------- second round: clear and early

def test_disk_full_names_the_folder(tmp_path, monkeypatch):
    import errno as errno_

    import gradmap.runner

    def full(path, text):
        raise OSError(errno_.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(gradmap.runner, "atomic_write_text", full)  # scores.csv, in the run folder
    with pytest.raises(ConfigError, match=r"^hydra.run.dir='.*job': no space left on device writing .*scores.csv"):
        run(make_cfg(tmp_path, "num_prune=1"), tmp_path / "job", CHOICES)
    rec = _record(tmp_path / "job")
    assert rec["status"] == "failed" and rec["error"]["key"] == "hydra.run.dir"
    import gradmap.cache

    monkeypatch.undo()

    def cache_full(path, obj):
        raise OSError(errno_.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(gradmap.cache, "atomic_write_json", cache_full)  # the selection cache entry
    with pytest.raises(ConfigError, match=r"^cache_dir='.*cache.*': no space left"):
        run(make_cfg(tmp_path, "num_prune=1", "seed=1"), tmp_path / "job2", CHOICES)  # a new selection: written


def test_broken_pipe_ends_quietly(tmp_path):
    """`python run.py | head -1`: the reader goes away after one line; the run finishes, says nothing more."""
    (tmp_path / "work").mkdir()
    proc = _start(cli_args(["num_prune=1"], cache=tmp_path / "cache", run=tmp_path / "run"), tmp_path / "work")
    assert proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert err.strip() == "", err
    assert _record(tmp_path / "run")["status"] == "done"


@pytest.mark.parametrize("module", ["experiments.report", "experiments.frontier"])
def test_report_out_an_existing_file_is_one_line(tmp_path, module):
    from tests.test_report import write_record

    write_record(tmp_path / "sweep", "0_a", "gradmap", "none", 0.25, 30.0, 0.4, 0.3, 10.0)
    (tmp_path / "taken.txt").write_text("mine")
    done = subprocess.run([sys.executable, "-m", module, str(tmp_path / "sweep"), "--out", str(tmp_path / "taken.txt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out ") and "is a file" in lines[0], lines
    assert (tmp_path / "taken.txt").read_text() == "mine"


def test_nan_results_are_never_averaged_and_the_failed_seed_is_named(tmp_path):
    from experiments.frontier import build_frontier, write_frontier
    from experiments.records import load_records
    from experiments.report import build_table
    from tests.test_report import row, write_record

    root = tmp_path / "sweep"
    write_record(root, "0", "gradmap", "none", 0.25, 30.0, 0.4, 0.3, 10.0, seed=0)
    write_record(root, "1", "gradmap", "none", 0.25, float("nan"), 0.5, 0.3, 10.0, seed=1)
    records, _ = load_records([root])
    table, notes = build_table(records)
    r = row(table, "gradmap", "none", 0.25)
    assert r["runs"] == 2 and math.isnan(r["ppl@128"])  # not 30.0 as "the mean of 2 runs"
    assert r["task_a/acc_norm"] == pytest.approx(0.45)  # the other columns still average
    assert any("seed 1 is NaN" in n and "ppl@128" in n for n in notes), notes
    frontier = build_frontier(records, ["ppl@128"])
    assert math.isnan(frontier["ppl@128"].iloc[0]) and not frontier["ppl@128 pareto"].iloc[0]
    _, _, fnotes = write_frontier([root], tmp_path / "f")
    assert any("seed 1 is NaN" in n for n in fnotes), fnotes


# --------------------------------------------------------------------- second round: sweeps and folders

def test_sweep_job_folders_stay_inside_the_sweep_folder(tmp_path):
    (tmp_path / "work").mkdir()
    sweep = tmp_path / "sweep"
    args = [a for a in cli_args([], cache=tmp_path / "cache", run=tmp_path / "run") if not a.startswith(("hydra.",
                                                                                                     "calibration.path"))]
    args = ["-m", *args, f"hydra.sweep.dir={sweep}", "calibration.path=../../../x.jsonl", "num_prune=1,99"]
    before = sorted(p.name for p in tmp_path.iterdir())
    done = run_cli(args, tmp_path / "work")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr + done.stdout
    assert f"[gradmap] sweep {sweep}: 2 jobs: 0 done, 0 skipped, 2 failed" in done.stdout
    records = list(sweep.rglob("record.json"))
    assert len(records) == 2 and all(p.parent.parent == sweep for p in records)
    assert all("%2F" in p.parent.name for p in records)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["sweep"])  # nothing outside the sweep


def test_safe_dirname_is_one_short_path_component():
    from gradmap.overrides import safe_dirname

    assert safe_dirname("num_prune=1,seed=0") == "num_prune=1,seed=0"  # the usual names do not change
    assert "/" not in safe_dirname("calibration.path=../../x") and safe_dirname("..") != ".."
    long = safe_dirname("k=" + "v" * 500)
    assert len(long.encode()) <= 240 and long != safe_dirname("k=" + "v" * 499 + "w")
    assert safe_dirname("a=" + "x" * 400 + ",num_prune=9").endswith(",num_prune=9")  # both ends stay readable


def test_a_misspelled_experiment_in_a_sweep_fails_it(tmp_path):
    (tmp_path / "work").mkdir()
    args = [a for a in cli_args([], cache=tmp_path / "cache", run=tmp_path / "run") if not a.startswith("hydra.")]
    done = run_cli(["-m", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}", "experiment=ablation_gradmp"],
                   tmp_path / "work")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "[gradmap] error: experiment='ablation_gradmp': no such experiment" in done.stderr
    assert "1 jobs: 0 done, 0 skipped, 1 failed" in done.stdout


# ---------------------------------------------------------------------- second round: a shared cache

def test_umask_002_gives_group_readable_weights(tmp_path):
    target = tmp_path / "saved" / "model"
    old = os.umask(0o002)
    try:
        rec = run(make_cfg(tmp_path, "num_prune=1", f"save_dir={target}"), tmp_path / "job", CHOICES)
    finally:
        os.umask(old)
    assert rec["status"] == "done"
    assert stat.S_IMODE((target / "model.safetensors").stat().st_mode) == 0o664  # safetensors alone: 0600
    for path in [target, *target.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o775 if path.is_dir() else 0o664), path


def test_sigterm_during_save_leaves_nothing_and_stale_partial_saves_are_swept(tmp_path, monkeypatch):
    import gradmap.checkpoint
    from gradmap.jobs import Interrupted

    real = gradmap.checkpoint.save_plain_checkpoint

    def killed(model, tokenizer, out_dir):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "config.json").write_text("{}")
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(gradmap.checkpoint, "save_plain_checkpoint", killed)
    target = tmp_path / "saved" / "model"
    with pytest.raises(Interrupted):
        run(make_cfg(tmp_path, "num_prune=1", f"save_dir={target}"), tmp_path / "job", CHOICES)
    assert list(target.parent.iterdir()) == []
    assert _record(tmp_path / "job")["status"] == "interrupted"
    stale = target.parent / f".model.tmp-{2**22 + 7}"  # left by a process that no longer exists (SIGKILL)
    (stale / "sub").mkdir(parents=True)
    monkeypatch.setattr(gradmap.checkpoint, "save_plain_checkpoint", real)
    run(make_cfg(tmp_path, "num_prune=1", f"save_dir={target}", "force=true"), tmp_path / "job", CHOICES)
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]


def test_assets_cache_dir_flag_and_verify_hint_name_the_cache(tmp_path, monkeypatch, capsys):
    from gradmap import assets
    from tests.test_bad_inputs import _fake_model_asset

    monkeypatch.setenv("GRADMAP_CACHE", str(tmp_path / "elsewhere"))
    folder = _fake_model_asset(tmp_path / "lab")
    assert assets.main(["--cache-dir", str(tmp_path / "lab"), "--verify", "smollm2_135m"]) == 0
    assert str(folder) in capsys.readouterr().out
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert assets.main(["--cache-dir", str(tmp_path / "lab"), "--verify", "smollm2_135m"]) == 1
    out = capsys.readouterr().out
    assert f"python -m gradmap.assets --cache-dir {tmp_path / 'lab'} --rebuild smollm2_135m" in out
    # $GRADMAP_CACHE: nothing built there, and the hint says where
    assert assets.main(["--verify", "smollm2_135m"]) == 1
    assert f"--cache-dir {tmp_path / 'elsewhere'} smollm2_135m" in capsys.readouterr().out


def test_third_party_caches_live_in_the_project_cache_or_the_run_folder(tmp_path, monkeypatch):
    for name in ("HF_DATASETS_CACHE", "HF_HOME", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR",
                 "MPLCONFIGDIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "users_own"))  # the user's choice stays
    run(make_cfg(tmp_path, "num_prune=1"), tmp_path / "job", CHOICES)
    assert os.environ["HF_DATASETS_CACHE"] == str(tmp_path / "cache" / "hf_datasets")
    assert os.environ["MPLCONFIGDIR"] == str(tmp_path / "cache" / "matplotlib")
    assert os.environ["WANDB_CACHE_DIR"] == str(tmp_path / "job" / "wandb" / "cache")
    assert os.environ["WANDB_DATA_DIR"] == str(tmp_path / "users_own")


def test_a_registered_class_is_built_and_an_unknown_one_never_imported(monkeypatch):
    """Allow-list: a user's class registered in $GRADMAP_ALLOW_TARGETS is built; an unregistered one is refused
    before its module is imported (`this` prints the Zen of Python when it is)."""
    from gradmap.validation import check_component

    if "this" in sys.modules:
        pytest.skip("`this` was imported by something else")
    with pytest.raises(ConfigError, match=r"^metric._target_='this.s': not a metric class"):
        check_component("metric", {"_target_": "this.s"})
    assert "this" not in sys.modules
    with pytest.raises(ConfigError, match=r"^compensation._target_='tests.test_validation.OptionalKnobs'"):
        check_component("compensation", {"_target_": "tests.test_validation.OptionalKnobs", "width": 2, "name": None})
    monkeypatch.setenv("GRADMAP_ALLOW_TARGETS", "tests.test_validation.OptionalKnobs")
    built = check_component("compensation", {"_target_": "tests.test_validation.OptionalKnobs", "width": 2,
                                             "name": None})
    assert built.width == 2


def test_an_unwritable_cache_is_refused_before_work_when_the_run_writes_there(tmp_path, monkeypatch):
    """A cache the run would write to (selections) but cannot: one line naming cache_dir at validation, before the
    model is loaded; the same cache read-only with cache_selection=false is fine. (os.access is what the check
    asks; it is told the folder is read-only, as it would be for a user other than root.)"""
    import gradmap.path_checks

    cache = (tmp_path / "cache").resolve()
    (cache / "selections").mkdir(parents=True)
    real = os.access
    monkeypatch.setattr(gradmap.path_checks.os, "access",
                        lambda p, mode: False if Path(p) == cache / "selections" and mode & os.W_OK else real(p, mode))
    with pytest.raises(ConfigError, match=r"^cache_dir='.*': .*selections is not writable .*cache_selection=true"):
        run(make_cfg(tmp_path, "num_prune=1"), tmp_path / "job", CHOICES)
    rec = _record(tmp_path / "job")
    assert rec["status"] == "failed" and rec["error"]["key"] == "cache_dir" and rec["timings"] is None
    again = run(make_cfg(tmp_path, "num_prune=1", "cache_selection=false"), tmp_path / "job2", CHOICES)
    assert again["status"] == "done"
