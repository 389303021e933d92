"""Out of memory during scoring, compensation or evaluation: halve the micro-batch and retry.

The micro-batch size (`calibration.batch_size`, `eval.perplexity.batch_size`, `eval.lm_eval.batch_size`) is a memory
knob only: scores, fits and perplexities do not depend on it (tests/test_gradmap_metric.py pins that for the
metrics), so a stage that ran out of accelerator memory is rerun with half the rows per forward, down to one. A
stage may retry only where that holds and nothing was changed by the failed attempt: metrics never change the model;
a compensation is retried only if every parameter is as before (`ParamFingerprint`); components whose result depends
on the micro-batch (per-micro-batch gradient reductions, trained compensations) say so with
`micro_batch_is_memory_knob = False` and fail at once. At micro-batch 1 the run ends with one line that names
the keys a user can turn (`OutOfMemory`).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from gradmap.errors import OOM_HINT, ConfigError

T = TypeVar("T")

KNOBS = ("calibration.batch_size", "metric.gradient_checkpointing", "eval.perplexity.batch_size")  # in OOM_HINT


def is_oom(err: BaseException) -> bool:
    """An accelerator's out-of-memory error (CUDA, and the allocators that raise RuntimeError 'out of memory')."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(err, oom) or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class OutOfMemory(ConfigError):
    """Out of memory in `stage` where halving cannot help (micro-batch 1) or is not allowed; one line naming the
    knobs (calibration.batch_size, metric.gradient_checkpointing, eval.perplexity.batch_size)."""

    def __init__(self, stage: str, key: str, batch_size: int, why: str):
        super().__init__(key, batch_size, problem=f"out of memory in stage '{stage}' {why}", hint=OOM_HINT)


class ParamFingerprint:
    """Which parameters a failed attempt changed: storage address and float64 sum per parameter (cheap next to a
    forward, no copy of the weights)."""

    def __init__(self, model: nn.Module):
        self.values = self._take(model)

    @staticmethod
    def _take(model: nn.Module) -> list[tuple[int, float]]:
        with torch.no_grad():
            return [(p.data_ptr(), float(p.sum(dtype=torch.float64))) for p in model.parameters()]

    def unchanged(self, model: nn.Module) -> bool:
        now = self._take(model)
        def same(a: float, b: float) -> bool:  # a NaN sum is unchanged only if it was NaN before
            return a == b or (a != a and b != b)

        return len(now) == len(self.values) and all(a[0] == b[0] and same(a[1], b[1])
                                                    for a, b in zip(now, self.values))


def retry_halving(attempt: Callable[[int], T], *, stage: str, key: str, batch_size: int,
                  on_retry: Callable[[dict[str, Any]], None], allowed: bool = True,
                  can_retry: Callable[[], bool] | None = None) -> T:
    """`attempt(batch_size)`; on out-of-memory, `attempt(batch_size // 2)` after freeing memory, down to 1. Each retry
    is reported to `on_retry({stage, key, from, to, error})`. Not `allowed` (the result would depend on the
    micro-batch) or `can_retry()` false (the failed attempt changed something): `OutOfMemory` at once."""
    while True:
        try:
            return attempt(batch_size)
        except Exception as err:  # noqa: BLE001  (re-raised unless it is an out-of-memory error)
            if not is_oom(err):
                raise
            message = " ".join(str(err).split())[:200]
        # Outside the except block: the traceback's frames (and the tensors they hold) are released first.
        free_memory()
        if not allowed:
            raise OutOfMemory(stage, key, batch_size, "(retrying with a smaller micro-batch would change the "
                                                      "result of this component)")
        if can_retry is not None and not can_retry():
            raise OutOfMemory(stage, key, batch_size, "after the model was changed (cannot retry safely)")
        if batch_size <= 1:
            raise OutOfMemory(stage, key, batch_size, "at micro-batch 1")
        smaller = batch_size // 2
        on_retry({"stage": stage, "key": key, "from": batch_size, "to": smaller, "error": message})
        print(f"[gradmap] out of memory in stage {stage}: retrying with {key}={smaller} (was {batch_size})",
              flush=True)
        batch_size = smaller
