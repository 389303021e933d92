"""Run bookkeeping: per-stage wall time, peak memory and token cost; the atomic JSON record; environment versions.

`record.json` in the Hydra output folder is the source of truth for a run; W&B only mirrors it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradmap.files import atomic_write_json, atomic_write_text, json_default  # noqa: F401  (re-exported)
from gradmap.metric import Cost, count_forward_tokens

PRUNING_STAGES = ("score", "select", "prune", "compensate")  # "pruning time" = the sum of these


def stable_hash(obj: Any, length: int = 16) -> str:
    """Content hash of a JSON-able object (key order independent)."""
    blob = json.dumps(obj, sort_keys=True, default=json_default)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


class _PeakRSS:
    """Peak resident memory over a block: CPU has no allocator peak counter like CUDA's. Uses the kernel's exact
    high-water mark when it can be reset; otherwise samples RSS in a background thread (may miss short peaks).
    A block nested in an exact one samples, since resetting the mark would corrupt the outer block's peak."""

    _exact_active = 0

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = _rss_bytes()
        self.exact = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> _PeakRSS:
        self.exact = _PeakRSS._exact_active == 0 and _reset_peak_rss()
        _PeakRSS._exact_active += self.exact
        if not self.exact:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.exact:
            self.peak = max(self.peak, _hwm_bytes())
            _PeakRSS._exact_active -= 1
        else:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


class StageRecorder:
    """Times stages (`time.perf_counter`, device-synchronised on GPU), records peak memory and token cost.

    Re-entering a stage name accumulates its time and cost (e.g. iterative scoring).
    """

    def __init__(self, device: str | torch.device = "cpu", progress: bool = True):
        self.cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
        self.seconds: dict[str, float] = {}
        self.peak_memory: dict[str, dict[str, int]] = {}
        self.costs: dict[str, Cost] = {}
        self.progress = progress
        self.current: str | None = None  # the stage running now (a failure records it)
        self.last: str | None = None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def stage(self, name: str, model: nn.Module | None = None) -> Iterator[Cost]:
        cost = self.costs.setdefault(name, Cost())
        self.current = self.last = name
        if self.progress:
            print(f"[gradmap] stage {name} ...", flush=True)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._sync()
        t0 = time.perf_counter()
        with _PeakRSS() as rss, (count_forward_tokens(model, cost) if model is not None else contextlib.nullcontext()):
            yield cost
            self._sync()
        elapsed = time.perf_counter() - t0
        self.current = None
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        mem = self.peak_memory.setdefault(name, {"cpu_rss_bytes": 0})
        mem["cpu_rss_bytes"] = max(mem["cpu_rss_bytes"], rss.peak)
        if self.cuda:
            mem["cuda_max_allocated_bytes"] = max(mem.get("cuda_max_allocated_bytes", 0),
                                                  torch.cuda.max_memory_allocated())
        if self.progress:
            print(f"[gradmap] stage {name} done in {elapsed:.1f}s", flush=True)

    def add_seconds(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @property
    def pruning_seconds(self) -> float:
        return sum(self.seconds.get(s, 0.0) for s in PRUNING_STAGES)

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": dict(self.seconds), "pruning_seconds": self.pruning_seconds,
                "peak_memory": self.peak_memory, "cost": {k: v.as_dict() for k, v in self.costs.items()},
                "pruning_cost": _sum_costs(self.costs, PRUNING_STAGES)}


def _sum_costs(costs: dict[str, Cost], names: tuple[str, ...]) -> dict[str, int]:
    total = Cost()
    for name in names:
        if name in costs:
            total.add(costs[name])
    return total.as_dict()


VERSIONED_PACKAGES = ("torch", "transformers", "lm_eval", "hydra-core", "omegaconf", "datasets", "wandb",
                      "accelerate", "gguf", "numpy", "gradmap")


def environment() -> dict[str, Any]:
    versions = {}
    for pkg in VERSIONED_PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    env = {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
           "cuda": torch.version.cuda if torch.cuda.is_available() else None,
           "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
           "torch_threads": torch.get_num_threads(), "git_commit": git_commit()}
    return env


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
