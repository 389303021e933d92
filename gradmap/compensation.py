"""The compensation interface: repair a pruned model using the dense reference.

`apply` receives the pruned model (changed in place) and the removed layers keyed by their original index (the
`surgery.RemovedLayers` that `remove_layers` returned); the dense model is available as `removed.dense_view()`
(or `surgery.dense_view(model, removed)`) without a second copy. It returns a report (sites, calibration error
before/after, ...) that goes into the run record.

A compensation is one file in `methods/` with a subclass and one YAML in `conf/compensation/`. One whose selection
depends on its own repairs (Prune&Comp: prune, compensate, rescore) subclasses `InterleavedCompensation`. The
subclass is a dataclass (`@dataclass(eq=False)`) whose options are `gradmap.schema.option(...)` fields without
defaults (the YAML holds them), checked when built (`check_fields` in `Compensation.__post_init__`), as metrics are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from gradmap.errors import ConfigError
from gradmap.schema import check_fields

if TYPE_CHECKING:
    from gradmap.data import Calibration
    from gradmap.metric import LayerMetric
    from gradmap.selection import DecisionCallback, Selection, SelectionKind
    from gradmap.stages import Cost


class IncompatibleCompensationError(ConfigError):
    """A model/compensation pairing that cannot work (refused with a message, never a traceback). Validation
    checks it on the model's architecture (meta device) before anything is loaded."""

    def __init__(self, problem: str, key: str = "compensation"):
        super().__init__(key, problem=problem)


@dataclass(eq=False)
class Compensation(ABC):
    name = "compensation"
    # The result does not depend on `calibration.batch_size`, so out of memory may be retried with smaller
    # micro-batches (gradmap.oom); False for compensations that train (the micro-batch is their optimiser's batch).
    micro_batch_is_memory_knob = True

    def __post_init__(self) -> None:
        check_fields(self)  # types, ranges and choices of every option (ConfigError with the option as key)

    def check_compatible(self, model: nn.Module, removed: list[int]) -> None:
        """Raise IncompatibleCompensationError if this pairing cannot work. Default: any pairing is fine."""

    def check_calibration(self, model: nn.Module, num_tokens: int) -> None:
        """Raise ConfigError (key relative to the compensation) if `num_tokens` calibration tokens cannot work with
        this model; `model` may be on the meta device. Default: any amount is fine."""

    @abstractmethod
    def apply(self, model: nn.Module, removed: Mapping[int, nn.Module], calib: Calibration,
              cost: Cost) -> dict[str, Any]:
        """Repair `model` in place; return a JSON-able report."""


@dataclass(eq=False)
class NoCompensation(Compensation):
    """Leave the pruned model as it is (the plain layer-removal baseline)."""

    name = "none"

    def apply(self, model, removed, calib, cost):
        return {"sites": []}


@dataclass(eq=False)
class InterleavedCompensation(Compensation):
    """A compensation whose selection and repairs interleave (Prune&Comp: remove the lowest-scoring layer, repair,
    rescore the repaired model, ...). While `interleaved` is true the runner calls `prune_iteratively` instead of
    `metric.select` -> `surgery.remove_layers` -> `apply`, and caches its selection under a key that includes the
    compensation config, as `selection_kind(metric)` says; `apply` remains the one-shot path."""

    interleaved = True  # an instance may turn it off (Prune&Comp's one-shot ablation, `iterative=false`)

    @abstractmethod
    def prune_iteratively(self, model: nn.Module, metric: LayerMetric, calib: Calibration, num_prune: int,
                          cost: Cost, resume: Selection | None = None,
                          on_decision: DecisionCallback | None = None) -> tuple[Selection, dict[str, Any]]:
        """Select `num_prune` layers with `metric`, removing and repairing as it goes (`model` changed in place);
        `resume`: cached decisions to replay. Returns the selection and the compensation report."""

    @abstractmethod
    def selection_kind(self, metric: LayerMetric) -> SelectionKind:
        """What the interleaved selection with `metric` is, for the selection cache."""


def is_interleaved(compensation: Compensation) -> bool:
    """Whether the runner must let `compensation` select (`InterleavedCompensation.prune_iteratively`)."""
    return isinstance(compensation, InterleavedCompensation) and compensation.interleaved
