"""Helpers shared by the similarity baselines (BI, LLM-Streamline, angular distance): allowed option values, token
selection, cosine similarity, hidden-state distances, span selection."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from gradmap import surgery
from gradmap.capture import layer_io
from gradmap.data import Calibration
from gradmap.errors import ConfigError
from gradmap.grad_state import eval_mode
from gradmap.metric import ACCUM_DTYPES, LayerMetric
from gradmap.models import model_device
from gradmap.module_paths import FINAL_NORMS, first_path
from gradmap.schema import option
from gradmap.selection import DecisionCallback, DecisionTimer, Selection, SelectionKind
from gradmap.stages import Cost

TOKENS = ("all", "last")
# h_L, the last layer's output: as is, or after the final norm (what HF's `output_hidden_states` returns last).
LAST_STATES = ("final_norm", "raw")


def select_tokens(hidden: torch.Tensor, tokens: str) -> torch.Tensor:
    """[B, T, d] -> [N, d] rows that count. Calibration has no padding, so `all` is every position and `last`
    is the last position of each sequence."""
    if tokens == "last":
        return hidden[:, -1, :]
    return hidden.reshape(-1, hidden.shape[-1])


def cosine(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row-wise cosine similarity in `dtype`, clamped to [-1, 1] so arccos stays finite."""
    a, b = a.to(dtype), b.to(dtype)
    denom = (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(torch.finfo(dtype).tiny)
    return ((a * b).sum(dim=-1) / denom).clamp(-1.0, 1.0)


def angular(cos: torch.Tensor) -> torch.Tensor:
    """Angular distance arccos(cos) / pi, in [0, 1]."""
    return torch.arccos(cos) / math.pi


def final_norm(model: nn.Module) -> nn.Module:
    """The norm the model applies after its last decoder layer (HF's last `hidden_states` entry is its output)."""
    found = first_path(model, FINAL_NORMS, nn.Module)
    if found is not None:
        return found[1]
    raise ValueError(f"cannot find the final norm of {type(model).__name__} (looked for {list(FINAL_NORMS)}); "
                     f"use last_state=raw")


@torch.no_grad()
def state_distances(model: nn.Module, calib: Calibration, pairs: list[tuple[int, int]], tokens: str,
                    dtype: torch.dtype, per_token: Callable[[torch.Tensor], torch.Tensor],
                    last_state: str = "raw") -> torch.Tensor:
    """Mean over counted tokens of per_token(cos(h_i, h_j)) for each pair (i, j), 0 <= i < j <= L.

    h_i is the hidden state entering decoder layer i (HF `hidden_states[i]`); h_L is the last layer's output, as
    is (`last_state=raw`) or after the model's final norm (`final_norm`, as HF's last `hidden_states` entry). Read
    with hooks, one forward per micro-batch. Only states that a still-open pair needs are kept, so memory does not
    grow with the number of layers.
    """
    if last_state not in LAST_STATES:
        raise ValueError(f"last_state={last_state!r} is not valid; allowed: {', '.join(LAST_STATES)}")
    n = surgery.num_layers(model)
    if not all(0 <= i < j <= n for i, j in pairs):
        raise ValueError(f"state pairs must satisfy 0 <= i < j <= {n}: {pairs}")
    sums = torch.zeros(len(pairs), dtype=torch.float64)
    ending: dict[int, list[int]] = {}  # j -> indices of the pairs that end at h_j
    for idx, (_, j) in enumerate(pairs):
        ending.setdefault(j, []).append(idx)
    last_use = {i: max(j for i2, j in pairs if i2 == i) for i, _ in pairs}
    pending: dict[int, torch.Tensor] = {}
    count = 0

    def visit(k: int, h: torch.Tensor) -> None:
        rows = select_tokens(h, tokens)
        for idx in ending.get(k, ()):
            x = pending[pairs[idx][0]]
            sums[idx] += per_token(cosine(x, rows, dtype)).sum().double().cpu()
        for i in [i for i in pending if last_use[i] == k]:
            del pending[i]
        if k in last_use:
            pending[k] = rows.detach().clone()  # clone: safe even if a layer writes in place

    def on_layer(pos: int, inp: torch.Tensor, out: torch.Tensor) -> None:
        visit(pos, inp)
        if pos == n - 1 and last_state == "raw":
            visit(n, out)

    device = model_device(model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(eval_mode(model))
        stack.enter_context(layer_io(model, on_layer))
        if last_state == "final_norm":
            handle = final_norm(model).register_forward_hook(lambda _m, _a, out: visit(n, out))
            stack.callback(handle.remove)
        for batch in calib.batches(device):
            pending.clear()
            model(input_ids=batch, use_cache=False)
            count += batch.shape[0] * (1 if tokens == "last" else batch.shape[1])
    return sums / count


@dataclass(eq=False)
class SpanMetric(LayerMetric):
    """Base for metrics that remove one contiguous span of `num_prune` layers in a single decision (never iterative:
    `iterative` is fixed, no option).

    Subclasses set `per_token` (cos -> distance per token, lower = more redundant), and may set `lead` and
    `last_state` (class defaults 0 and `raw`). `select` scores every valid start s of a span s..s+n-1 within the
    unprotected layers by the mean distance between h_{s-lead} and h_{s+n} (`state_distances`: h_i enters layer i,
    h_L is the last output, raw or final-normed per `last_state`), and removes the span with the lowest. With
    lead=0 that is the span's own input vs its output; lead=1 also takes in the kept layer before the span (so no
    span may start at layer 0). Its one `Decision` has, per original layer, the distance of the span starting
    there, and None where no allowed span starts. `score` (per-layer interface) returns the n=1, lead=0 distances
    (each layer's own input vs output); the runner uses `select`.
    """

    selection_kind = SelectionKind.SPAN  # one span for exactly n layers: only a cached selection for the same n serves
    lead = 0
    last_state = "raw"

    iterative: bool = field(default=False, init=False)
    tokens: str = option(choices=TOKENS)
    accum_dtype: str = option(choices=tuple(ACCUM_DTYPES))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.dtype = ACCUM_DTYPES[self.accum_dtype]

    @staticmethod
    def per_token(cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, model: nn.Module, calib: Calibration, cost: Cost) -> torch.Tensor:
        n = surgery.num_layers(model)
        return state_distances(model, calib, [(i, i + 1) for i in range(n)], self.tokens, self.dtype,
                               self.per_token, self.last_state)

    def span_starts(self, original_count: int, num_prune: int) -> list[int]:
        return list(range(max(self.protect_first, self.lead), original_count - self.protect_last - num_prune + 1))

    def check_budget(self, original_count: int, num_prune: int) -> None:
        super().check_budget(original_count, num_prune)
        if not self.span_starts(original_count, num_prune):
            longest = original_count - self.protect_last - max(self.protect_first, self.lead)
            raise ConfigError("num_prune", num_prune, f"1..{max(longest, 0)}",
                              problem=f"{type(self).__name__}: no span of {num_prune} layers fits a {original_count}-"
                                      f"layer model with protect_first={self.protect_first}, protect_last="
                                      f"{self.protect_last}"
                                      + (" (the span cannot start at layer 0)" if self.lead else ""))

    def select(self, model: nn.Module, calib: Calibration, num_prune: int, cost: Cost,
               resume: Selection | None = None, on_decision: DecisionCallback | None = None) -> Selection:
        """`resume`: a cached selection of this metric; only one for the same `num_prune` applies to a span."""
        original_count = surgery.num_layers(model)
        self.check_budget(original_count, num_prune)
        if resume is not None and len(resume.removed) == num_prune:
            return resume
        timer = DecisionTimer(cost)
        starts = self.span_starts(original_count, num_prune)
        pairs = [(s - self.lead, s + num_prune) for s in starts]
        dist = state_distances(model, calib, pairs, self.tokens, self.dtype, self.per_token, self.last_state)
        timer.scored()
        if not torch.isfinite(dist).all():
            raise RuntimeError(f"{type(self).__name__}: non-finite span distances {dist.tolist()}")
        best = starts[int(torch.argmin(dist))]  # argmin returns the first minimum: ties go to the earliest span
        scores: list[float | None] = [None] * original_count
        for s, d in zip(starts, dist.tolist()):
            scores[s] = d
        removed = list(range(best, best + num_prune))
        decision = timer.decision(0, scores, removed)
        if on_decision is not None:
            on_decision(decision)
        return Selection(removed=removed, decisions=[decision])
