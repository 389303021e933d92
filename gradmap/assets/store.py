"""The asset cache: where it is, when a folder counts as finished, what it must hold, and building into it.

The cache is `$GRADMAP_CACHE` (default `~/.cache/gradmap`), one folder per asset; a run's `cache_dir` moves it for
the run (`use_cache_root`). A folder counts as finished only when it holds a `.complete` marker naming the sha256 of
its sources and its recipe version: it is built in a temporary sibling and renamed into place when done, so an
interrupted build never looks finished and is rebuilt on the next `ensure`. Before the marker, `manifest.json`
records the size and sha256 of every file of the folder: a run checks the sizes (cheap: a truncated weight file is
caught before loading), `--verify` the checksums. Folders built before manifests existed are checked through their
safetensors headers (the data size they declare).
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gradmap.assets.fetch import fetch, file_sha256, log
from gradmap.assets.registry import ASSETS, MODEL_FILES, check_name, marker_text
from gradmap.errors import UNSET, ConfigError

# A run's `cache_dir` while `use_cache_root` is active (None: the default root).
_RUN_ROOT: contextvars.ContextVar[Path | None] = contextvars.ContextVar("gradmap_cache_root", default=None)
MANIFEST = "manifest.json"


def cache_root(default: bool = False) -> Path:
    """The asset cache: a run's `cache_dir` while `use_cache_root` is active, else `$GRADMAP_CACHE`, default
    `~/.cache/gradmap` (shared with the runner's selection and dense-eval caches). `default=True` ignores the
    run's override."""
    override = _RUN_ROOT.get()
    if override is not None and not default:
        return override
    return Path(os.environ.get("GRADMAP_CACHE") or Path.home() / ".cache" / "gradmap").expanduser()


@contextlib.contextmanager
def use_cache_root(root: str | os.PathLike | None) -> Iterator[Path]:
    """Within the block, assets are read from (and built in) `root` (None: the default)."""
    if root is None:
        yield cache_root()
        return
    token = _RUN_ROOT.set(Path(root).expanduser())
    try:
        yield cache_root()
    finally:
        _RUN_ROOT.reset(token)


def asset_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    check_name(name)
    return Path(root) / name if root is not None else cache_root() / name


def is_complete(name: str, root: str | os.PathLike | None = None) -> bool:
    """True when the asset's folder holds a marker for exactly the pinned sources and the current recipe."""
    marker = asset_dir(name, root) / ".complete"
    try:
        return marker.read_text() == marker_text(ASSETS[name])
    except OSError:
        return False


# -------------------------------------------------------------------------------------------- integrity

def write_manifest(folder: Path) -> dict[str, Any]:
    """Record size and sha256 of every file in `folder` (written at build time, before the marker)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, ".complete")):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def safetensors_problem(path: Path) -> str | None:
    """A truncated or garbled safetensors file, from its header alone: the data size the header declares must be
    what the file holds (the check for folders built before manifests)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{path.name} is {size} bytes, too short for a safetensors header"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"{path.name} is {size} bytes; its header alone claims {n}"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as err:
        return f"{path.name} has an unreadable safetensors header ({err})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{path.name} is {size} bytes, its header says {8 + n + end} (truncated or corrupt)"
    return None


def quick_verify(name: str, root: str | os.PathLike | None = None, weights_sha256: bool = False) -> list[str]:
    """Problems found in a finished asset folder without hashing its data files: missing files, wrong sizes.
    `weights_sha256`: also hash the weight files (*.safetensors; ~0.5 s for SmolLM2's 540 MB), as a run does."""
    folder = asset_dir(name, root)
    problems = [f"{f} is missing" for f in ASSETS[name].files if not (folder / f).is_file()]
    if ASSETS[name].files == MODEL_FILES and not any(folder.glob("*.safetensors")):
        problems.append("the weights (*.safetensors) are missing")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        manifest = None
    except (OSError, ValueError) as err:
        return problems + [f"{MANIFEST} is unreadable ({err})"]
    if manifest is None:
        problems += [p for p in map(safetensors_problem, sorted(folder.glob("*.safetensors"))) if p]
        return problems
    for rel, want in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{rel} is {path.stat().st_size} bytes, {want['size']} when built (truncated or changed)")
        elif weights_sha256 and rel.endswith(".safetensors") and file_sha256(path) != want["sha256"]:
            problems.append(f"{rel} does not have the sha256 recorded when it was built (corrupt)")
    return problems


def verify(name: str, root: str | os.PathLike | None = None) -> tuple[list[str], bool]:
    """(problems, checksummed): `quick_verify` plus the sha256 of every file recorded in the manifest."""
    problems = quick_verify(name, root)
    folder = asset_dir(name, root)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return problems, False
    for rel, want in manifest.get("files", {}).items():
        path = folder / rel
        if path.is_file() and path.stat().st_size == want["size"] and file_sha256(path) != want["sha256"]:
            problems.append(f"{rel} does not have the sha256 recorded when it was built (corrupt)")
    return problems, True


@contextlib.contextmanager
def build_lock(name: str) -> Iterator[None]:
    """Serialise builds of one asset across processes (parallel Hydra jobs may all call `ensure`)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)



def asset_command(cache: Path, *args: str) -> str:
    """The command that builds (or checks) assets in `cache`."""
    env = "" if Path(cache) == cache_root(default=True) else f"GRADMAP_CACHE={cache} "
    return f"{env}python -m gradmap.assets {' '.join(args)}".strip()


def check_asset(key: str, name: str, cache: Path, value: Any = UNSET) -> Path:
    """The folder of a built, intact offline asset in `cache`, or ConfigError on `key` saying the command that
    builds it. `value`: the config value that made the run need the asset (default: the asset's name)."""
    value = name if value is UNSET else value
    if name not in ASSETS:
        raise ConfigError(key, value, sorted(ASSETS), problem="no such offline asset")
    folder = Path(cache) / name
    what = "the offline asset" if value == name else f"the offline asset {name!r} it reads"
    if not is_complete(name, root=cache):
        raise ConfigError(key, value, problem=f"{what} is not built in {cache}",
                          hint=f"build it with: {asset_command(cache, name)}")
    problems = quick_verify(name, root=cache, weights_sha256=True)
    if problems:
        raise ConfigError(key, value, problem=f"{what} in {folder} is corrupt ({problems[0]})",
                          hint=f"rebuild it with: {asset_command(cache, '--rebuild', name)}")
    return folder


# ------------------------------------------------------------------------------------------------ building


def ensure(name: str, force: bool = False) -> Path:
    """Return the finished cache folder of asset `name`, fetching and building it first if needed (`force`: build
    it again even if it is finished, e.g. after `--verify` found it corrupt; the old folder is replaced at the end)."""
    check_name(name)
    final = asset_dir(name)
    if is_complete(name) and not force:
        return final
    asset = ASSETS[name]
    with build_lock(name):
        if is_complete(name) and not force:  # another process finished it while we waited
            return final
        root = cache_root()
        for stale in root.glob(f".{name}.build-*"):  # left by an interrupted build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        log(f"building {name}: {asset.description}")
        t0 = time.perf_counter()
        build = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=root))
        try:
            downloads = build / ".downloads"
            sources = [fetch(key, downloads) for key in asset.sources]
            out = build / "out"
            out.mkdir()
            asset.build(sources, out)
            write_manifest(out)
            (out / ".complete").write_text(marker_text(asset))
            if final.exists():  # unfinished (no or stale marker), or rebuilt on request: replace
                log(f"{name}: replacing {'the' if force else 'unfinished'} folder {final}")
                old = final.with_name(f".{name}.old-{os.getpid()}")
                os.replace(final, old)
                os.replace(out, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(out, final)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        log(f"{name}: ready at {final} ({time.perf_counter() - t0:.1f} s)")
    return final


def status() -> list[dict[str, Any]]:
    rows = []
    for name, a in ASSETS.items():
        cached = is_complete(name)
        rows.append({"name": name, "cached": cached, "path": str(asset_dir(name)), "optional": a.optional,
                     "description": a.description, "problems": quick_verify(name) if cached else []})
    return rows
