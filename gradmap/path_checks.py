"""Checks of the paths a run reads and writes, before any work: the pruned-model folder (`save_dir`), the cache
folder (`cache_dir`), data files. Each refuses with a `ConfigError` naming the key. Standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path

from gradmap.errors import ConfigError


def resolve_path(path: str) -> Path:
    return Path(os.path.expanduser(path)).resolve()


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_creatable(key: str, value: str, path: Path) -> None:
    """A folder that does not exist yet must be creatable: its nearest existing ancestor is a writable folder."""
    anchor = _nearest_existing(path.parent if path.exists() else path)
    if not anchor.is_dir():
        raise ConfigError(key, value, "a path under a writable folder", problem=f"{anchor} is a file, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise ConfigError(key, value, "a path under a writable folder", problem=f"{anchor} is not writable")


PRUNING_INFO = "pruning_info.json"  # what marks a folder as a pruned checkpoint this project wrote


def git_work_tree(path: Path) -> Path | None:
    """The root of the git work tree holding `path` (a `.git` folder or file in it or an ancestor), or None."""
    for folder in (path, *path.parents):
        if (folder / ".git").exists():
            return folder
    return None


def _contains_git(path: Path, limit: int = 10_000) -> Path | None:
    """A `.git` inside the folder `path` (walked breadth-first up to `limit` entries: a checkpoint is flat)."""
    seen = 0
    for dirpath, dirnames, filenames in os.walk(path):
        if ".git" in dirnames or ".git" in filenames:
            return Path(dirpath) / ".git"
        seen += len(dirnames) + len(filenames)
        if seen > limit:
            return None
    return None


def check_save_dir(save_dir: str, overwrite: bool, caches: list[Path], run_dir: Path | None,
                   inputs: dict[str, Path] | None = None) -> Path:
    """The pruned-model folder. Never inside (or around) an asset cache, never around this run's folder, the
    working directory or its ancestors, home, or any input file of the run (`inputs`: key -> path); never a git
    work tree or inside git's own folder; not a file. An existing non-empty folder is replaced only with
    `save_overwrite=true` and only when it is a pruned checkpoint this project wrote (its `pruning_info.json`)."""
    key = "save_dir"
    if not str(save_dir).strip():
        raise ConfigError(key, save_dir, "a folder path, or null (do not save)", problem="empty path")
    path = resolve_path(save_dir)
    for cache in caches:
        if _within(path, cache):
            raise ConfigError(key, save_dir, "a folder outside the asset cache",
                              problem=f"{path} is inside the asset cache {cache} (it would replace cached files)")
        if _within(cache, path):
            raise ConfigError(key, save_dir, "a folder outside the asset cache",
                              problem=f"{path} contains the asset cache {cache}")
    if run_dir is not None and _within(Path(run_dir).resolve(), path):
        raise ConfigError(key, save_dir, "a folder that does not contain this run's output folder",
                          problem=f"{path} contains the run folder {run_dir}")
    for guarded in (Path.cwd(), Path.home(), Path(path.anchor)):
        if _within(guarded.resolve(), path):
            raise ConfigError(key, save_dir, "a dedicated folder for the checkpoint",
                              problem=f"{path} contains {guarded} (replacing it would delete it)")
    for input_key, input_path in (inputs or {}).items():
        if _within(Path(input_path).resolve(), path):
            raise ConfigError(key, save_dir, "a folder that holds none of the run's inputs",
                              problem=f"{path} holds {input_key}={str(input_path)!r} (replacing it would delete it)")
    if ".git" in path.parts:
        raise ConfigError(key, save_dir, "a folder outside git's own folder", problem=f"{path} is inside a .git folder")
    if (path / ".git").exists():
        raise ConfigError(key, save_dir, "a dedicated folder for the checkpoint",
                          problem=f"{path} is a git work tree (replacing it would delete it)")
    if path.exists():
        if not path.is_dir():
            raise ConfigError(key, save_dir, "a folder", problem=f"{path} is an existing file")
        if any(path.iterdir()):
            if not overwrite:
                raise ConfigError(key, save_dir, "an empty or new folder, or save_overwrite=true to replace it",
                                  problem=f"{path} is a non-empty folder")
            if not (path / PRUNING_INFO).is_file():
                raise ConfigError(key, save_dir, f"an empty or new folder, or a pruned checkpoint of gradmap (with "
                                  f"its {PRUNING_INFO}) to replace", problem=f"{path} is a non-empty folder gradmap "
                                  "did not write (save_overwrite=true replaces only its own checkpoints)")
            inner = _contains_git(path)
            if inner is not None:
                raise ConfigError(key, save_dir, "a dedicated folder for the checkpoint",
                                  problem=f"{path} contains a git repository ({inner})")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise ConfigError(key, save_dir, "a path under a writable folder", problem=f"{path.parent} is not writable")
    else:
        check_creatable(key, save_dir, path)
    return path


def check_cache_writable(cache: Path, why: str) -> None:
    """A run that writes into the cache (`why`: the keys that make it) needs the cache and its entry folders
    writable: said before any work, not after minutes of it."""
    for folder in (cache, cache / "selections", cache / "dense_eval"):
        if folder.exists() and not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError("cache_dir", str(cache), "a writable folder, or a read-only cache with "
                              "cache_selection=false eval.cache_dense=false", problem=f"{folder} is not writable "
                              f"and this run writes there ({why})")
    if not cache.exists():
        check_creatable("cache_dir", str(cache), cache)


def check_cache_dir(cache_dir: str | None) -> Path:
    """The run's cache folder: `cache_dir`, else the default cache (`$GRADMAP_CACHE` or ~/.cache/gradmap)."""
    from gradmap.assets import cache_root

    if cache_dir is None:
        return cache_root(default=True)
    if not str(cache_dir).strip():
        raise ConfigError("cache_dir", cache_dir, "a folder path, or null ($GRADMAP_CACHE or ~/.cache/gradmap)",
                          problem="empty path")
    path = resolve_path(cache_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError("cache_dir", cache_dir, "a folder", problem=f"{path} is an existing file")
    check_creatable("cache_dir", cache_dir, path)
    return path


def check_file(key: str, value: str) -> Path:
    path = resolve_path(value)
    if not path.exists():
        raise ConfigError(key, value, "an existing file", problem="no such file")
    if not path.is_file():
        raise ConfigError(key, value, "an existing file", problem="not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(key, value, "a readable file", problem="not readable")
    return path
