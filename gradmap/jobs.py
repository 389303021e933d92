"""The life of one job and its `record.json`: attempts, refusals, failures, interrupts, stale records.

`run_job` is what `run.py` calls for every Hydra job (and `gradmap.runner.run` for tests and scripts):

1. Read the job folder's previous record. A record left `running` by a process that is gone (SIGKILL, out of
   memory, power loss) is marked `interrupted` and the job runs again; one whose process is still alive is refused
   (two processes must never write one record).
2. Skip the job if its record is `done` with the same resolved config (`force=true` reruns it).
3. Write a `running` record at once (so even a job refused at validation leaves one), then validate the config
   (`gradmap.validation`), then run it (`gradmap.runner.Run`).
4. End the attempt: `done`, `failed` (a refused value or a fault: exit 2; anything unexpected: exit 1, the traceback
   in the record) or `interrupted` (Ctrl-C, SIGTERM: exit 130 / 143).

The record is a `gradmap.record.RunRecord`; its `attempts` keep every attempt (pid, host, start, end, status, reason,
sweep), so the record's history says what happened to the job. A previous record written by older code is read
through `RunRecord.from_dict` (upgraded), one written by newer code is refused. Standard library and omegaconf
only: a refused run never imports torch.

`run` is `run_job` for tests and scripts: it raises a failure (after recording it) and returns the record as
`record.json` holds it.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradmap.errors import MEMORY_ONLY_METRIC_KEYS, OOM_HINT, ConfigError, brief, one_line
from gradmap.files import atomic_write_json, move_aside, read_json
from gradmap.overrides import check_overrides
from gradmap.record import RecordVersionError, RunRecord
from gradmap.runfolder import lock_folder, quiet_broken_pipe, third_party_caches, unlock_folder
from gradmap.validation import resolve, validate

__all__ = ["Interrupted", "JobRecord", "JobResult", "install_signal_handlers", "quiet_broken_pipe", "report", "run",
           "run_job"]

RECORD = "record.json"
SWEEP_ENV = "GRADMAP_SWEEP_ID"  # set by gradmap.sweep.SweepSummary for the jobs of one sweep
# Keys that say how to run a job, not what it computes: a finished job is skipped whatever their values (so a
# record written before `save_overwrite` existed still counts as the same job).
RUN_ONLY_KEYS = ("force", "save_overwrite", "extra_keys")


def same_job(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two resolved configs describe the same computation."""
    def strip(c: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in c.items() if k not in RUN_ONLY_KEYS}
        if isinstance(out.get("metric"), dict):  # memory-only knobs: the same computation whatever their value
            out["metric"] = {k: v for k, v in out["metric"].items() if k not in MEMORY_ONLY_METRIC_KEYS}
        return out

    return isinstance(a, dict) and isinstance(b, dict) and strip(a) == strip(b)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ------------------------------------------------------------------------------------------------- signals

class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM while a job runs (a KeyboardInterrupt, so `except Exception` never swallows it)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(self.reason)

    @property
    def reason(self) -> str:
        if self.signum == signal.SIGINT:
            return "interrupted by Ctrl-C (SIGINT)"
        return f"terminated by {signal.Signals(self.signum).name}"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_STOPPING: list[int] = []  # the signal being handled: later ones must not interrupt the recording of the first


def install_signal_handlers() -> None:
    """Ctrl-C and SIGTERM raise `Interrupted`, so the job records why it stopped (main thread only). Only the
    first signal raises: Ctrl-C pressed again while the job records its interruption is ignored (it would cut
    the record's write short and leave it `running`)."""
    _STOPPING.clear()

    def handler(signum, _frame):
        if _STOPPING:
            return
        _STOPPING.append(signum)
        raise Interrupted(signum)

    try:
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. a thread-based launcher): keep the defaults
        pass


def interrupt_reason(err: BaseException) -> tuple[str, int]:
    if isinstance(err, Interrupted):
        return err.reason, err.exit_code
    return "interrupted by Ctrl-C (SIGINT)", 128 + signal.SIGINT


# ---------------------------------------------------------------------------------------- process liveness

def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): with the pid, it tells a
    live process from a later one that reused the pid. None where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def attempt_alive(attempt: dict[str, Any]) -> bool | None:
    """True / False whether the attempt's process is still running; None when that cannot be told (another
    host)."""
    if attempt.get("host") != socket.gethostname():
        return None
    pid = attempt.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return False
    recorded = attempt.get("process_start")
    return recorded is None or process_start(pid) in (None, recorded)


def new_attempt() -> dict[str, Any]:
    return {"status": "running", "pid": os.getpid(), "host": socket.gethostname(),
            "process_start": process_start(os.getpid()), "started": now(), "started_unix": time.time(),
            "sweep": os.environ.get(SWEEP_ENV)}


# ------------------------------------------------------------------------------------------------ the record

class JobRecord:
    """`record.json` of one job folder and its attempt history."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / RECORD
        self.writable = True  # False when another live process owns the record (or wrote a newer schema)
        self.write_error: str | None = None
        self.previous: RunRecord | None = self._read_previous()
        self.attempts: list[dict[str, Any]] = [a for a in (self.previous.attempts if self.previous else [])
                                               if isinstance(a, dict)]
        self.attempt = new_attempt()
        self.record = RunRecord()

    def _read_previous(self) -> RunRecord | None:
        previous = read_json(self.path, discard_corrupt=False)
        if previous is None:
            return None
        try:
            return RunRecord.from_dict(previous)
        except RecordVersionError as err:
            self.writable = False  # never overwrite what newer code wrote
            raise ConfigError("hydra.run.dir", str(self.out_dir), "a gradmap that reads this record, or another "
                              "output folder", problem=f"{self.path}: {err}") from err
        except (TypeError, ValueError) as err:
            move_aside(self.path, f"not a record ({err})")
            return None

    def recover(self, force: bool) -> str | None:
        """Handle a previous record left `running`: refuse if its process is alive, else mark it interrupted."""
        prev = self.previous
        if prev is None or prev.status != "running":
            return None
        last = self.attempts[-1] if self.attempts and self.attempts[-1].get("status") == "running" else None
        state = attempt_alive(last) if last is not None else False
        if last is not None and state is True and last.get("pid") != os.getpid():
            self.writable = False
            raise ConfigError("hydra.run.dir", str(self.out_dir), "another output folder, or wait for it to finish",
                              problem=f"this job is running in process {last['pid']}"
                                      + (f" (started {last['started']})" if last.get("started") else ""))
        if state is None and not force:
            self.writable = False
            raise ConfigError("hydra.run.dir", str(self.out_dir), "force=true to take it over if that process is gone",
                              problem=f"the record says the job is running on host {last.get('host')} "
                                      f"(pid {last.get('pid')}), which cannot be checked from here")
        who = f"process {last.get('pid')} on {last.get('host')}" if last else "its process"
        reason = f"{who} ended without finishing (killed, e.g. SIGKILL or out of memory, or crashed)"
        if last is not None:
            last.update(status="interrupted", reason=reason, detected=now())
        else:  # a record written before attempts were kept
            self.attempts.append({"status": "interrupted", "reason": reason, "started": prev.started,
                                  "detected": now()})
        message = f"[gradmap] {self.out_dir}: the previous attempt was interrupted ({reason}); running it again"
        print(message, flush=True)
        return reason

    def finished(self, resolved: dict[str, Any]) -> RunRecord | None:
        prev = self.previous
        if prev is not None and prev.status == "done" and same_job(prev.config, resolved):
            return prev
        return None

    def skip(self) -> RunRecord:
        rec = self.previous
        rec.reruns_skipped.append(now())
        self.attempt.update(status="skipped", ended=now())
        rec.attempts = self.attempts + [self.attempt]
        self.record = rec
        atomic_write_json(self.path, rec.to_dict())
        print(f"[gradmap] skipped: {self.path} is done with the same config (force=true reruns)", flush=True)
        return rec

    def begin(self, config: dict[str, Any], choices: dict[str, str]) -> RunRecord:
        self.record = RunRecord(config=config, choices=choices, started=now(), status="running",
                                attempts=self.attempts + [self.attempt])
        self.save()
        return self.record

    def save(self) -> None:
        if not self.writable:
            return
        try:
            atomic_write_json(self.path, self.record.to_dict())
        except OSError as err:  # an unwritable run folder must not hide the job's own error
            if self.write_error is None and self.record.status == "running":
                raise ConfigError("hydra.run.dir", str(self.out_dir), "a writable folder",
                                  problem=f"{self.path} cannot be written ({err})") from err
            self.write_error = str(err)

    def end(self, status: str, reason: str | None = None, error: dict[str, Any] | None = None) -> None:
        self.attempt.update(status=status, ended=now())
        if reason:
            self.attempt["reason"] = reason
        self.record.status = status
        if error is not None:
            self.record.error = error
        if status == "done":
            self.record.error = None
        self.save()


# ------------------------------------------------------------------------------------------------- a job

@dataclass
class JobResult:
    status: str  # done | skipped | failed | interrupted
    exit_code: int
    line: str | None  # the one line printed for a failed or interrupted job
    record: RunRecord


def _error_dict(err: BaseException, tb: str | None) -> dict[str, Any]:
    out = {"type": type(err).__name__, "message": one_line(err), "traceback": tb}
    if isinstance(err, ConfigError):
        out.update(err.as_dict())
    return out


def _folder_key(path: Path, out_dir: Path, config: dict[str, Any]) -> str:
    from gradmap.cache import cache_root_of
    from gradmap.path_checks import resolve_path

    places = [("hydra.run.dir", out_dir), ("cache_dir", cache_root_of(config))]
    if config.get("save_dir"):
        places.append(("save_dir", Path(config["save_dir"])))
    for key, folder in places:
        folder = resolve_path(str(folder))
        if path == folder or folder in path.parents:
            return key
    return "disk"


def _is_oom(err: BaseException) -> bool:
    from gradmap.oom import is_oom  # torch is loaded (checked by the caller): validation never imports it

    return is_oom(err)


def _as_fault(err: BaseException, record: RunRecord, out_dir: Path | None = None) -> ConfigError | None:
    """Faults a user meets at run time that are not bugs: out of memory, a full or read-only disk."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        where = Path(err.filename).resolve() if isinstance(err.filename, str) else None
        key = _folder_key(where, Path(out_dir or "."), record.config or {}) if where else "disk"
        folder = where.parent if where is not None and not where.is_dir() else where
        verb = "opening" if err.errno == errno.EACCES else "writing"  # permission denied: reading or writing
        return ConfigError(key, str(folder) if folder else None, problem=f"{os.strerror(err.errno).lower()} "
                           f"{verb} {where or 'a file'}", hint="free space or fix permissions there, then rerun")
    if isinstance(err, MemoryError) or ("torch" in sys.modules and _is_oom(err)):  # where no retry applied
        stage = record.failed_stage or "?"
        calib = record.config.get("calibration") or {}
        return ConfigError("calibration.batch_size", calib.get("batch_size"),
                           problem=f"out of memory in stage '{stage}' ({type(err).__name__})", hint=OOM_HINT)
    return None


UNRECORDED: list[tuple[str, str]] = []  # sweep jobs refused before a record could be written (job folder, line)


def run_job(cfg: Any, out_dir: str | Path, choices: dict[str, str] | None = None, raise_errors: bool = False,
            overrides: list[str] | None = None, sweep_dir: str | Path | None = None) -> JobResult:
    """Run one job in `out_dir` (see the module docstring). With `raise_errors`, a failure is recorded and then
    raised (tests, scripts); otherwise it is returned as a JobResult with the one line to print and an exit code.
    `overrides`: the command line's (checked: no key twice, a known experiment); `sweep_dir`: the sweep folder the
    job folder must be inside."""
    choices = dict(choices or {})
    locked = False
    try:
        if sweep_dir is not None and not _inside(Path(out_dir), Path(sweep_dir)):
            raise ConfigError("hydra.sweep.subdir", str(out_dir), f"a folder inside hydra.sweep.dir={sweep_dir}",
                              problem="the job folder is outside the sweep folder")
        locked = lock_folder(out_dir)  # one process per run folder (run.py took it already for a single run)
        job = JobRecord(out_dir)
    except ConfigError as err:  # the folder is another's, or holds a record this code must not overwrite
        if locked:
            unlock_folder(out_dir)
        if sweep_dir is not None:
            UNRECORDED.append((str(out_dir), str(err)))
        if raise_errors:
            raise
        return JobResult("failed", 2, str(err), RunRecord(choices=choices, status="failed"))
    try:
        return _run_job(cfg, Path(out_dir), choices, raise_errors, overrides, job)
    finally:
        if locked:
            unlock_folder(out_dir)


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return folder in path.parents


def _run_job(cfg: Any, out_dir: Path, choices: dict[str, str], raise_errors: bool, overrides: list[str] | None,
             job: JobRecord) -> JobResult:
    from omegaconf import OmegaConf

    try:
        try:
            resolved = resolve(cfg)
        except ConfigError:
            job.begin(OmegaConf.to_container(cfg, resolve=False), choices)
            raise
        force = resolved.get("force") is True
        job.recover(force)
        done = None if force else job.finished(resolved)
        if done is not None:
            return JobResult("skipped", 0, None, job.skip())
        job.begin(resolved, choices)
        check_overrides(overrides, choices)
        checked = validate(resolved, run_dir=out_dir)
        third_party_caches(checked.cache, Path(out_dir))
        from gradmap.runner import Run  # the heavy imports (torch, transformers) only once the config is valid

        rec = Run(checked, Path(out_dir), job).execute()
        return JobResult("done", 0, None, rec)
    except ConfigError as err:
        job.end("failed", reason=str(err), error=_error_dict(err, traceback.format_exc() if err.__cause__ else None))
        if raise_errors:
            raise
        return JobResult("failed", 2, str(err), job.record)
    except KeyboardInterrupt as err:
        reason, code = interrupt_reason(err)
        job.end("interrupted", reason=reason, error={"type": type(err).__name__, "message": reason,
                                                     "traceback": traceback.format_exc()})
        if raise_errors:
            raise
        return JobResult("interrupted", code, f"{reason}; {job.path} records it, and rerunning the same command "
                                              "resumes", job.record)
    except Exception as err:  # noqa: BLE001  (recorded with its traceback, then reported in one line)
        tb = traceback.format_exc()
        fault = _as_fault(err, job.record, out_dir)
        if fault is not None:
            job.end("failed", reason=str(fault), error={**_error_dict(fault, tb), "type": type(err).__name__})
            if raise_errors:
                raise fault from err
            return JobResult("failed", 2, str(fault), job.record)
        line = f"{brief(err, 300)} (unexpected; the traceback is in {job.path})"
        job.end("failed", reason=line, error=_error_dict(err, tb))
        if raise_errors:
            raise
        return JobResult("failed", 1, line, job.record)


def report(result: JobResult, multirun: bool = False) -> None:
    """Print the one line of a failed or interrupted job on stderr."""
    if result.line is None:
        return
    label = "interrupted" if result.status == "interrupted" else "error"
    print(f"[gradmap] {label}: {result.line}", file=sys.stderr, flush=True)


def run(cfg: Any, out_dir: str | Path, choices: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one job (validation, pipeline, record history; `run_job`) and return its record as `record.json` holds it.
    A refused config or a failure is recorded in `out_dir/record.json` and raised."""
    return run_job(cfg, Path(out_dir), choices or {}, raise_errors=True).record.to_dict()
