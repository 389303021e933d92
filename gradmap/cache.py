"""Caches that make sweeps cheap: pruning selections (scores / greedy removal orders) and dense evaluations.

Selections are keyed by everything that determines them (model, metric config, calibration config, seed, dtype),
not by the prune ratio, so a ratio sweep scores once: a one-shot metric's single scoring pass serves every n, an
iterative metric's order for a larger n extends (or truncates) a cached shorter one, and span metrics reuse only
the same n.

Entries are written atomically and checked on read: an entry that is not JSON, or is JSON of the wrong shape (a
selection whose scores do not cover the model's layers, a removal order that is not the decisions' removals, a
dense result without the texts and window lengths asked for), is reported in one line, moved aside
(`<entry>.bad-<time>`) and recomputed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gradmap.files import atomic_write_json, move_aside, read_json
from gradmap.metric import OPTIONAL_DECISION_FIELDS, Decision, LayerMetric, Selection
from gradmap.record import stable_hash

CACHE_VERSION = 1
DECISION_FIELDS = {"step": int, "scores": list, "removed": list, "seconds": (int, float),
                   "score_seconds": (int, float), "forward_tokens": int, "backward_tokens": int}


class CacheEntryError(ValueError):
    """A cache entry that parses but does not have the expected shape."""


def selection_key(cfg: DictConfig) -> str:
    """Hash of what determines a metric's decisions; the prune ratio and the compensation are deliberately out."""
    return stable_hash({
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "metric": OmegaConf.to_container(cfg.metric, resolve=True),
        "calibration": OmegaConf.to_container(cfg.calibration, resolve=True),
        "seed": cfg.seed, "dtype": cfg.get("dtype"), "v": CACHE_VERSION,
    })


def read_json_entry(path: Path, discard_corrupt: bool = True) -> dict[str, Any] | None:
    """A cache/record JSON file, or None if absent or corrupt; a corrupt cache entry is moved aside."""
    return read_json(path, discard_corrupt)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_selection(sel: Any, n: int, num_layers: int | None) -> None:
    """Raise CacheEntryError unless `sel` is a selection dict for `n` removals on a `num_layers`-layer model."""
    if not isinstance(sel, dict) or not isinstance(sel.get("removal_order"), list) \
            or not isinstance(sel.get("decisions"), list) or not sel["decisions"]:
        raise CacheEntryError(f"selection {n}: not a dict with a removal_order and decisions")
    order = sel["removal_order"]
    if len(order) != n or not all(_is_int(i) for i in order) or len(set(order)) != n:
        raise CacheEntryError(f"selection {n}: removal_order {order!r} is not {n} distinct layer indices")
    if num_layers is not None and not all(0 <= i < num_layers for i in order):
        raise CacheEntryError(f"selection {n}: removal_order {order} is out of range for {num_layers} layers")
    removed: list[int] = []
    for d in sel["decisions"]:
        if not isinstance(d, dict) or not set(DECISION_FIELDS) <= set(d) <= set(DECISION_FIELDS) | set(OPTIONAL_DECISION_FIELDS):
            raise CacheEntryError(f"selection {n}: a decision has keys {sorted(d) if isinstance(d, dict) else d!r}, "
                                  f"expected {sorted(DECISION_FIELDS)}")
        for key, kind in DECISION_FIELDS.items():
            if not isinstance(d[key], kind) or isinstance(d[key], bool):
                raise CacheEntryError(f"selection {n}: decision field {key}={d[key]!r} has the wrong type")
        scores = d["scores"]
        if num_layers is not None and len(scores) != num_layers:
            raise CacheEntryError(f"selection {n}: a decision scores {len(scores)} layers, the model has {num_layers}")
        if not all(s is None or (isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s))
                   for s in scores):
            raise CacheEntryError(f"selection {n}: a decision has scores that are not finite numbers or null")
        if not all(_is_int(i) for i in d["removed"]):
            raise CacheEntryError(f"selection {n}: a decision's removed layers {d['removed']!r} are not indices")
        removed += d["removed"]
    if removed != order:
        raise CacheEntryError(f"selection {n}: the decisions remove {removed}, the removal order says {order}")


def check_selection_entry(entry: Any, num_layers: int | None = None) -> dict[int, Selection]:
    """The selections of a cache entry ({"selections": {str(n): selection}}), or CacheEntryError."""
    if not isinstance(entry, dict) or not isinstance(entry.get("selections"), dict):
        raise CacheEntryError("not a dict with a 'selections' mapping")
    out: dict[int, Selection] = {}
    for key, sel in entry["selections"].items():
        try:
            n = int(key)
        except (TypeError, ValueError):
            raise CacheEntryError(f"selection key {key!r} is not a layer count") from None
        if n < 1:
            raise CacheEntryError(f"selection key {key!r} is not a layer count >= 1")
        check_selection(sel, n, num_layers)
        out[n] = Selection.from_dict(sel)
    return out


def check_dense_entry(entry: Any, key: str, texts: list[str], seq_lens: list[int], tasks: list[str]) -> dict:
    """The results of a dense-evaluation cache entry, or CacheEntryError unless it has exactly the key and, for
    every held-out text and window length asked for, a finite perplexity, and a result for every lm-eval task."""
    if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("results"), dict):
        raise CacheEntryError("not a dict with this entry's key and a 'results' mapping")
    results = entry["results"]
    ppl = results.get("perplexity")
    if not isinstance(ppl, dict) or not isinstance(results.get("lm_eval"), dict):
        raise CacheEntryError("results lack 'perplexity' or 'lm_eval'")
    for name in texts if seq_lens else []:
        text = ppl.get(name)
        if not isinstance(text, dict) or not isinstance(text.get("seq_lens"), dict):
            raise CacheEntryError(f"no perplexity for held-out text {name!r}")
        for seq_len in seq_lens:
            value = text["seq_lens"].get(str(seq_len), {})
            value = value.get("ppl") if isinstance(value, dict) else None
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise CacheEntryError(f"no finite perplexity for {name!r} at seq_len {seq_len}")
    for task in tasks:
        if not isinstance(results["lm_eval"].get(task), dict):
            raise CacheEntryError(f"no lm-eval result for task {task!r}")
    return results


class SelectionCache:
    """One JSON file per key: {"selections": {str(n): selection dict}}."""

    def __init__(self, root: Path):
        self.root = Path(root) / "selections"

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def entries(self, key: str, num_layers: int | None = None) -> dict[int, Selection]:
        """The checked selections of an entry; a malformed entry is moved aside (then recomputed)."""
        path = self.path(key)
        entry = read_json(path)
        if entry is None:
            return {}
        try:
            return check_selection_entry(entry, num_layers)
        except CacheEntryError as err:
            move_aside(path, f"malformed selection entry: {err}")
            return {}

    def lookup(self, key: str, metric: LayerMetric, n: int,
               num_layers: int | None = None) -> tuple[Selection | None, bool]:
        """Return (selection to use or resume from, complete). complete=False means resume from it."""
        cached = self.entries(key, num_layers)
        if not cached:
            return None, False
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

    def store(self, key: str, n: int, selection: Selection, meta: dict[str, Any],
              num_layers: int | None = None) -> None:
        check_selection(selection.as_dict() | {"removal_order": list(selection.removed)}, n, num_layers)
        entry = {"selections": {str(m): s.as_dict() for m, s in self.entries(key, num_layers).items()}, "meta": meta}
        entry["selections"][str(n)] = selection.as_dict()
        atomic_write_json(self.path(key), entry)


def finished_record(out_dir: Path, resolved_config: dict[str, Any]) -> dict[str, Any] | None:
    """The job's record if it already finished with exactly this resolved config (then the job is skipped)."""
    rec = read_json(Path(out_dir) / "record.json", discard_corrupt=False)  # the job rewrites it
    if isinstance(rec, dict) and rec.get("status") == "done" and rec.get("config") == resolved_config:
        return rec
    return None


__all__ = ["CacheEntryError", "Decision", "SelectionCache", "check_dense_entry", "check_selection_entry",
           "finished_record", "read_json_entry", "selection_key"]
