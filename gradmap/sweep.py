"""The end of a sweep: a summary (done / skipped / failed, each failure with its one-line reason) and the exit code.

`SweepSummary` is a Hydra callback (registered in `conf/config.yaml` under `hydra.callbacks`). At the start of a
multirun it gives the sweep an id (`$GRADMAP_SWEEP_ID`, inherited by every job, also by the joblib and SLURM
launchers' processes); each job's attempt in its `record.json` carries that id. At the end it reads the records of
the sweep folder, so the summary does not depend on the launcher: it also sees jobs that ran in other processes, and
jobs killed without a word (a record still `running` whose process is gone is reported as interrupted).

`run.py` exits non-zero when the summary has failures, so scripts and CI see a failed sweep.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from gradmap.errors import ConfigError
from gradmap.files import read_json
from gradmap.jobs import RECORD, SWEEP_ENV, UNRECORDED, attempt_alive
from gradmap.record import RecordVersionError, RunRecord
from gradmap.runfolder import FolderTaken, lock_folder

LAST_SUMMARY: Summary | None = None  # the summary of the sweep that ended last in this process (read by run.py)


@dataclass
class Summary:
    sweep_dir: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (job folder, one-line reason)

    @property
    def jobs(self) -> int:
        return len(self.done) + len(self.skipped) + len(self.failed)

    def lines(self) -> list[str]:
        head = (f"[gradmap] sweep {self.sweep_dir}: {self.jobs} jobs: {len(self.done)} done, "
                f"{len(self.skipped)} skipped, {len(self.failed)} failed")
        return [head] + [f"[gradmap]   failed {job}: {reason}" for job, reason in self.failed]


def summarize(sweep_dir: str | Path, sweep_id: str | None) -> Summary:
    """Classify the jobs under `sweep_dir` whose latest attempt belongs to sweep `sweep_id` (all jobs if None)."""
    summary = Summary(Path(sweep_dir))
    for path in sorted(Path(sweep_dir).rglob(RECORD)):
        raw = read_json(path, discard_corrupt=False)
        try:
            rec = RunRecord.from_dict(raw)
        except RecordVersionError as err:
            summary.failed.append((str(path.parent.relative_to(summary.sweep_dir)), f"record not read: {err}"))
            continue
        except (TypeError, ValueError):
            continue
        attempts = [a for a in rec.attempts if isinstance(a, dict)]
        mine = [a for a in attempts if sweep_id is None or a.get("sweep") == sweep_id]
        if not mine:
            continue
        last = mine[-1]
        job = str(path.parent.relative_to(summary.sweep_dir)) if path.parent != summary.sweep_dir else "."
        status = last.get("status")
        if status == "running" and attempt_alive(last) is False:
            status, last = "interrupted", {**last, "reason": f"process {last.get('pid')} ended without finishing"}
        if status == "done":
            summary.done.append(job)
        elif status == "skipped":
            summary.skipped.append(job)
        elif status == "running":  # still running elsewhere (another launcher process): not a failure yet
            summary.failed.append((job, "still running when the sweep ended"))
        else:
            summary.failed.append((job, f"{status}: {last.get('reason') or (rec.error or {}).get('message')}"))
    return summary


class SweepSummary(Callback):
    """Hydra callback: tag the sweep's jobs, then print the summary and remember it for the exit code. It also
    makes this process the one owner of the run folder (or the sweep folder) before Hydra writes `.hydra/` there,
    so a second process on the same folder is refused before it touches anything."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        try:
            lock_folder(config.hydra.run.dir, "hydra.run.dir")
        except ConfigError as err:
            raise FolderTaken(err) from None
        except OSError:  # the folder cannot be created: Hydra says so itself, in one line (run.py)
            pass

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        global LAST_SUMMARY
        LAST_SUMMARY = None
        try:
            lock_folder(config.hydra.sweep.dir, "hydra.sweep.dir")
        except ConfigError as err:
            raise FolderTaken(err) from None
        except OSError:
            pass
        UNRECORDED.clear()
        self.sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        os.environ[SWEEP_ENV] = self.sweep_id

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        global LAST_SUMMARY
        sweep_id = getattr(self, "sweep_id", None) or os.environ.get(SWEEP_ENV)
        LAST_SUMMARY = summarize(config.hydra.sweep.dir, sweep_id)
        LAST_SUMMARY.failed += [(job, f"refused: {line}") for job, line in UNRECORDED]  # no record to find
        for line in LAST_SUMMARY.lines():
            print(line, flush=True)
        os.environ.pop(SWEEP_ENV, None)
