"""The compensation interface: repair a pruned model using the dense reference.

`apply` receives the pruned model (changed in place) and the removed layers keyed by their original index (the
`surgery.RemovedLayers` that `remove_layers` returned); the dense model is available as `removed.dense_view()`
(or `surgery.dense_view(model, removed)`) without a second copy. It returns a report (sites, calibration error
before/after, ...) that goes into the run record.

A compensation is one file (in `gradmap/` or `baselines/`) with a subclass and one YAML in `conf/compensation/`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from torch import nn

from gradmap.errors import ConfigError
from gradmap.metric import Calibration, Cost


class IncompatibleCompensationError(ConfigError):
    """A model/compensation pairing that cannot work (refused with a message, never a traceback). Validation
    checks it on the model's architecture (meta device) before anything is loaded."""

    def __init__(self, problem: str, key: str = "compensation"):
        super().__init__(key, problem=problem)


class Compensation(ABC):
    name = "compensation"
    trains = False  # compensations that train report their training time separately
    # True: selection and compensation interleave (Prune&Comp): the runner calls `prune_iteratively(model, metric,
    # calib, n, cost, resume=..., on_decision=...) -> (Selection, report)` instead of select -> remove_layers ->
    # apply, and caches that selection as `selection_reuse(metric)` (a `gradmap.metric.Reuse`) says.
    interleaved = False
    # The result does not depend on `calibration.batch_size`, so out of memory may be retried with smaller
    # micro-batches (gradmap.oom); False for compensations that train (the micro-batch is their optimiser's batch).
    micro_batch_is_memory_knob = True

    def check_compatible(self, model: nn.Module, removed: list[int]) -> None:
        """Raise IncompatibleCompensationError if this pairing cannot work. Default: any pairing is fine."""

    def check_calibration(self, model: nn.Module, num_tokens: int) -> None:
        """Raise ConfigError (key relative to the compensation) if `num_tokens` calibration tokens cannot work with
        this model; `model` may be on the meta device. Default: any amount is fine."""

    @abstractmethod
    def apply(self, model: nn.Module, removed: Mapping[int, nn.Module], calib: Calibration,
              cost: Cost) -> dict[str, Any]:
        """Repair `model` in place; return a JSON-able report."""


class NoCompensation(Compensation):
    """Leave the pruned model as it is (the plain layer-removal baseline)."""

    name = "none"

    def apply(self, model, removed, calib, cost):
        return {"sites": []}
