"""Out of memory (issue 17): a stage that runs out of accelerator memory is retried with half the micro-batch, the
result is unchanged and the record says so; at micro-batch 1 (or where a retry is not safe) the run ends with one
line naming the memory knobs and a failed record. The error is injected on the CPU (torch.OutOfMemoryError)."""

from __future__ import annotations

import json

import pytest
import torch

import gradmap.evaluation
from gradmap.jobs import run, run_job
from gradmap.oom import KNOBS, OutOfMemory, is_oom, retry_halving
from methods.gradmap.metric import GradMAPMetric
from methods.gradmap.projection import ProjectionCompensation
from tests.test_runner import CHOICES, make_cfg


def oom() -> Exception:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_retry_halving_halves_until_it_fits_and_reports_each_retry():
    seen, retries = [], []

    def attempt(bs):
        seen.append(bs)
        if bs > 2:
            raise oom()
        return bs

    assert retry_halving(attempt, stage="score", key="calibration.batch_size", batch_size=8,
                         on_retry=retries.append) == 2
    assert seen == [8, 4, 2]
    assert [(r["from"], r["to"], r["stage"]) for r in retries] == [(8, 4, "score"), (4, 2, "score")]


@pytest.mark.parametrize("allowed,can_retry,batch,why", [(True, None, 1, "at micro-batch 1"),
                                                          (False, None, 8, "would change the result"),
                                                          (True, lambda: False, 8, "after the model was changed")])
def test_retry_halving_gives_up_with_one_line_naming_the_knobs(allowed, can_retry, batch, why):
    def attempt(bs):
        raise oom()

    with pytest.raises(OutOfMemory) as err:
        retry_halving(attempt, stage="compensate", key="calibration.batch_size", batch_size=batch,
                      on_retry=lambda r: None, allowed=allowed, can_retry=can_retry)
    line = str(err.value)
    assert "\n" not in line and why in line and "stage 'compensate'" in line
    assert all(k in line for k in KNOBS)


def test_other_errors_are_not_retried():
    calls = []

    def attempt(bs):
        calls.append(bs)
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError):
        retry_halving(attempt, stage="score", key="k", batch_size=8, on_retry=lambda r: None)
    assert calls == [8] and not is_oom(ValueError("x")) and is_oom(RuntimeError("CUDA error: out of memory"))


def test_fingerprint_sees_a_weight_turned_nan():
    from gradmap.models import tiny_random_llama
    from gradmap.oom import ParamFingerprint

    model = tiny_random_llama(num_layers=2)
    before = ParamFingerprint(model)
    assert before.unchanged(model)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    assert not before.unchanged(model)
    assert ParamFingerprint(model).unchanged(model)  # NaN before and after: the same


def fails_above(monkeypatch, cls, method, limit, read_bs):
    """Patch cls.method to raise an out-of-memory error while the micro-batch read by `read_bs` is above `limit`."""
    real = getattr(cls, method)

    def patched(self, *args, **kwargs):
        if read_bs(self, args, kwargs) > limit:
            raise oom()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, patched)


def test_scoring_oom_is_retried_with_smaller_micro_batches_and_the_selection_is_unchanged(tmp_path, monkeypatch):
    overrides = ("calibration.batch_size=4", "cache_selection=false", "compensation=none")
    plain = run(make_cfg(tmp_path, *overrides), tmp_path / "plain", CHOICES)
    fails_above(monkeypatch, GradMAPMetric, "score", 1, lambda self, a, kw: a[1].batch_size)
    rec = run(make_cfg(tmp_path, *overrides), tmp_path / "oom", CHOICES)
    assert rec["status"] == "done"
    assert [(r["stage"], r["from"], r["to"]) for r in rec["oom_retries"]] == [("score", 4, 2), ("score", 2, 1)]
    assert rec["removed_layers"] == plain["removed_layers"]
    assert rec["selection"]["decisions"][0]["scores"] == pytest.approx(plain["selection"]["decisions"][0]["scores"],
                                                                       rel=1e-6)
    # the failed attempts' tokens are not counted
    assert rec["timings"]["cost"]["score"] == plain["timings"]["cost"]["score"]


def test_evaluation_oom_is_retried(tmp_path, monkeypatch):
    overrides = ("compensation=none",)
    plain = run(make_cfg(tmp_path, *overrides), tmp_path / "plain", CHOICES)
    real = gradmap.evaluation.perplexity

    def patched(model, token_ids, seq_len, batch_size=8, **kw):
        if batch_size > 1:
            raise oom()
        return real(model, token_ids, seq_len, batch_size=batch_size, **kw)

    monkeypatch.setattr(gradmap.evaluation, "perplexity", patched)
    rec = run(make_cfg(tmp_path, *overrides, "force=true"), tmp_path / "oom", CHOICES)
    stages = {r["stage"] for r in rec["oom_retries"]}
    assert "evaluate" in stages and all(r["key"] == "eval.perplexity.batch_size" for r in rec["oom_retries"])
    assert rec["results"]["headline"]["pruned"] == pytest.approx(plain["results"]["headline"]["pruned"], rel=1e-6)


def test_oom_at_micro_batch_one_ends_with_one_line_and_a_failed_record(tmp_path, monkeypatch):
    fails_above(monkeypatch, GradMAPMetric, "score", 0, lambda self, a, kw: a[1].batch_size)
    out = tmp_path / "job"
    result = run_job(make_cfg(tmp_path, "calibration.batch_size=2"), out, CHOICES)
    assert result.status == "failed" and result.exit_code != 0
    assert "\n" not in result.line and all(k in result.line for k in KNOBS) and "micro-batch 1" in result.line
    saved = json.loads((out / "record.json").read_text())
    assert saved["status"] == "failed" and saved["failed_stage"] == "score"
    assert [r["to"] for r in saved["oom_retries"]] == [1]


def test_compensation_oom_after_a_fold_is_not_retried(tmp_path, monkeypatch):
    """A failed attempt that already changed weights cannot be rerun on the changed model: one line, failed."""
    real = ProjectionCompensation.apply

    def fold_then_oom(self, model, removed, calib, cost):
        real(self, model, removed, calib, cost)  # the folds happen...
        raise oom()  # ...then memory runs out

    monkeypatch.setattr(ProjectionCompensation, "apply", fold_then_oom)
    result = run_job(make_cfg(tmp_path), tmp_path / "job", CHOICES)
    assert result.status == "failed" and "after the model was changed" in result.line
    assert all(k in result.line for k in KNOBS)


def test_compensation_oom_before_any_change_is_retried(tmp_path, monkeypatch):
    fails_above(monkeypatch, ProjectionCompensation, "apply", 1, lambda self, a, kw: a[2].batch_size)
    rec = run(make_cfg(tmp_path, "cache_selection=false"), tmp_path / "job", CHOICES)
    assert rec["status"] == "done"
    assert [(r["stage"], r["to"]) for r in rec["oom_retries"]] == [("compensate", 1)]
