"""`record.json`, the source of truth of a run (W&B only mirrors it): the typed, versioned `RunRecord`.

The runner (`gradmap.runner`), the job bookkeeping (`gradmap.jobs`), the loggers (`gradmap.loggers`) and the reports
(`experiments.records`) all read and write it through this class, so every key is written and read in one place.
`record.json` carries `schema_version`; `RunRecord.from_dict` is the one adapter for records written by earlier code
(version 0: no `schema_version`, model/calibration/eval/logger configs dispatched on `source`/`kind` strings), and
refuses records written by newer code (`RecordVersionError`). Standard library only (torch is imported only by
`environment()`).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# 1: RunRecord, `_target_` configs for every group (version 0: the dict records before; see `upgrade_v0`).
SCHEMA_VERSION = 1
STATUSES = ("running", "done", "failed", "interrupted")


class RecordVersionError(ValueError):
    """A record written by a newer gradmap (a higher `schema_version` than this code reads)."""


@dataclass
class RunRecord:
    """One job's record. Fields are None until the stage that sets them has run (a failed job keeps what it got)."""

    schema_version: int = SCHEMA_VERSION
    # The job (gradmap.jobs): the resolved config, the option chosen per group, every attempt.
    config: dict[str, Any] = field(default_factory=dict)
    choices: dict[str, Any] = field(default_factory=dict)
    started: str | None = None
    status: str = "running"  # running | done | failed | interrupted
    attempts: list[dict[str, Any]] = field(default_factory=list)  # pid, host, start, end, status, reason, sweep
    reruns_skipped: list[str] = field(default_factory=list)  # when a finished job was asked to run again
    error: dict[str, Any] | None = None  # type, message, traceback (+ key, value, allowed for a refused value)
    failed_stage: str | None = None
    finished: str | None = None
    # The run (gradmap.runner).
    environment: dict[str, Any] | None = None  # package versions, git commit, device
    timings: dict[str, Any] | None = None  # per stage: seconds, peak memory, token cost; pruning seconds and cost
    model_class: str | None = None
    num_layers: int | None = None
    num_prune: int | None = None
    prune_ratio: float | None = None
    effective_prune_ratio: float | None = None
    dtype: str | None = None
    windows: dict[str, Any] | None = None  # BOS at the start of every window: bos, bos_token_id, decided_by, ...
    calibration: dict[str, Any] | None = None  # num_samples, seq_len, tokens, split, bos
    heldout: dict[str, Any] | None = None  # per text: corpus, split, tokens
    dense_from_cache: str | None = None  # the dense-evaluation cache entry used (None: evaluated in this run)
    results: dict[str, Any] | None = None  # dense, pruned, retained_pct, headline {dense, pruned}
    selection_source: str | None = None  # computed | cache | cache+extended
    selection_cache_key: str | None = None
    original_scoring: dict[str, Any] | None = None  # seconds and tokens of the selection when it was computed
    selection: dict[str, Any] | None = None  # removed, removal_order, decisions
    removed_layers: list[int] | None = None
    compensation: dict[str, Any] | None = None  # the compensation's report
    pruning_seconds_original: float | None = None  # original scoring + prune + compensate
    saved_to: str | None = None
    # Out-of-memory retries (gradmap.oom): stage, key, from, to, error of each halving of a micro-batch.
    oom_retries: list[dict[str, Any]] = field(default_factory=list)
    # Keys of an upgraded old record that this schema does not know (kept, so rewriting it loses nothing).
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**copy.deepcopy(self.extra), **out}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunRecord:
        """A record read from JSON, of this schema or an older one (upgraded); RecordVersionError if newer."""
        if not isinstance(raw, dict):
            raise ValueError(f"a record is a JSON object, not {type(raw).__name__}")
        version = raw.get("schema_version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ValueError(f"schema_version={version!r} is not a version number")
        if version > SCHEMA_VERSION:
            raise RecordVersionError(f"schema_version {version} is newer than this gradmap reads "
                                     f"({SCHEMA_VERSION}); update gradmap to read it")
        raw = copy.deepcopy(raw)
        if version == 0:
            raw = upgrade_v0(raw)
        _fill_added_keys(raw)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        rec = cls(**{k: v for k, v in raw.items() if k in names})
        rec.extra = {k: v for k, v in raw.items() if k not in names}
        return rec


# --------------------------------------------------------------------------------------------- old records

MODEL_TARGETS = {"offline": "gradmap.models.OfflineModel", "hub": "gradmap.models.HubModel",
                 "tiny_random": "gradmap.models.TinyRandomModel"}
CALIBRATION_TARGETS = {"offline_wiki": "gradmap.data.WikiCalibration", "hub": "gradmap.data.HubCalibration"}
EVAL_TARGET = "gradmap.evaluation.Evaluation"
LOGGER_TARGETS = {"none": "gradmap.loggers.NullLogger", "wandb": "gradmap.loggers.WandbLogger"}


def upgrade_config_v0(config: dict[str, Any]) -> dict[str, Any]:
    """A version-0 resolved config in today's shape, with the values the version-0 code used: `source`/`kind` become
    the `_target_` class, and the keys that code read with a default get that default (calibration `path`, lm-eval
    `seed`, a local task's `asset` and `file`). So a finished old job compares equal to the same job today (and is
    not rerun), and reports label old and new runs alike."""
    out = copy.deepcopy(config)
    target = _retarget(out, "model", "source", MODEL_TARGETS)
    if target is not None and target.endswith("HubModel"):
        out["model"].setdefault("attn_implementation", None)
    target = _retarget(out, "calibration", "source", CALIBRATION_TARGETS)
    if target is not None and target.endswith("WikiCalibration"):
        out["calibration"].setdefault("path", None)
    ev = out.get("eval")
    if isinstance(ev, dict) and "_target_" not in ev and "heldout" in ev:
        out["eval"] = {"_target_": EVAL_TARGET, **ev}
        lm = ev.get("lm_eval")
        if isinstance(lm, dict):
            lm.setdefault("seed", out.get("seed"))
            for name, spec in (lm.get("local_tasks") or {}).items():
                if isinstance(spec, dict):
                    spec.setdefault("asset", str(name).removesuffix("_bigbench"))
                    spec.setdefault("file", "test.jsonl")
    _retarget(out, "logger", "kind", LOGGER_TARGETS)
    out.setdefault("extra_keys", [])  # added later (a declaration, not part of what the run computes)
    return out


def _retarget(config: dict[str, Any], group: str, dispatch_key: str, targets: dict[str, str]) -> str | None:
    """Replace a version-0 group's dispatch string (`source` / `kind`) with the `_target_` class it meant, in place;
    returns that class, or None when the group needs no upgrade."""
    node = config.get(group)
    if not isinstance(node, dict) or "_target_" in node or node.get(dispatch_key) not in targets:
        return None
    target = targets[node.pop(dispatch_key)]
    config[group] = {"_target_": target, **node}
    return target


# Compensation keys added after records were written, with the value that means what the earlier code did on
# every model it finished a job on: `post_norm` changes nothing on a model without a norm after the MLP, and the
# earlier code refused every model with one, so a finished record gets today's default (tests/test_windows.py
# checks these against the classes' defaults).
ADDED_COMPENSATION_KEYS = {"methods.gradmap.projection.ProjectionCompensation": {"post_norm": "direction_approx"},
                           "methods.baselines.replaceme.ReplaceMe": {"post_norm": "refuse"}}
# Metric keys added later, with the value that computes what the code before them computed: a finished record gets
# it, and a selection key hashes the metric as if the key were absent while it has that value (`gradmap.cache`),
# so jobs and cached selections from before stay valid. Today's defaults (tests/test_windows.py).
ADDED_METRIC_KEYS = {"methods.gradmap.verify.GradMAPVerify": {"screen_windows": 0}}


def _fill_added_keys(raw: dict[str, Any]) -> None:
    """A record from before `model.window_bos` (or a key of ADDED_COMPENSATION_KEYS / ADDED_METRIC_KEYS) gets the
    value that means what its code did (no BOS windows: `gradmap.windows.legacy_window_bos`), and a class that moved
    since (`gradmap.targets.MOVED_TARGETS`) its path today, so a finished job compares equal to the same job today
    and is not rerun."""
    from gradmap.targets import MOVED_TARGETS
    from gradmap.windows import legacy_window_bos

    config = raw.get("config") or {}
    for group in ("metric", "compensation"):  # classes that moved since (issue #19): today's paths
        node = config.get(group)
        if isinstance(node, dict) and node.get("_target_") in MOVED_TARGETS:
            node["_target_"] = MOVED_TARGETS[node["_target_"]]
    model = config.get("model")
    if isinstance(model, dict) and "_target_" in model and "window_bos" not in model:
        model["window_bos"] = legacy_window_bos(raw.get("model_class"), model)
    for group, added in (("compensation", ADDED_COMPENSATION_KEYS), ("metric", ADDED_METRIC_KEYS)):
        node = config.get(group)
        if isinstance(node, dict):
            for key, value in added.get(node.get("_target_"), {}).items():
                node.setdefault(key, value)


def upgrade_v0(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 0 (dict records, no `schema_version`) -> version 1: the config in today's shape; every other key
    kept as it was (keys that did not exist yet read as None)."""
    raw = dict(raw)
    if isinstance(raw.get("config"), dict):
        raw["config"] = upgrade_config_v0(raw["config"])
    raw["schema_version"] = SCHEMA_VERSION
    return raw


# --------------------------------------------------------------------------------------------- environment

VERSIONED_PACKAGES = ("torch", "transformers", "lm_eval", "hydra-core", "omegaconf", "datasets", "wandb",
                      "accelerate", "gguf", "numpy", "gradmap")


def environment() -> dict[str, Any]:
    """Python, platform, package versions, CUDA and device, torch threads, git commit."""
    import torch

    versions = {}
    for pkg in VERSIONED_PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
            "torch_threads": torch.get_num_threads(), "git_commit": git_commit()}


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
