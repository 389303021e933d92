"""ShortGPT Block Influence."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradmap import surgery
from gradmap.data import Calibration
from gradmap.metric import ACCUM_DTYPES, LayerMetric
from gradmap.schema import option
from gradmap.stages import Cost
from methods.baselines._common import LAST_STATES, TOKENS, angular, state_distances

DISTANCES = ("cosine", "angular")


@dataclass(eq=False)
class BlockInfluence(LayerMetric):
    """Block Influence (BI) from ShortGPT.

    Paper: "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect", Xin Men, Mingyu Xu,
    Qingyu Zhang, Bingning Wang, Hongyu Lin, Yaojie Lu, Xianpei Han, Weipeng Chen, arXiv 2403.03853,
    https://arxiv.org/abs/2403.03853

    Formula: BI_l = 1 - mean_t cos(x_{l,t}, y_{l,t}), where x_l / y_l are layer l's input / output hidden states
    and t runs over the counted token positions of the calibration set. As in the reference code (icip-cas/ShortGPT,
    from the authors' lab, `shortgpt/shortgpt.py`, and the widely used sramshetty/ShortGPT `short_hf.py`: BI of
    layer i from HF `output_hidden_states` entries i and i+1), the last layer's output is taken after the model's
    final norm (`last_state=final_norm`, HF's last entry); `last_state=raw` compares the raw output instead (this
    repo's earlier reading). States are read with hooks, so no list of every state is kept.
    With `distance=angular`, mean_t arccos(cos(x_{l,t}, y_{l,t})) / pi instead (a variant, not in the paper).

    Direction: BI is a distance, so it is the score as is: a layer that barely changes the residual stream has BI
    near 0 and is pruned first (the paper removes the lowest BI).

    Args:
        distance: `cosine` (default, the paper's 1 - cos) or `angular`.
        tokens: `all` (default; the paper averages over all tokens) or `last` (last position of each sequence).
        iterative: False by default: ShortGPT scores once and removes the n lowest layers.
        accum_dtype: precision of the cosines and sums; float64 by default (cheap next to the forward).
        last_state: `final_norm` (default, the reference code) or `raw`: the last layer's output as compared.
        protect_first / protect_last: layers never pruned; 0 by default (the paper protects none).
    """

    name = "bi"

    distance: str = option(choices=DISTANCES)
    tokens: str = option(choices=TOKENS)
    accum_dtype: str = option(choices=tuple(ACCUM_DTYPES))
    last_state: str = option(choices=LAST_STATES)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.dtype = ACCUM_DTYPES[self.accum_dtype]

    def per_token(self, cos: torch.Tensor) -> torch.Tensor:
        return angular(cos) if self.distance == "angular" else 1.0 - cos

    def score(self, model: nn.Module, calib: Calibration, cost: Cost) -> torch.Tensor:
        # Each layer's input h_l vs its output h_{l+1}, all layers in one forward per micro-batch.
        n = surgery.num_layers(model)
        return state_distances(model, calib, [(i, i + 1) for i in range(n)], self.tokens, self.dtype,
                               self.per_token, self.last_state)
