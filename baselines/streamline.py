"""LLM-Streamline layer-span selection."""

from __future__ import annotations

import torch

from baselines._common import SpanMetric


class StreamlineSpan(SpanMetric):
    """LLM-Streamline: remove the contiguous span of n layers whose input and output are most cosine-similar.

    Paper: "Compressing Large Language Models by Streamlining the Unimportant Layer" (later versions: "Streamlining
    Redundant Layers to Compress Large Language Models"), Xiaodong Chen, Yuxuan Hu, Jing Zhang, Yanling Wang,
    Cuiping Li, Hong Chen, arXiv 2403.19135, https://arxiv.org/abs/2403.19135

    Formula: for each start s, sim(s) = mean_t cos(x_{s,t}, y_{s+n-1,t}), x_s the input of layer s and y_{s+n-1}
    the output of layer s+n-1 (hooks on the layers), t over the counted tokens; the span with the highest sim is
    removed. Only the selection is implemented here; the paper's lightweight replacement layer is a compensation.

    Direction: the decision's score for start s is the cosine distance 1 - sim(s) (lowest = removed, as for every
    metric here); None for starts where no allowed span begins (protected layers, or the span would run past the
    end). `score` gives the n=1 distances, i.e. BI.

    Args:
        tokens: `all` (default; the paper averages the similarity over the calibration tokens) or `last`.
        accum_dtype: precision of the cosines; float64 by default (cheap next to the forward).
        protect_first / protect_last: the span must avoid the first / last k layers; 0 by default (none in the paper).
    """

    name = "streamline"

    def __init__(self, tokens: str = "all", accum_dtype: str = "float64", protect_first: int = 0,
                 protect_last: int = 0):
        super().__init__(tokens=tokens, accum_dtype=accum_dtype, protect_first=protect_first,
                         protect_last=protect_last)

    @staticmethod
    def per_token(cos: torch.Tensor) -> torch.Tensor:
        return 1.0 - cos
