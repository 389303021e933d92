"""Caches that make sweeps cheap: pruning selections (scores / greedy removal orders) and finished jobs.

Selections are keyed by everything that determines them (model, metric config, calibration config, seed, dtype),
not by the prune ratio, so a ratio sweep scores once: a one-shot metric's single scoring pass serves every n, an
iterative metric's order for a larger n extends (or truncates) a cached shorter one, and span metrics reuse only
the same n. Entries are written atomically; a corrupt entry is reported, discarded and recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gradmap.metric import LayerMetric, Selection
from gradmap.record import atomic_write_json, stable_hash

CACHE_VERSION = 1


def selection_key(cfg: DictConfig) -> str:
    """Hash of what determines a metric's decisions; the prune ratio and the compensation are deliberately out."""
    return stable_hash({
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "metric": OmegaConf.to_container(cfg.metric, resolve=True),
        "calibration": OmegaConf.to_container(cfg.calibration, resolve=True),
        "seed": cfg.seed, "dtype": cfg.get("dtype"), "v": CACHE_VERSION,
    })


def read_json_entry(path: Path, discard_corrupt: bool = True) -> dict[str, Any] | None:
    """A cache/record JSON file, or None if absent or corrupt; a corrupt cache entry is deleted so it gets redone."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        print(f"[gradmap] {'discarding' if discard_corrupt else 'ignoring'} corrupt {path} ({err})", flush=True)
        if discard_corrupt:
            path.unlink(missing_ok=True)
        return None


class SelectionCache:
    """One JSON file per key: {"selections": {str(n): selection dict}}."""

    def __init__(self, root: Path):
        self.root = Path(root) / "selections"

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def lookup(self, key: str, metric: LayerMetric, n: int) -> tuple[Selection | None, bool]:
        """Return (selection to use or resume from, complete). complete=False means resume from it."""
        entry = read_json_entry(self.path(key))
        if not entry or "selections" not in entry:
            return None, False
        cached = {int(k): Selection.from_dict(v) for k, v in entry["selections"].items()}
        if n in cached:
            return cached[n], True
        if metric.reuse == "scores" and cached:
            return next(iter(cached.values())), True  # select() re-picks the n lowest from the same scores
        if metric.reuse == "prefix" and cached:
            longer = [m for m in cached if m > n]
            if longer:
                sel = cached[min(longer)]
                return Selection(removed=sel.removed[:n], decisions=sel.decisions[:n]), True
            return cached[max(cached)], False
        return None, False

    def store(self, key: str, n: int, selection: Selection, meta: dict[str, Any]) -> None:
        entry = read_json_entry(self.path(key)) or {"selections": {}, "meta": meta}
        entry["selections"][str(n)] = selection.as_dict()
        atomic_write_json(self.path(key), entry)


def finished_record(out_dir: Path, resolved_config: dict[str, Any]) -> dict[str, Any] | None:
    """The job's record if it already finished with exactly this resolved config (then the job is skipped)."""
    rec = read_json_entry(Path(out_dir) / "record.json", discard_corrupt=False)  # the job rewrites it
    if rec and rec.get("status") == "done" and rec.get("config") == resolved_config:
        return rec
    return None
