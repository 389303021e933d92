"""The layer-importance metric interface shared by GradMAP and every baseline (`LayerMetric`).

A metric scores the decoder layers of the *current* model; higher means more important, the lowest is pruned.
`select` turns scores into pruning decisions (`gradmap.selection`), as the metric's `selection_kind` says: one-shot
(score once, drop the n lowest), greedy (score, drop the lowest, rescore the smaller model, ...) or a span the
metric chooses itself. Greedy rescoring hides removed layers with `surgery.layers_removed`, so a metric never changes
the model: weights, hooks, `.grad` and `requires_grad` are exactly as found when `select` returns.

A method is one file in `methods/` with a subclass and one YAML in `conf/metric/` whose `_target_` names it. The
subclass is a dataclass (`@dataclass(eq=False)`: objects compare by identity) whose options are fields declared with
`gradmap.schema.option(...)`, without defaults (the YAML holds them); `__post_init__` checks every field
(`check_fields`), then a subclass's cross-field checks and derived state follow `super().__post_init__()`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from gradmap import surgery
from gradmap.errors import ConfigError
from gradmap.progress import progress
from gradmap.schema import check_fields, option
from gradmap.selection import Decision, DecisionCallback, DecisionTimer, Selection, SelectionKind

# The dtypes a metric may accumulate its per-layer sums in (`accum_dtype` options of GradMAP, BI, Taylor, ...).
ACCUM_DTYPES = {"float32": torch.float32, "float64": torch.float64}

if TYPE_CHECKING:
    from torch import nn

    from gradmap.data import Calibration
    from gradmap.stages import Cost


@dataclass(eq=False)
class LayerMetric(ABC):
    """Base class. Subclasses implement `score`; metrics that choose otherwise than by the lowest scores (a span,
    a screen-then-verify loop) override `select` and declare their `selection_kind`. A subclass that fixes
    `iterative` redeclares it as `field(default=..., init=False)` (then no config key).

    Options:
        iterative: rescore after each removal (one scoring pass per decision) instead of once.
        protect_first / protect_last: never prune the first / last k layers (e.g. Taylor+ keeps 4 and 2).
    """

    iterative: bool = option()
    protect_first: int = option(ge=0)
    protect_last: int = option(ge=0)

    name = "metric"
    # The scores do not depend on `calibration.batch_size` (micro-batches), so an out-of-memory error may be retried
    # with smaller ones (gradmap.oom); a metric whose scores do depend on it says False.
    micro_batch_is_memory_knob: ClassVar[bool] = True
    # Raised when a metric's decisions or their recorded cost change for the same config: part of the selection
    # cache key (`gradmap.cache.selection_key`), so entries computed before are not reused; 0 adds nothing to it.
    scoring_revision: ClassVar[int] = 0

    def __post_init__(self) -> None:
        check_fields(self)  # types, ranges and choices of every option (ConfigError with the option as key)

    @property
    def selection_kind(self) -> SelectionKind:
        """How `select` decides, and so how a cached selection serves another num_prune (`SelectionKind`): greedy
        when `iterative`, else one-shot. A subclass with its own `select` declares its kind as a class attribute."""
        return SelectionKind.GREEDY if self.iterative else SelectionKind.ONE_SHOT

    @abstractmethod
    def score(self, model: nn.Module, calib: Calibration, cost: Cost) -> torch.Tensor:
        """One float per current decoder layer; higher = more important."""

    def prunable(self, original_count: int) -> list[int]:
        return list(range(self.protect_first, original_count - self.protect_last))

    def check_budget(self, original_count: int, num_prune: int) -> None:
        """Refuse (ConfigError with the full key) a removal count the protected layers leave no room for; called by
        validation before anything is loaded, and again by `select`."""
        allowed = len(self.prunable(original_count))
        if allowed < 1:
            raise ConfigError("metric.protect_first", self.protect_first,
                              f"protect_first + protect_last <= {original_count - 2}",
                              problem=f"with protect_last={self.protect_last} no layer of the {original_count}-layer "
                                      f"model may be pruned")
        if not 0 < num_prune <= allowed or num_prune >= original_count:
            raise ConfigError("num_prune", num_prune, f"1..{min(allowed, original_count - 1)}",
                              problem=f"not possible for {type(self).__name__} on a {original_count}-layer model "
                                      f"(protect_first={self.protect_first}, protect_last={self.protect_last})")

    def lowest(self, scores: list[float | None], n: int) -> list[int]:
        """The n prunable layers with the lowest scores (ties: the lower index first)."""
        candidates = set(self.prunable(len(scores)))
        order = sorted((i for i, s in enumerate(scores) if s is not None and i in candidates),
                       key=lambda i: (scores[i], i))
        return order[:n]

    def layer_scores(self, model: nn.Module, calib: Calibration, cost: Cost, kept: list[int],
                     original_count: int) -> list[float | None]:
        """`score` on the model as it is now (its layers = original layers `kept`, in order), checked (one finite
        score per layer) and placed at original indices (None for layers already removed)."""
        scores = self.score(model, calib, cost).detach().double().cpu()
        if scores.shape != (len(kept),) or not torch.isfinite(scores).all():
            raise RuntimeError(f"{type(self).__name__}.score returned {tuple(scores.shape)} scores "
                               f"(finite: {bool(torch.isfinite(scores).all())}); expected {len(kept)} finite")
        full: list[float | None] = [None] * original_count
        for pos, orig in enumerate(kept):
            full[orig] = float(scores[pos])
        return full

    def decide(self, model: nn.Module, calib: Calibration, cost: Cost, step: int, kept: list[int],
               original_count: int, count: int) -> Decision:
        """One scoring pass on the model as it is now and its `count` lowest-scoring layers, in original indices
        (`lowest` applies protect_first/protect_last there). Shared by `select` and by compensations that rescore
        the model they change (Prune&Comp)."""
        timer = DecisionTimer(cost)
        full = self.layer_scores(model, calib, cost, kept, original_count)
        timer.scored()
        return timer.decision(step, full, self.lowest(full, count))

    def select(self, model: nn.Module, calib: Calibration, num_prune: int, cost: Cost,
               resume: Selection | None = None, on_decision: DecisionCallback | None = None) -> Selection:
        """Choose `num_prune` layers. `resume`: earlier decisions of this same metric to continue from
        (iterative) or reuse (one-shot), e.g. from the score cache. `on_decision`: called with each new decision
        as soon as it is made. A progress bar counts the decisions (one scoring pass each)."""
        original_count = surgery.num_layers(model)
        self.check_budget(original_count, num_prune)
        decisions: list[Decision] = list(resume.decisions) if resume else []
        greedy = self.selection_kind is SelectionKind.GREEDY
        if not greedy and decisions:
            take = self.lowest(decisions[0].scores, num_prune)
            first = Decision(**{**asdict(decisions[0]), "removed": take})
            return Selection(removed=take, decisions=[first])
        decisions = decisions[:num_prune]
        removed: list[int] = [i for d in decisions for i in d.removed]
        steps = num_prune if greedy else 1
        bar = progress(total=steps, initial=len(decisions), desc=f"{self.name}: pruning decisions", unit="decision")
        for step in range(len(decisions), steps):
            kept = surgery.kept_indices(original_count, removed)
            with surgery.layers_removed(model, sorted(removed)):
                decision = self.decide(model, calib, cost, step, kept, original_count,
                                       1 if greedy else num_prune)
            take = decision.removed
            removed.extend(take)
            decisions.append(decision)
            bar.update(1)
            bar.set_postfix(removed=take[0] if len(take) == 1 else len(take))
            if on_decision is not None:
                on_decision(decisions[-1])
        bar.close()
        return Selection(removed=removed, decisions=decisions)
