"""The layer-importance metric interface shared by GradMAP and every baseline.

A metric scores the decoder layers of the *current* model; higher means more important, the lowest is pruned.
`select` turns scores into pruning decisions: one-shot (score once, drop the n lowest) or iterative (score, drop
the lowest, rescore the smaller model, ...). Iterative rescoring hides removed layers with
`surgery.layers_removed`, so a metric never changes the model: weights, hooks, `.grad` and `requires_grad` are
exactly as found when `select` returns.

A baseline is one file in `baselines/` with a subclass and one YAML in `conf/metric/` whose `_target_` names it.
"""

from __future__ import annotations

import contextlib
import enum
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from gradmap import surgery
from gradmap.errors import ConfigError

# Called with each pruning decision as soon as it is made (the runner logs it to W&B as a step).
DecisionCallback = Callable[["Decision"], None]


def progress(iterable=None, **kwargs):
    """A tqdm bar with ETA on a terminal; silent when stderr is not a TTY (logs, pipes, batch jobs)."""
    kwargs.setdefault("disable", None)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


@dataclass
class Calibration:
    """Calibration token ids [num_samples, seq_len], iterated in micro-batches of `batch_size` rows."""

    input_ids: torch.Tensor
    batch_size: int = 8
    distinct_tokens: int | None = None  # text positions the windows cover (overlaps once), where sampled

    def __post_init__(self):
        # A non-positive micro-batch size would give no batches at all: every score 0, silently.
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError("calibration.batch_size", self.batch_size, "an integer >= 1")
        if self.input_ids.dim() != 2 or self.input_ids.shape[0] < 1 or self.input_ids.shape[1] < 2:
            raise ConfigError("calibration", tuple(self.input_ids.shape), "[num_samples >= 1, seq_len >= 2] tokens",
                              problem="calibration tokens have an unusable shape")

    def batches(self, device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
        for start in range(0, self.input_ids.shape[0], self.batch_size):
            chunk = self.input_ids[start:start + self.batch_size]
            yield chunk.to(device) if device is not None else chunk

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_batches(self) -> int:
        return math.ceil(self.input_ids.shape[0] / self.batch_size)


@dataclass
class Cost:
    """Machine-independent cost: tokens pushed through the full model forward, and through backward."""

    forward_tokens: int = 0
    backward_tokens: int = 0
    train_tokens: int = 0  # tokens through trained sub-modules (compensations that train), not full-model passes

    def add(self, other: Cost) -> None:
        self.forward_tokens += other.forward_tokens
        self.backward_tokens += other.backward_tokens
        self.train_tokens += other.train_tokens

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@contextlib.contextmanager
def count_forward_tokens(model: nn.Module, cost: Cost) -> Iterator[Cost]:
    """Count the tokens of every full-model forward while the context is open (the runner wraps each stage)."""

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        if ids is None:
            ids = kwargs.get("inputs_embeds")
            cost.forward_tokens += 0 if ids is None else ids.shape[0] * ids.shape[1]
        else:
            cost.forward_tokens += ids.numel()

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield cost
    finally:
        handle.remove()


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


class Reuse(enum.Enum):
    """What a metric's selection is, which says how a cached one serves a run with another num_prune
    (`gradmap.cache.SelectionCache.get_or_compute` is the one place that acts on it):

    RANKED  per-layer scores, the lowest removed (`LayerMetric.select`): one-shot (`iterative=false`), one scoring
            pass serves every n (the n lowest are re-picked); iterative, a greedy order: the first n decisions of a
            longer run are the run for n, and a shorter run is continued.
    GREEDY  always one decision per removed layer, chosen by the metric's own `select`: a greedy order, reused as
            RANKED iterative is.
    SPAN    one decision that depends on n as a whole (a contiguous span): only a selection for the same n.
    """

    RANKED = "ranked"
    GREEDY = "greedy"
    SPAN = "span"


class LayerMetric(ABC):
    """Base class. Subclasses implement `score`; span metrics (contiguous blocks) override `select`.

    Args:
        iterative: rescore after each removal (one scoring pass per decision) instead of once.
        protect_first / protect_last: never prune the first / last k layers (e.g. Taylor+ keeps 4 and 2).
    """

    name = "metric"
    reuse: ClassVar[Reuse] = Reuse.RANKED  # how a cached selection serves another num_prune (see Reuse)
    # The scores do not depend on `calibration.batch_size` (micro-batches), so an out-of-memory error may be retried
    # with smaller ones (gradmap.oom); a metric whose scores do depend on it says False.
    micro_batch_is_memory_knob: ClassVar[bool] = True
    # Raised when a metric's decisions or their recorded cost change for the same config: part of the selection
    # cache key (`gradmap.cache.selection_key`), so entries computed before are not reused; 0 adds nothing to it.
    scoring_revision: ClassVar[int] = 0

    def __init__(self, iterative: bool = False, protect_first: int = 0, protect_last: int = 0):
        for key, value in (("protect_first", protect_first), ("protect_last", protect_last)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(key, value, "an integer >= 0")
        self.iterative = iterative
        self.protect_first = protect_first
        self.protect_last = protect_last

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
        t0 = time.perf_counter()
        before = Cost(**cost.as_dict())
        full = self.layer_scores(model, calib, cost, kept, original_count)
        score_seconds = time.perf_counter() - t0
        take = self.lowest(full, count)
        return Decision(step=step, scores=full, removed=take, seconds=time.perf_counter() - t0,
                        score_seconds=score_seconds,
                        forward_tokens=cost.forward_tokens - before.forward_tokens,
                        backward_tokens=cost.backward_tokens - before.backward_tokens)

    def select(self, model: nn.Module, calib: Calibration, num_prune: int, cost: Cost,
               resume: Selection | None = None, on_decision: DecisionCallback | None = None) -> Selection:
        """Choose `num_prune` layers. `resume`: earlier decisions of this same metric to continue from
        (iterative) or reuse (one-shot), e.g. from the score cache. `on_decision`: called with each new decision
        as soon as it is made. A progress bar counts the decisions (one scoring pass each)."""
        original_count = surgery.num_layers(model)
        self.check_budget(original_count, num_prune)
        decisions: list[Decision] = list(resume.decisions) if resume else []
        if not self.iterative and decisions:
            take = self.lowest(decisions[0].scores, num_prune)
            first = Decision(**{**asdict(decisions[0]), "removed": take})
            return Selection(removed=take, decisions=[first])
        decisions = decisions[:num_prune]
        removed: list[int] = [i for d in decisions for i in d.removed]
        steps = num_prune if self.iterative else 1
        bar = progress(total=steps, initial=len(decisions), desc=f"{self.name}: pruning decisions", unit="decision")
        for step in range(len(decisions), steps):
            kept = surgery.kept_indices(original_count, removed)
            with surgery.layers_removed(model, sorted(removed)):
                decision = self.decide(model, calib, cost, step, kept, original_count,
                                       1 if self.iterative else num_prune)
            take = decision.removed
            removed.extend(take)
            decisions.append(decision)
            bar.update(1)
            bar.set_postfix(removed=take[0] if len(take) == 1 else len(take))
            if on_decision is not None:
                on_decision(decisions[-1])
        bar.close()
        return Selection(removed=removed, decisions=decisions)
