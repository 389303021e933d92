"""File primitives shared by the record, the caches and the assets (standard library only, so a run that fails at
validation never imports torch).

* Writes are atomic: a temporary file in the same folder, fsync, rename; readers never see half a file.
* Files get the permissions a plain `open()` would give them (0666 minus the umask), not `mkstemp`'s 0600, so a
  cache shared by a group on a cluster is readable by the group (with the usual umask 002, 022 or 027).
* A cache entry that cannot be used is moved aside (kept for inspection, never read again), not deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """What `open()` would give a new file: 0666 minus the process's umask (read at each write: it may change)."""
    return 0o666 & ~_umask()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file + rename in the same folder, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # tensors, numpy arrays
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=json_default, allow_nan=True) + "\n")


def move_aside(path: str | os.PathLike, why: str) -> Path | None:
    """Rename an unusable file to `<name>.bad-<time>` beside it (kept for inspection, never read again) and say so
    in one line. Returns the new path (None if the file was already gone, e.g. moved by a parallel job)."""
    path = Path(path)
    bad = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        os.replace(path, bad)
    except FileNotFoundError:
        return None
    print(f"[gradmap] warning: {path} is unusable ({why}); moved to {bad.name}, recomputing", flush=True)
    return bad


def read_json(path: str | os.PathLike, discard_corrupt: bool = True) -> Any | None:
    """A JSON file, or None if absent or corrupt; a corrupt cache entry is moved aside so it gets redone."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        if discard_corrupt:
            move_aside(path, f"invalid JSON: {err}")
        else:
            print(f"[gradmap] ignoring corrupt {path} ({err})", flush=True)
        return None
    except OSError as err:
        print(f"[gradmap] warning: cannot read {path} ({err}); ignoring it", flush=True)
        return None
