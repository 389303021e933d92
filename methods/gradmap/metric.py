"""GradMAP as implemented here, stage 1: the gradient metric (our reading; the paper's formulas are not public).

GradMAP: Faster Layer Pruning with Gradient Metric and Projection Compensation (arXiv 2602.14649,
https://arxiv.org/abs/2602.14649). One backward pass of the next-token cross-entropy over the calibration tokens
scores every layer at once (a global assessment). The paper's abstract rescores after each removal (n
forward+backward passes for n layers, `iterative=True`) from gradient magnitudes (`target=weights`); the default
here, chosen on validation text, is one-shot with the first-order activation score (README: how it differs).

The paper does not publish the exact reduction, so it is configurable (`target` x `reduction`):

  target=weights      g = dL/dW for every weight W of the layer
      mean_abs        sum |g| / #params                       (mean absolute gradient per parameter)
      l2              sqrt(sum g^2)                            (gradient L2 norm)
      rel_l2          sqrt(sum g^2) / sqrt(sum W^2)            (L2 relative to the weight norm)
  target=activations  g_t = dL/dh_t, h_t the layer's output hidden state at token t, d_t = h_t - x_t its update
      mean_abs        mean_t,i |g_ti|
      l2              mean_t ||g_t||
      first_order     mean_t |g_t . d_t|                       (first-order loss change if the update is removed)

Higher = more important; the lowest is pruned. The gradient is that of the loss over the whole calibration set,
so the micro-batch size (`calibration.batch_size`) is a memory knob only and never changes the scores:
  * activations: each token's gradient only depends on its own sequence, so micro-batch gradients are rescaled to
    the full-set loss (times the micro-batch's share of predicted tokens) and reduced as they are produced (tensor
    hooks), with no buffer at all;
  * weights, `grad_accumulation=full` (default): micro-batch gradients are summed, weighted by their share of
    predicted tokens, into one float32 buffer per parameter (post-accumulate-grad hooks drop `.grad` at once), and
    reduced after the last micro-batch, as gradient accumulation does. With one micro-batch no buffer is needed
    and the gradient is reduced as it is produced. `per_batch` reduces each micro-batch's gradient on its own and
    averages the results weighted by tokens (no buffer, but it measures gradient noise as much as the gradient).
Reductions are in `accum_dtype` (fp64 by default). Peak memory: a training step without stored gradients, plus
one float32 gradient copy when weights are accumulated over several micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradmap import surgery
from gradmap.capture import layer_io
from gradmap.data import Calibration
from gradmap.errors import ConfigError
from gradmap.grad_state import grad_state_preserved, gradient_checkpointing, only_layer_weights_trainable
from gradmap.lm_loss import backward_lm_loss
from gradmap.metric import ACCUM_DTYPES, LayerMetric
from gradmap.models import model_device
from gradmap.schema import option
from gradmap.stages import Cost

REDUCTIONS = {"weights": ("mean_abs", "l2", "rel_l2"), "activations": ("mean_abs", "l2", "first_order")}
GRAD_ACCUMULATIONS = ("full", "per_batch")


def predicted_share(batch: torch.Tensor, calib: Calibration) -> float:
    """The micro-batch's share of the calibration set's predicted tokens (HF shifts labels: T - 1 per row)."""
    total = calib.input_ids.shape[0] * (calib.input_ids.shape[1] - 1)
    return batch.shape[0] * (batch.shape[1] - 1) / total


def reduce_weight_grad(grad: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> tuple[float, float, float]:
    """Per-tensor partial sums (sum|g|, sum g^2, sum W^2) that compose into any weight reduction."""
    g = grad.detach().to(dtype)
    return float(g.abs().sum()), float((g * g).sum()), float(weight.detach().to(dtype).pow(2).sum())


def combine_weight_reduction(reduction: str, abs_sum: float, sq_sum: float, w_sq_sum: float, numel: int) -> float:
    if reduction == "mean_abs":
        return abs_sum / numel
    if reduction == "l2":
        return sq_sum ** 0.5
    if reduction == "rel_l2":
        return (sq_sum ** 0.5) / max(w_sq_sum ** 0.5, 1e-30)
    raise ValueError(f"reduction={reduction!r} is not valid for target=weights; allowed: {REDUCTIONS['weights']}")


def reduce_activation_grad(reduction: str, grad: torch.Tensor, layer_in: torch.Tensor | None,
                           layer_out: torch.Tensor | None, dtype: torch.dtype) -> float:
    """Mean over the batch's tokens of the chosen activation-gradient reduction ([B, T, d] tensors); first_order
    takes the layer's input and output (its update is their difference, formed here, not stored per layer). One
    sequence at a time, so the `dtype` temporaries are [T, d], not [B, T, d]."""
    if reduction not in REDUCTIONS["activations"]:
        raise ValueError(f"reduction={reduction!r} is not valid for target=activations; "
                         f"allowed: {REDUCTIONS['activations']}")
    total = 0.0
    for b in range(grad.shape[0]):
        g = grad[b].detach().to(dtype)
        if reduction == "mean_abs":
            total += float(g.abs().sum())
        elif reduction == "l2":
            total += float(g.norm(dim=-1).sum())
        else:  # first_order
            total += float((g * (layer_out[b].to(dtype) - layer_in[b].to(dtype))).sum(dim=-1).abs().sum())
    per_token = grad.shape[-1] if reduction == "mean_abs" else 1
    return total / (grad[..., 0].numel() * per_token)


@dataclass(eq=False)
class GradMAPMetric(LayerMetric):
    """GradMAP gradient metric (arXiv 2602.14649). See the module docstring for the formulas. Defaults:
    conf/metric/gradmap.yaml (target, reduction and one-shot chosen on validation text, README).

    Options:
        target: `weights` or `activations` (what the gradient is taken with respect to).
        reduction: see REDUCTIONS.
        iterative: rescore after each removal (the paper's one backward per pruning decision).
        accum_dtype: precision of the per-layer sums.
        grad_accumulation: weights only: `full` (the gradient of the whole calibration set) or `per_batch`.
        gradient_checkpointing: recompute each layer's activations in the backward (the backward's peak memory stays
            near a forward's; ~1/3 more compute).
        loss_chunk_tokens: positions per chunk of the head + cross-entropy (`gradmap.lm_loss`; 0 = the model's own
            loss, which holds the full-vocabulary float32 logits of a micro-batch).
    """

    name = "gradmap"

    target: str = option(choices=tuple(REDUCTIONS))
    reduction: str = option(choices=tuple(dict.fromkeys(r for rs in REDUCTIONS.values() for r in rs)),
                            allowed="; ".join(f"{', '.join(rs)} (target={t})" for t, rs in REDUCTIONS.items()))
    accum_dtype: str = option(choices=tuple(ACCUM_DTYPES))
    grad_accumulation: str = option(choices=GRAD_ACCUMULATIONS)
    gradient_checkpointing: bool = option()
    loss_chunk_tokens: int = option(ge=0, allowed="an integer >= 0 (0 = the model's own loss)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reduction not in REDUCTIONS[self.target]:
            raise ConfigError("reduction", self.reduction, list(REDUCTIONS[self.target]),
                              problem=f"not valid for target={self.target}")
        self.dtype = ACCUM_DTYPES[self.accum_dtype]

    @property
    def micro_batch_is_memory_knob(self) -> bool:  # per_batch reduces each micro-batch's weight gradient on its own
        return not (self.target == "weights" and self.grad_accumulation == "per_batch")

    def score(self, model: nn.Module, calib: Calibration, cost: Cost) -> torch.Tensor:
        with grad_state_preserved(model), gradient_checkpointing(model, self.gradient_checkpointing):
            if self.target == "weights":
                return self._score_weights(model, calib, cost)
            return self._score_activations(model, calib, cost)

    def _backward(self, model: nn.Module, batch: torch.Tensor, cost: Cost) -> None:
        backward_lm_loss(model, batch, cost, self.loss_chunk_tokens)

    def _score_weights(self, model: nn.Module, calib: Calibration, cost: Cost) -> torch.Tensor:
        layers = surgery.get_decoder_layers(model)
        n = len(layers)
        owner = only_layer_weights_trainable(model)
        numel = [sum(p.numel() for p in layer.parameters() if p.is_floating_point()) for layer in layers]
        partial = torch.zeros(n, 3, dtype=torch.float64)  # sum|g|, sum g^2, sum W^2 of the gradient being reduced
        totals = torch.zeros(n, dtype=torch.float64)
        accumulate = self.grad_accumulation == "full" and calib.num_batches > 1
        buffers: dict[nn.Parameter, torch.Tensor] = {}  # full-set gradient, only when accumulating
        share = 1.0  # the running micro-batch's share of the predicted tokens (read by the hook)

        def hook(p: nn.Parameter) -> None:
            if accumulate:
                g = p.grad.detach().float() * share  # this micro-batch's share of the full-set gradient
                if p in buffers:
                    buffers[p].add_(g)
                else:
                    buffers[p] = g
            else:
                partial[owner[p]] += torch.tensor(reduce_weight_grad(p.grad, p, self.dtype), dtype=torch.float64)
            p.grad = None  # drop at once: never more than one gradient copy

        handles = [p.register_post_accumulate_grad_hook(hook) for p in owner]
        device = model_device(model)
        try:
            for batch in calib.batches(device):
                share = predicted_share(batch, calib)
                partial.zero_()
                self._backward(model, batch, cost)
                if not accumulate:  # per micro-batch (or the single batch): reduce now, average by tokens
                    w = batch.numel() / calib.num_tokens
                    for i in range(n):
                        totals[i] += w * combine_weight_reduction(self.reduction, *partial[i].tolist(), numel[i])
        finally:
            for h in handles:
                h.remove()
        if accumulate:
            partial.zero_()
            for p, g in buffers.items():
                partial[owner[p]] += torch.tensor(reduce_weight_grad(g, p, self.dtype), dtype=torch.float64)
            buffers.clear()
            for i in range(n):
                totals[i] = combine_weight_reduction(self.reduction, *partial[i].tolist(), numel[i])
        return totals

    def _score_activations(self, model: nn.Module, calib: Calibration, cost: Cost) -> torch.Tensor:
        n = surgery.num_layers(model)
        for p in model.parameters():
            p.requires_grad_(False)
        totals = torch.zeros(n, dtype=torch.float64)
        weight = 0.0  # rescales the running micro-batch's per-token reduction to the full-set loss's (read by hooks)

        def on_layer(pos: int, inp: torch.Tensor, out: torch.Tensor) -> None:
            # References, not copies: the backward keeps a layer's input and output alive anyway (as the next
            # layer's saved input, or as a checkpoint's input), so first_order costs no [B, T, d] buffer per layer.
            layer_in, layer_out = inp.detach(), out.detach()

            def on_grad(g: torch.Tensor) -> None:
                totals[pos] += weight * reduce_activation_grad(self.reduction, g, layer_in, layer_out, self.dtype)

            out.register_hook(on_grad)

        # No parameter requires grad, so the graph must start at the embeddings' output.
        embed = model.get_input_embeddings()
        start = embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
        device = model_device(model)
        try:
            with layer_io(model, on_layer):
                for batch in calib.batches(device):
                    # The micro-batch loss is a mean over its predicted tokens: its gradients are those of the
                    # full-set loss divided by the batch's share of predicted tokens; the reduction is a mean over
                    # the batch's positions, and the set's mean weighs it by the batch's share of positions.
                    weight = predicted_share(batch, calib) * batch.numel() / calib.num_tokens
                    self._backward(model, batch, cost)
        finally:
            start.remove()
        return totals
