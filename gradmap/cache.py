"""Caches that make sweeps cheap: pruning selections (scores / greedy removal orders) and dense evaluations.

Selections are keyed by everything that determines them (model, metric config, calibration config, seed, dtype),
not by the prune ratio, so a ratio sweep scores once: a one-shot metric's single scoring pass serves every n, an
iterative metric's order for a larger n extends (or truncates) a cached shorter one, and span metrics reuse only
the same n. `SelectionCache.reusable` is the one place that decides this, from the metric's `selection_kind`
(`gradmap.selection.SelectionKind`).

Entries are written atomically and checked on read: an entry that is not JSON, or is JSON of the wrong shape (a
selection whose scores do not cover the model's layers, a removal order that is not the decisions' removals, a
dense result without the texts and window lengths asked for), is reported in one line, moved aside
(`<entry>.bad-<time>`) and recomputed.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from gradmap.errors import MEMORY_ONLY_METRIC_KEYS
from gradmap.files import atomic_write_json, json_default, move_aside, read_json
from gradmap.selection import OPTIONAL_DECISION_FIELDS, Decision, Selection, SelectionKind

CACHE_VERSION = 1
DECISION_FIELDS = {"step": int, "scores": list, "removed": list, "seconds": (int, float),
                   "score_seconds": (int, float), "forward_tokens": int, "backward_tokens": int}


class CacheEntryError(ValueError):
    """A cache entry that parses but does not have the expected shape."""


def stable_hash(obj: Any, length: int = 16) -> str:
    """Content hash of a JSON-able object (key order independent)."""
    blob = json.dumps(obj, sort_keys=True, default=json_default)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def plain(node: Any) -> Any:
    """A config node as plain containers: a Hydra node with its interpolations resolved, a resolved one
    (`gradmap.validation.Checked.config`) copied. Keys hash the same either way."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return copy.deepcopy(node)


def hashed_group(node: Any) -> Any:
    """A metric/compensation node as keys hash it: a class that moved (`gradmap.targets.MOVED_TARGETS`) under its
    path from before the move, so entries computed before are still found."""
    from gradmap.targets import KEY_TARGETS

    node = plain(node)
    if isinstance(node, dict) and node.get("_target_") in KEY_TARGETS:
        node["_target_"] = KEY_TARGETS[node["_target_"]]
    return node


def scoring_revision(target: str | None) -> int:
    """The `scoring_revision` of the metric class a config's `_target_` names (0 if it names none or cannot be
    imported: validation refuses such a config before any key is needed)."""
    from gradmap.targets import MOVED_TARGETS

    module, _, name = MOVED_TARGETS.get(target, target or "").rpartition(".")
    try:
        return int(getattr(getattr(importlib.import_module(module), name), "scoring_revision", 0))
    except (ImportError, AttributeError, ValueError, TypeError):
        return 0


def without_memory_knobs(metric: dict[str, Any]) -> dict[str, Any]:
    """A metric config with its memory-only keys (`MEMORY_ONLY_METRIC_KEYS`) as the code before them had them
    (absent, or its old default), so selections cached before those keys existed are still found."""
    out = dict(metric)
    for key, old in MEMORY_ONLY_METRIC_KEYS.items():
        if key in out:
            if old is None:
                del out[key]
            else:
                out[key] = old
    return out


def without_added_keys(metric: dict[str, Any], target: str | None) -> dict[str, Any]:
    """A metric config without the keys added after its selections were first cached (`ADDED_METRIC_KEYS`) while
    they hold the value that computes what the code before them did, so those entries are still found."""
    from gradmap.record import ADDED_METRIC_KEYS

    neutral = ADDED_METRIC_KEYS.get(target, {})
    return {k: v for k, v in metric.items() if not (k in neutral and v == neutral[k])}


def model_key(cfg: Mapping[str, Any], bos: bool) -> dict[str, Any]:
    """The model part of a cache key: the model config, with `window_bos` replaced by what it resolved to when it
    was left to the family (`bos`, gradmap.windows): a family without BOS windows keeps the key it had before the
    key existed (its computation did not change), and one with them gets a new key."""
    model = plain(cfg["model"])
    if model.get("window_bos", "absent") is None:
        del model["window_bos"]
        if bos:
            model["bos_windows"] = True
    return model


def selection_key(cfg: Mapping[str, Any], bos: bool) -> str:
    """Hash of what determines a metric's decisions; the prune ratio and the compensation are deliberately out.
    `bos`: whether the run's windows start with a BOS token (`gradmap.windows.decide_window_bos`). A metric whose
    scoring changed (`LayerMetric.scoring_revision` > 0) adds its revision, so older entries are not reused; memory-only
    metric keys hash as the code before them had them (`without_memory_knobs`)."""
    parts = {
        "model": model_key(cfg, bos),
        "metric": without_added_keys(without_memory_knobs(hashed_group(cfg["metric"])), cfg["metric"].get("_target_")),
        "calibration": plain(cfg["calibration"]),
        "seed": cfg["seed"], "dtype": cfg.get("dtype"), "v": CACHE_VERSION,
    }
    revision = scoring_revision(cfg["metric"].get("_target_"))
    if revision:
        parts["scoring_revision"] = revision
    return stable_hash(parts)


def interleaved_key(cfg: Mapping[str, Any], bos: bool) -> str:
    """Key of a selection made together with its compensation (Prune&Comp): the selection key and the compensation
    config, since the compensation changes the model the metric rescores."""
    return stable_hash({"selection": selection_key(cfg, bos), "v": 1,
                        "compensation": hashed_group(cfg["compensation"])})


def dense_cache_key(cfg: Mapping[str, Any], bos: bool) -> str:
    """Dense results depend only on the model and the evaluation settings, and on the seed only through lm-eval:
    perplexity is deterministic, so a perplexity-only evaluation serves every calibration seed of a sweep."""
    evaluation = plain(cfg["eval"])
    lm_eval = evaluation.get("lm_eval") or {}
    seeded = bool(lm_eval.get("tasks"))
    if not seeded:
        lm_eval.pop("seed", None)
    return stable_hash({"model": model_key(cfg, bos), "eval": evaluation,
                        "dtype": cfg.get("dtype"), "seed": cfg["seed"] if seeded else None, "v": 2})


def cache_root_of(cfg: Mapping[str, Any]) -> Path:
    """The cache folder of a run config: its `cache_dir`, else `$GRADMAP_CACHE` or `~/.cache/gradmap`."""
    from gradmap.assets import cache_root

    return Path(cfg.get("cache_dir") or cache_root(default=True)).expanduser()


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
        allowed = set(DECISION_FIELDS) | set(OPTIONAL_DECISION_FIELDS)
        if not isinstance(d, dict) or not set(DECISION_FIELDS) <= set(d) <= allowed:
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


@dataclass
class CachedSelection:
    """What `SelectionCache.get_or_compute` gives: the selection, where it came from (`computed`, `cache`,
    `cache+extended`) and the decisions made now (not taken from the cache)."""

    selection: Selection
    source: str
    fresh: list[Decision]


class SelectionCache:
    """One JSON file per key: {"selections": {str(n): selection dict}}. `enabled=False` (`cache_selection=false`)
    reads and writes nothing."""

    def __init__(self, root: Path, enabled: bool = True):
        self.root = Path(root) / "selections"
        self.enabled = enabled

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

    def reusable(self, key: str, n: int, kind: SelectionKind,
                 num_layers: int | None = None) -> Selection | None:
        """A cached selection that serves `n` removals, or None: the one for n; for a one-shot ranking any one (its
        scores are re-picked); for a greedy order the first n decisions of a longer one, else the longest shorter
        one (to be continued); for a span only n."""
        cached = self.entries(key, num_layers)
        if not cached:
            return None
        if n in cached:
            return cached[n]
        if kind is SelectionKind.ONE_SHOT:
            return next(iter(cached.values()))
        if kind is SelectionKind.GREEDY:
            longer = [m for m in cached if m > n]
            if longer:
                sel = cached[min(longer)]
                return Selection(removed=sel.removed[:n], decisions=sel.decisions[:n])
            return cached[max(cached)]
        return None

    def get_or_compute(self, key: str, n: int, kind: SelectionKind,
                       compute: Callable[[Selection | None], Selection], meta: dict[str, Any],
                       num_layers: int | None = None) -> CachedSelection:
        """The selection for `n` removals: `compute(resume)` with the reusable cached selection (None when there is
        none, or the cache is off). Every metric's `select` (and Prune&Comp's loop) takes a `resume` as it is:
        re-picks a one-shot ranking's n lowest, continues or truncates a greedy order, returns a span for the same
        n, so `compute` is always called, and is cheap when the cache serves everything. A selection that added
        decisions is stored."""
        resume = self.reusable(key, n, kind, num_layers) if self.enabled else None
        selection = compute(resume)
        fresh = selection.decisions[len(resume.decisions) if resume is not None else 0:]
        source = "computed" if resume is None else ("cache" if not fresh else "cache+extended")
        if self.enabled and source != "cache":
            self.store(key, n, selection, meta, num_layers)
        return CachedSelection(selection, source, fresh)

    def store(self, key: str, n: int, selection: Selection, meta: dict[str, Any],
              num_layers: int | None = None) -> None:
        check_selection(selection.as_dict() | {"removal_order": list(selection.removed)}, n, num_layers)
        entry = {"selections": {str(m): s.as_dict() for m, s in self.entries(key, num_layers).items()}, "meta": meta}
        entry["selections"][str(n)] = selection.as_dict()
        atomic_write_json(self.path(key), entry)


__all__ = ["CacheEntryError", "CachedSelection", "Decision", "SelectionCache", "cache_root_of", "check_dense_entry",
           "check_selection_entry", "dense_cache_key", "interleaved_key", "read_json_entry",
           "selection_key", "stable_hash"]
