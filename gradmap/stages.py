"""Per-stage bookkeeping of a run: wall time (device-synchronised), peak memory and token cost (`Cost`, counted by
`count_forward_tokens` on every full-model forward).

"Pruning time" is the sum of PRUNING_STAGES. A stage that measures more than its name says (the selection stage
times scoring passes and the choosing in between; Prune&Comp's interleaved loop times scoring inside compensation)
hands the extra part to the right stage with `StageRecorder.move`, the one place the books are rebalanced.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from gradmap.memory import PeakRSS

PRUNING_STAGES = ("score", "select", "prune", "compensate")  # "pruning time" = the sum of these


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
        with PeakRSS() as rss, (count_forward_tokens(model, cost) if model is not None else contextlib.nullcontext()):
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

    def move(self, source: str, target: str, seconds: float = 0.0, cost: Cost | None = None) -> None:
        """Book `seconds` (and the tokens of `cost`) measured inside stage `source` to stage `target` instead."""
        self.seconds[source] = self.seconds.get(source, 0.0) - seconds
        self.seconds[target] = self.seconds.get(target, 0.0) + seconds
        if cost is not None:
            moved = self.costs.setdefault(source, Cost())
            moved.forward_tokens -= cost.forward_tokens
            moved.backward_tokens -= cost.backward_tokens
            moved.train_tokens -= cost.train_tokens
            self.costs.setdefault(target, Cost()).add(cost)

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
