"""The cluster path (issue 17): a sweep through the hydra-submitit-launcher, exercised without a cluster by its local
executor (`hydra/launcher=slurm_local`, the same pickling, submitit folder and result collection as
`hydra/launcher=slurm`): every job writes a done record, and a failing job makes the sweep summary exit non-zero."""

from __future__ import annotations

import json

import pytest

from tests.test_bad_inputs import cli_args, run_cli

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[test]' installs the launcher")


def test_submitit_local_sweep_writes_done_records_and_a_failing_job_fails_the_sweep(tmp_path):
    (tmp_path / "work").mkdir()
    sweep = tmp_path / "sweep"
    args = [a for a in cli_args([], cache=tmp_path / "cache", run=tmp_path / "run") if not a.startswith("hydra.")]
    base = ["-m", "hydra/launcher=slurm_local", *args, f"hydra.sweep.dir={sweep}", "compensation=none"]

    ok = run_cli([*base, "metric=bi,random", "num_prune=1"], tmp_path / "work", timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    records = {p.parent.name: json.loads(p.read_text()) for p in sweep.rglob("record.json")}
    assert len(records) == 2 and all(r["status"] == "done" for r in records.values())
    assert {r["choices"]["metric"] for r in records.values()} == {"bi", "random"}
    assert (sweep / ".submitit").is_dir()  # the jobs went through submitit
    assert f"[gradmap] sweep {sweep}: 2 jobs: 2 done, 0 skipped, 0 failed" in ok.stdout

    bad = run_cli([*base, "metric=bi", "num_prune=1,9"], tmp_path / "work", timeout=600)
    assert bad.returncode == 1, bad.stderr[-3000:]
    assert "Traceback" not in bad.stderr
    assert f"[gradmap] sweep {sweep}: 2 jobs: 0 done, 1 skipped, 1 failed" in bad.stdout
    failed = [line for line in bad.stdout.splitlines() if "  failed " in line]
    assert len(failed) == 1 and "num_prune=9" in failed[0]
