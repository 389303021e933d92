"""Shortened LLaMA's perplexity criterion, and the calibration perplexity it and SLEB share."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gradmap import surgery
from gradmap.data import Calibration
from gradmap.grad_state import eval_mode
from gradmap.metric import LayerMetric
from gradmap.models import model_device
from gradmap.progress import progress
from gradmap.stages import Cost


@torch.no_grad()
def calibration_perplexity(model: nn.Module, calib: Calibration) -> float:
    """exp(mean next-token cross-entropy over every predicted calibration token).

    HF's loss is the mean over a micro-batch's B*(T-1) predicted tokens, so micro-batches are weighted by that count;
    the sum is a Python float (float64).
    """
    total, count = 0.0, 0
    for batch in calib.batches(model_device(model)):
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += float(model(input_ids=batch, labels=batch, use_cache=False).loss) * n
        count += n
    return math.exp(total / count)


@dataclass(eq=False)
class PerplexityDrop(LayerMetric):
    """PPL criterion from Shortened LLaMA: the calibration perplexity of the model with the layer removed.

    Paper: "Shortened LLaMA: Depth Pruning for Large Language Models with Comparison of Retraining Methods" (v1:
    "Shortened LLaMA: A Simple Depth Pruning for Large Language Models"), Bo-Kyeong Kim, Geonmin Kim, Tae-Ho Kim,
    Thibault Castells, Shinkook Choi, Junho Shin, Hyoung-Kyu Song, arXiv 2402.02834, https://arxiv.org/abs/2402.02834

    Formula: I_l = PPL(model without layer l) = exp(mean next-token CE over the calibration tokens), each layer
    removed alone (temporarily, with `surgery.layers_removed`): one pass over the calibration set per layer.

    Direction: the score is that perplexity as is: a layer whose removal hurts least (lowest PPL) is pruned first.

    Args:
        iterative: False by default: Shortened LLaMA scores once and removes the n lowest (SLEB is the iterative
            variant, `methods.baselines.sleb.SLEB`).
        protect_first / protect_last: layers never pruned; no default, the YAMLs differ in them: `ppl` 0 / 0 (the
            criterion alone), `ppl_plus` 4 / 2 (the official pipeline).
            Protected layers are still scored, as in the official pipeline (`src/anal_block_sensitivity_ppl.py` in
            Nota-NetsPresso/shortened-llm scores every block; `src/block_prune.py` then drops the first 4 and last
            2 from the order), so every decision has a score for every present layer.
    """

    name = "ppl"

    def score(self, model: nn.Module, calib: Calibration, cost: Cost) -> torch.Tensor:
        return removal_perplexities(model, calib, range(surgery.num_layers(model)), self.name)


def removal_perplexities(model: nn.Module, calib: Calibration, positions, name: str) -> torch.Tensor:
    """Calibration perplexity of the model without each of the current layers `positions` (one removed at a time,
    with `surgery.layers_removed`): one pass over the calibration set per position, in the order given."""
    positions = list(positions)
    scores = torch.empty(len(positions), dtype=torch.float64)
    with eval_mode(model):
        for k, i in enumerate(progress(positions, desc=f"{name}: candidate layers", unit="layer", leave=False)):
            with surgery.layers_removed(model, [i]):
                scores[k] = calibration_perplexity(model, calib)
    return scores
