"""Selection records: what a metric decided, how a decision is booked, and what kind of selection it is.

A `Selection` is the removal order plus one `Decision` per scoring step (scores at original layer indices, time,
tokens); it is what the run record, the selection cache and the loggers hold. `DecisionTimer` is the one place a
decision's time and token cost are measured. `SelectionKind`, declared by each metric (`LayerMetric.selection_kind`),
says how a cached selection serves a run with another number of removals; the cache and `select` both read it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradmap.stages import Cost

# Called with each pruning decision as soon as it is made (the runner logs it to W&B as a step).
DecisionCallback = Callable[["Decision"], None]


@dataclass
class Decision:
    """One pruning decision: the scores it was based on (indexed by original layer; None = already removed, or not
    measured by a metric that scores only some layers)."""

    step: int
    scores: list[float | None]
    removed: list[int]
    seconds: float = 0.0  # whole decision: scoring plus choosing
    score_seconds: float = 0.0  # the scoring pass(es) alone
    forward_tokens: int = 0  # cost of this decision (counted when the runner's token hook is active)
    backward_tokens: int = 0
    # Screen-then-verify metrics only (gradmap_verify). Left out of `as_dict` at their defaults, so other metrics'
    # records are unchanged, and older cached entries (without them) still load.
    gradient_scores: list[float | None] | None = None  # the screening (GradMAP) scores; None: no screening pass
    verified: list[int] = field(default_factory=list)  # layers measured exactly (their values are in `scores`)
    verify_seconds: float = 0.0  # part of score_seconds spent verifying
    verify_forward_tokens: int = 0  # part of forward_tokens spent verifying
    verify_tokens: list[int] = field(default_factory=list)  # successive halving: tokens each `verified` layer saw
    screened_at: int | None = None  # ranked by the screen of this earlier decision (gradient_scores is then None)

    def as_dict(self) -> dict:
        out = asdict(self)
        for f in OPTIONAL_DECISION_FIELDS:
            if out[f] == OPTIONAL_DECISION_FIELDS[f]:
                del out[f]
        return out


OPTIONAL_DECISION_FIELDS = {"gradient_scores": None, "verified": [], "verify_seconds": 0.0,
                             "verify_forward_tokens": 0, "verify_tokens": [], "screened_at": None}


class DecisionTimer:
    """Measures one decision: started before its scoring, `scored()` once the scoring pass(es) are done (by default
    when the decision is built), `decision(...)` builds the `Decision` with its time and the tokens `cost` counted
    since the start. Used by every `select` and by Prune&Comp's loop, so all decisions are booked alike."""

    def __init__(self, cost: Cost):
        self.cost = cost
        self.start = time.perf_counter()
        self.forward0, self.backward0 = cost.forward_tokens, cost.backward_tokens
        self.score_seconds: float | None = None

    def scored(self) -> float:
        self.score_seconds = time.perf_counter() - self.start
        return self.score_seconds

    def decision(self, step: int, scores: list[float | None], removed: list[int], **extra) -> Decision:
        score_seconds = self.scored() if self.score_seconds is None else self.score_seconds
        return Decision(step=step, scores=scores, removed=removed, seconds=time.perf_counter() - self.start,
                        score_seconds=score_seconds, forward_tokens=self.cost.forward_tokens - self.forward0,
                        backward_tokens=self.cost.backward_tokens - self.backward0, **extra)


@dataclass
class Selection:
    removed: list[int]  # original layer indices, in the order they were chosen
    decisions: list[Decision] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"removed": sorted(self.removed), "removal_order": list(self.removed),
                "decisions": [d.as_dict() for d in self.decisions]}

    @classmethod
    def from_dict(cls, d: dict) -> Selection:
        return cls(removed=list(d["removal_order"]), decisions=[Decision(**x) for x in d["decisions"]])

    @property
    def seconds(self) -> float:
        return sum(d.seconds for d in self.decisions)

    @property
    def cost(self) -> dict[str, int]:
        return {"forward_tokens": sum(d.forward_tokens for d in self.decisions),
                "backward_tokens": sum(d.backward_tokens for d in self.decisions)}


class SelectionKind(enum.Enum):
    """What a selection is, which says how a cached one serves a run with another num_prune
    (`gradmap.cache.SelectionCache.reusable` is the one place that acts on it):

    ONE_SHOT  one scoring pass, the n lowest removed: any cached selection serves every n (its scores re-picked).
    GREEDY    one decision per removed layer: the first n decisions of a longer run are the run for n, and a
              shorter run is continued.
    SPAN      one decision that depends on n as a whole (a contiguous span): only a selection for the same n.
    """

    ONE_SHOT = "one_shot"
    GREEDY = "greedy"
    SPAN = "span"
