"""What a process owns while it runs a job: its run folder (one owner at a time: an `fcntl` lock), its standard
output (a reader that went away ends nothing), and where third-party libraries keep their caches (the run folder or
the project cache, not the user's home, unless the user chose their own). Standard library only.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from gradmap.errors import ConfigError
from gradmap.files import file_mode

LOCK_NAME = ".gradmap.lock"
_HELD: dict[Path, int] = {}  # folder -> the open, locked file (a lock lives as long as its descriptor)


class FolderTaken(BaseException):
    """Raised from a Hydra callback, which swallows every `Exception` (only warning about it): the folder belongs to
    another process. `error` is the ConfigError to print; `run.py` exits 2."""

    def __init__(self, error: ConfigError):
        super().__init__(str(error))
        self.error = error


def lock_folder(folder: str | os.PathLike, key: str = "hydra.run.dir") -> bool:
    """Make this process the one owner of `folder` (created if needed) until `unlock_folder` or exit; a second
    process is refused with a ConfigError naming `key`. Returns False if this process held it already."""
    folder = Path(folder).resolve()
    if folder in _HELD:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, file_mode())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(key, str(folder), "another output folder, or wait for that process to finish",
                          problem=f"another process (pid {holder}) is running in this folder") from None
    except OSError:  # a file system without locks: run as before (the record's pid check still applies)
        os.close(fd)
        return False
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[folder] = fd
    return True


def unlock_folder(folder: str | os.PathLike) -> None:
    fd = _HELD.pop(Path(folder).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the lock


# -------------------------------------------------------------------------------------------- broken pipes

class _QuietStream:
    """A text stream whose reader may go away (`run.py | head -1`): then its file descriptor is pointed at
    /dev/null and the run goes on, silently."""

    def __init__(self, stream):
        self._stream = stream

    def _gone(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def quiet_broken_pipe() -> None:
    if not isinstance(sys.stdout, _QuietStream) and sys.stdout is not None:
        try:
            sys.stdout.fileno()
        except (AttributeError, OSError, ValueError):  # not a real file (a test's capture): nothing to guard
            return
        sys.stdout = _QuietStream(sys.stdout)


# --------------------------------------------------------------------------------------- third-party caches

_OURS: dict[str, str] = {}  # variables this process set, and to what (a later job may move them; never the user's)


def third_party_caches(cache: Path, run_dir: Path) -> dict[str, str]:
    """Point the datasets, W&B and matplotlib caches at the project cache or the run folder, unless the user set
    the variable (or HF_HOME, for datasets). Returns what was set."""
    places = {"HF_DATASETS_CACHE": Path(cache) / "hf_datasets", "MPLCONFIGDIR": Path(cache) / "matplotlib",
              "WANDB_CACHE_DIR": Path(run_dir) / "wandb" / "cache", "WANDB_DATA_DIR": Path(run_dir) / "wandb" / "data",
              "WANDB_CONFIG_DIR": Path(run_dir) / "wandb" / "config"}
    set_now = {}
    for name, path in places.items():
        users = name in os.environ and os.environ[name] != _OURS.get(name)
        if users or (name == "HF_DATASETS_CACHE" and "HF_HOME" in os.environ):
            continue
        os.environ[name] = _OURS[name] = str(path)
        set_now[name] = str(path)
    datasets = sys.modules.get("datasets.config")  # read at import: already imported, tell it too
    if datasets is not None and "HF_DATASETS_CACHE" in set_now:
        datasets.HF_DATASETS_CACHE = Path(set_now["HF_DATASETS_CACHE"])
    return set_now
