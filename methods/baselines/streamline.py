"""LLM-Streamline layer-span selection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradmap.schema import option
from gradmap.selection import SelectionKind
from methods.baselines._common import SpanMetric

# official: cos(h_b, h_{b+n+1}), the kept layer b before the span included (get_cosine.py in
# RUCKBReasoning/LLM-Streamline); span_only: cos(input of the span, its output), this repo's earlier reading.
CRITERIA = ("official", "span_only")


@dataclass(eq=False)
class StreamlineSpan(SpanMetric):
    """LLM-Streamline: remove the contiguous span of n layers after which the hidden state has turned least.

    Paper: "Compressing Large Language Models by Streamlining the Unimportant Layer" (later versions: "Streamlining
    Redundant Layers to Compress Large Language Models"), Xiaodong Chen, Yuxuan Hu, Jing Zhang, Yanling Wang,
    Cuiping Li, Hong Chen, arXiv 2403.19135, https://arxiv.org/abs/2403.19135 (code: RUCKBReasoning/LLM-Streamline).

    Formula (`criterion=official`, default): with h_i the hidden state entering layer i (HF `hidden_states[i]`;
    h_L is the last layer's output after the final norm, HF's last entry), sim(b) = mean_t cos(h_{b,t},
    h_{b+n+1,t}) for b = 0 .. L-n-1; layers b+1 .. b+n are removed for the b with the highest sim, and layer b is
    the one the official code then retrains to map h_b to h_{b+n+1} (`compensation=streamline_layer` trains the
    kept layer right before each gap, i.e. b). The official code calls its search with `layer_intervals + 1`
    (`train_mseloss.py`), so the compared states are n+1 layers apart, and removes `range(best_layer + 1,
    best_layer + layer_intervals)`. A span starting at layer 0 is never a candidate: it would have no kept layer b
    before it (official b >= 0, so the span starts at 1 or later).
    `criterion=span_only` (this repo's earlier reading, kept as an option): sim(s) = mean_t cos(x_{s,t},
    y_{s+n-1,t}), the input of the first removed layer vs the raw output of the last, any start s >= 0.
    Only the selection is implemented here; the paper's lightweight replacement layer is a compensation.

    Direction: the decision's score for the span starting at s (the first removed layer; s = b+1 for `official`)
    is the cosine distance 1 - sim (lowest = removed, as for every metric here); None for starts where no allowed
    span begins (layer 0 under `official`, protected layers, or the span would run past the end). The official code
    ranks 0.5 + 0.5 cos, the same order. `score` gives the n=1 input-vs-output distances (BI, the last one after the
    final norm under `official`).

    Args:
        criterion: `official` (default) | `span_only`, see above.
        tokens: `all` (default; the official code averages the similarity over every token) or `last`.
        accum_dtype: precision of the cosines; float64 by default (cheap next to the forward).
        protect_first / protect_last: the span must avoid the first / last k layers; 0 by default (the official
            code searches every b; `official` alone already keeps layer 0).
    """

    name = "streamline"
    selection_kind = SelectionKind.SPAN  # one span of exactly n layers

    criterion: str = option(choices=CRITERIA)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.criterion == "official":
            self.lead, self.last_state = 1, "final_norm"  # HF hidden_states, as the official code reads them

    @staticmethod
    def per_token(cos: torch.Tensor) -> torch.Tensor:
        return 1.0 - cos
