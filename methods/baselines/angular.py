"""Angular-distance layer-span selection (Gromov et al.)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradmap.selection import SelectionKind
from methods.baselines._common import SpanMetric, angular


@dataclass(eq=False)
class AngularSpan(SpanMetric):
    """Remove the contiguous span of n layers with the smallest angular distance between its input and output.

    Paper: "The Unreasonable Ineffectiveness of the Deeper Layers", Andrey Gromov, Kushal Tirumala, Hassan Shapourian,
    Paolo Glorioso, Daniel A. Roberts, arXiv 2403.17887, https://arxiv.org/abs/2403.17887

    Formula: d(l, l+n) = mean over samples of (1/pi) arccos(cos(x_l, x_{l+n})), x_l the input of layer l and
    x_{l+n} the input of layer l+n, which is the output of layer l+n-1 (hooks on the layers, so the last layer's
    output is taken before the final norm); at the last token of each sequence by default, as in the paper. The
    span l..l+n-1 minimising d is removed (the paper then heals it with QLoRA, a separate stage here).

    Direction: the decision's score for start l is d(l, l+n) itself (lowest = removed); None for starts where no
    allowed span begins. `score` gives the n=1 distances (each layer's own input vs output).

    Args:
        tokens: `last` (default, the paper's choice: the last token has attended to the whole sequence) or `all`.
        accum_dtype: precision of the cosines; float64 by default (arccos is steep near cos = 1).
        protect_first / protect_last: the span must avoid the first / last k layers; 0 by default (the paper
            searches every start).
    """

    name = "angular"
    selection_kind = SelectionKind.SPAN  # one span of exactly n layers

    @staticmethod
    def per_token(cos: torch.Tensor) -> torch.Tensor:
        return angular(cos)
