"""Helpers shared by the baselines: option checking, token selection, cosine similarity, span selection."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from gradmap import surgery
from gradmap.capture import layer_io
from gradmap.metric import Calibration, Cost, Decision, LayerMetric, Selection
from gradmap.models import model_device

ACCUM_DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOKENS = ("all", "last")


def resolve_accum_dtype(name: str) -> torch.dtype:
    if name not in ACCUM_DTYPES:
        raise ValueError(f"accum_dtype={name!r} is not valid; allowed: {list(ACCUM_DTYPES)}")
    return ACCUM_DTYPES[name]


def check_choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{option}={value!r} is not valid; allowed: {list(allowed)}")
    return value


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


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Measure without dropout; every module's own train/eval flag is put back on exit."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@torch.no_grad()
def span_distances(model: nn.Module, calib: Calibration, span: int, starts: list[int], tokens: str,
                   dtype: torch.dtype, per_token: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Mean over counted tokens of per_token(cos(input of layer s, output of layer s+span-1)), for each s in starts.

    One forward per micro-batch. Only the inputs of spans still open are kept (at most `span` of them), so memory
    does not grow with the number of layers.
    """
    start_set = set(starts)
    sums = torch.zeros(len(starts), dtype=torch.float64)
    count = 0
    pending: dict[int, torch.Tensor] = {}

    def on_layer(pos: int, inp: torch.Tensor, out: torch.Tensor) -> None:
        if pos in start_set:
            pending[pos] = select_tokens(inp, tokens).detach().clone()  # clone: safe even if a layer writes in place
        first = pos - span + 1
        if first in start_set:
            x = pending.pop(first)
            sums[starts.index(first)] += per_token(cosine(x, select_tokens(out, tokens), dtype)).sum().double().cpu()

    device = model_device(model)
    with eval_mode(model), layer_io(model, on_layer):
        for batch in calib.batches(device):
            pending.clear()
            model(input_ids=batch, use_cache=False)
            count += batch.shape[0] * (1 if tokens == "last" else batch.shape[1])
    return sums / count


class SpanMetric(LayerMetric):
    """Base for metrics that remove one contiguous span of `num_prune` layers in a single decision.

    Subclasses set `per_token` (cos -> distance per token, lower = more redundant). `select` scores every valid
    start s (span within the unprotected layers) by the mean distance between the input of layer s and the output
    of layer s+n-1, and removes the span with the lowest. Its one `Decision` has, per original layer, the distance
    of the span starting there, and None where no allowed span starts. `score` (per-layer interface) returns the
    n=1 distances (each layer's own input vs output); the runner uses `select`.
    """

    def __init__(self, tokens: str = "all", accum_dtype: str = "float64", protect_first: int = 0,
                 protect_last: int = 0):
        super().__init__(iterative=False, protect_first=protect_first, protect_last=protect_last)
        self.tokens = check_choice("tokens", tokens, TOKENS)
        self.dtype = resolve_accum_dtype(accum_dtype)

    @staticmethod
    def per_token(cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, model: nn.Module, calib: Calibration, cost: Cost) -> torch.Tensor:
        n = surgery.num_layers(model)
        return span_distances(model, calib, 1, list(range(n)), self.tokens, self.dtype, self.per_token)

    def select(self, model: nn.Module, calib: Calibration, num_prune: int, cost: Cost,
               resume: Selection | None = None) -> Selection:
        """`resume`: a cached selection of this metric; only one for the same `num_prune` applies to a span."""
        original_count = surgery.num_layers(model)
        self._check_budget(original_count, num_prune)
        if resume is not None and len(resume.removed) == num_prune:
            return resume
        t0 = time.perf_counter()
        before = Cost(**cost.as_dict())
        starts = list(range(self.protect_first, original_count - self.protect_last - num_prune + 1))
        dist = span_distances(model, calib, num_prune, starts, self.tokens, self.dtype, self.per_token)
        score_seconds = time.perf_counter() - t0
        if not torch.isfinite(dist).all():
            raise RuntimeError(f"{type(self).__name__}: non-finite span distances {dist.tolist()}")
        best = starts[int(torch.argmin(dist))]  # argmin returns the first minimum: ties go to the earliest span
        scores: list[float | None] = [None] * original_count
        for s, d in zip(starts, dist.tolist()):
            scores[s] = d
        removed = list(range(best, best + num_prune))
        decision = Decision(step=0, scores=scores, removed=removed, seconds=time.perf_counter() - t0,
                            score_seconds=score_seconds,
                            forward_tokens=cost.forward_tokens - before.forward_tokens,
                            backward_tokens=cost.backward_tokens - before.backward_tokens)
        return Selection(removed=removed, decisions=[decision])
