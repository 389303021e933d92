"""Random layer scores: the floor any real metric must beat."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from gradmap import surgery
from gradmap.data import Calibration
from gradmap.metric import LayerMetric
from gradmap.schema import option
from gradmap.stages import Cost


@dataclass(eq=False)
class RandomMetric(LayerMetric):
    """Uniform random scores in [0, 1) from a `torch.Generator` seeded with `seed`; no forward pass.

    Not from a paper: the sanity baseline used throughout the layer-pruning literature (e.g. the random-pruning
    rows of ShortGPT, arXiv 2403.03853, https://arxiv.org/abs/2403.03853).

    Direction: the lowest random score is pruned, so one-shot pruning removes a uniformly random set of layers.
    A fresh generator per call makes the result depend only on the seed and the layer count.

    Args:
        seed: generator seed; 0 by default (the sweep varies it for several random draws).
        protect_first / protect_last: layers never pruned; 0 by default.
    """

    name = "random"

    iterative: bool = field(default=False, init=False)  # one-shot: rescoring would only draw new numbers
    seed: int = option()

    def score(self, model: nn.Module, calib: Calibration, cost: Cost) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(surgery.num_layers(model), generator=generator, dtype=torch.float64)
