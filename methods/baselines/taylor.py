"""Shortened LLaMA's block-level Taylor criterion (Taylor and Taylor+)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradmap import surgery
from gradmap.data import Calibration
from gradmap.grad_state import eval_mode, grad_state_preserved, gradient_checkpointing, only_layer_weights_trainable
from gradmap.lm_loss import backward_lm_loss
from gradmap.metric import ACCUM_DTYPES, LayerMetric
from gradmap.models import model_device
from gradmap.schema import option
from gradmap.stages import Cost

# weights: parameters whose name contains "weight" (official anal_block_sensitivity_taylor.py in
# Nota-NetsPresso/shortened-llm; biases are left out); all: every float parameter of the block, biases included.
PARAMETERS = ("weights", "all")


@dataclass(eq=False)
class BlockTaylor(LayerMetric):
    """First-order Taylor estimate of the loss change when a whole block's weights are zeroed.

    Paper: "Shortened LLaMA: Depth Pruning for Large Language Models with Comparison of Retraining Methods" (v1:
    "Shortened LLaMA: A Simple Depth Pruning for Large Language Models"), Bo-Kyeong Kim, Geonmin Kim, Tae-Ho Kim,
    Thibault Castells, Shinkook Choi, Junho Shin, Hyoung-Kyu Song, arXiv 2402.02834, https://arxiv.org/abs/2402.02834

    Formula: I_l = sum over every weight element w of block l of |w * dL/dw|, L the next-token cross-entropy averaged
    over all calibration tokens. "Weight" as in the official code (`src/anal_block_sensitivity_taylor.py`, which
    keeps parameters whose name contains "weight"): projection matrices and norm scales, not biases
    (`parameters=weights`, default); `parameters=all` also adds |b * dL/db| of the biases (this repo's earlier
    reading; the same for bias-free models such as Llama). The gradient is that of the full calibration batch:
    micro-batch gradients (weighted by their share of predicted tokens) are summed into private `accum_dtype`
    buffers and |w * g| is taken once at the end (|sum| rather than sum of |.|, which would overestimate). With a
    single micro-batch no buffer is needed. Only the scored block parameters require grad during the backward;
    every parameter's `requires_grad` and `.grad` are restored afterwards.

    Taylor+ (`conf/metric/taylor_plus.yaml`): the paper observes that plain Taylor tends to remove early blocks,
    which hurts badly, and so heuristically excludes the first four and the last two blocks from pruning
    (protect_first=4, protect_last=2).

    Direction: the score is I_l as is: the block whose zeroing changes the loss least (lowest) is pruned.

    Args:
        iterative: False by default: the paper scores once and removes the n lowest.
        accum_dtype: dtype of the gradient buffers and products; float32 by default, because the buffers hold one
            gradient per block weight (float64 would double that memory); float64 for exact checks.
        gradient_checkpointing: recompute activations in backward to save memory on large models (off by default).
        parameters: `weights` (default, the official code: no biases) or `all` (biases included).
        loss_chunk_tokens: positions per chunk of the head + cross-entropy (`gradmap.lm_loss`; a memory knob that
            leaves the loss unchanged; 0 = the model's own loss with the full-vocabulary float32 logits).
        protect_first / protect_last: blocks never pruned; required (no default: taylor.yaml and taylor_plus.yaml
            share this class and differ here): 0 / 0 for Taylor, 4 / 2 for Taylor+ (the paper).
    """

    name = "taylor"

    accum_dtype: str = option(choices=tuple(ACCUM_DTYPES))
    gradient_checkpointing: bool = option()
    parameters: str = option(choices=PARAMETERS)
    loss_chunk_tokens: int = option(ge=0, allowed="an integer >= 0 (0 = the model's own loss)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.dtype = ACCUM_DTYPES[self.accum_dtype]

    def score(self, model: nn.Module, calib: Calibration, cost: Cost) -> torch.Tensor:
        with grad_state_preserved(model), eval_mode(model), \
                gradient_checkpointing(model, self.gradient_checkpointing):
            return self._score(model, calib, cost)

    def _score(self, model: nn.Module, calib: Calibration, cost: Cost) -> torch.Tensor:
        layers = surgery.get_decoder_layers(model)
        scores = torch.zeros(len(layers), dtype=torch.float64)
        owner = only_layer_weights_trainable(model)
        if self.parameters == "weights":
            for layer in layers:
                for name, p in layer.named_parameters():
                    if "weight" not in name and p in owner:  # not scored: no gradient needed (flags restored)
                        p.requires_grad_(False)
                        del owner[p]

        single = calib.num_batches == 1
        total = calib.input_ids.shape[0] * (calib.input_ids.shape[1] - 1)  # predicted tokens (labels are shifted)
        buffers: dict[nn.Parameter, torch.Tensor] = {}
        share = 0.0  # the running micro-batch's share of the predicted tokens (read by the hook)

        def taylor(p: nn.Parameter, g: torch.Tensor) -> float:
            return float((p.detach().to(self.dtype) * g).abs().sum())

        def hook(p: nn.Parameter) -> None:
            g = p.grad.to(self.dtype) * share  # this micro-batch's share of the full-batch gradient
            p.grad = None
            if single:
                scores[owner[p]] += taylor(p, g)
            elif p in buffers:
                buffers[p].add_(g)
            else:
                buffers[p] = g

        handles = [p.register_post_accumulate_grad_hook(hook) for p in owner]
        try:
            for batch in calib.batches(model_device(model)):
                share = batch.shape[0] * (batch.shape[1] - 1) / total
                backward_lm_loss(model, batch, cost, self.loss_chunk_tokens)
        finally:
            for h in handles:
                h.remove()
        for p, g in buffers.items():
            scores[owner[p]] += taylor(p, g)
        return scores
