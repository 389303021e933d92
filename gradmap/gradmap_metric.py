"""GradMAP stage 1: the gradient metric.

GradMAP: Faster Layer Pruning with Gradient Metric and Projection Compensation (arXiv 2602.14649,
https://arxiv.org/abs/2602.14649). One backward pass of the next-token cross-entropy over the calibration tokens
scores every layer at once (a global assessment); iteratively, the least important layer is removed and the
smaller model is rescored, so pruning n layers costs n forward+backward passes.

The paper does not publish the exact reduction, so it is configurable (`target` x `reduction`):

  target=weights      g = dL/dW for every weight W of the layer
      mean_abs        sum |g| / #params                       (mean absolute gradient per parameter)
      l2              sqrt(sum g^2)                            (gradient L2 norm)
      rel_l2          sqrt(sum g^2) / sqrt(sum W^2)            (L2 relative to the weight norm)
  target=activations  g_t = dL/dh_t, h_t the layer's output hidden state at token t, d_t = h_t - x_t its update
      mean_abs        mean_t,i |g_ti|
      l2              mean_t ||g_t||
      first_order     mean_t |g_t . d_t|                       (first-order loss change if the update is removed)

Higher = more important; the lowest is pruned. Gradients are reduced to per-layer numbers as they are produced
(post-accumulate-grad hooks that drop `.grad` at once, or tensor hooks on activations), in fp32 or fp64, so peak
memory stays that of a training step without stored gradients. With micro-batches, each micro-batch's gradient
is reduced on its own and the results are averaged weighted by tokens (reducing the full-batch gradient would
require holding a full gradient set); with one micro-batch the two coincide.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from gradmap import surgery
from gradmap.capture import layer_io
from gradmap.metric import Calibration, Cost, LayerMetric
from gradmap.models import model_device

REDUCTIONS = {"weights": ("mean_abs", "l2", "rel_l2"), "activations": ("mean_abs", "l2", "first_order")}
ACCUM_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@contextlib.contextmanager
def grad_state_preserved(model: nn.Module) -> Iterator[None]:
    """Restore every parameter's `requires_grad` and `.grad`, and the model's train/eval mode, on exit."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    modes = {m: m.training for m in model.modules()}
    try:
        for p in params:
            p.grad = None
        yield
    finally:
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        for m, mode in modes.items():
            m.training = mode


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """HF checkpointing only acts in train mode; these models have zero dropout, so outputs are unchanged."""
    if not enabled:
        yield
        return
    was = getattr(model, "is_gradient_checkpointing", False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        yield
    finally:
        if not was:
            model.gradient_checkpointing_disable()
            # transformers 5 adds an input-requires-grad hook on enable but removes it on disable only for PEFT.
            model.disable_input_require_grads()


def only_layer_weights_trainable(model: nn.Module) -> dict[nn.Parameter, int]:
    """Make exactly the decoder layers' float parameters require grad (embeddings, norm and head do not: no wasted
    gradient memory); return {parameter: layer position}. Callers restore flags with `grad_state_preserved`."""
    for p in model.parameters():
        p.requires_grad_(False)
    owner: dict[nn.Parameter, int] = {}
    for i, layer in enumerate(surgery.get_decoder_layers(model)):
        for p in layer.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
                owner[p] = i
    return owner


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


def reduce_activation_grad(reduction: str, grad: torch.Tensor, update: torch.Tensor | None,
                           dtype: torch.dtype) -> float:
    """Mean over the batch's tokens of the chosen activation-gradient reduction ([B, T, d] tensors)."""
    g = grad.detach().to(dtype)
    if reduction == "mean_abs":
        return float(g.abs().mean())
    if reduction == "l2":
        return float(g.norm(dim=-1).mean())
    if reduction == "first_order":
        return float((g * update.to(dtype)).sum(dim=-1).abs().mean())
    raise ValueError(f"reduction={reduction!r} is not valid for target=activations; "
                     f"allowed: {REDUCTIONS['activations']}")


class GradMAPMetric(LayerMetric):
    """GradMAP gradient metric (arXiv 2602.14649). See the module docstring for the formulas.

    Args:
        target: `weights` or `activations` (what the gradient is taken with respect to).
        reduction: see REDUCTIONS; default chosen by the ablation in the README.
        iterative: rescore after each removal (the paper's one backward per pruning decision).
        accum_dtype: precision of the per-layer sums.
        gradient_checkpointing: trade compute for memory on large models.
    """

    name = "gradmap"

    def __init__(self, target: str = "weights", reduction: str = "mean_abs", iterative: bool = True,
                 accum_dtype: str = "float64", gradient_checkpointing: bool = False,
                 protect_first: int = 0, protect_last: int = 0):
        super().__init__(iterative=iterative, protect_first=protect_first, protect_last=protect_last)
        if target not in REDUCTIONS:
            raise ValueError(f"target={target!r} is not valid; allowed: {list(REDUCTIONS)}")
        if reduction not in REDUCTIONS[target]:
            raise ValueError(f"reduction={reduction!r} is not valid for target={target}; "
                             f"allowed: {list(REDUCTIONS[target])}")
        if accum_dtype not in ACCUM_DTYPES:
            raise ValueError(f"accum_dtype={accum_dtype!r} is not valid; allowed: {list(ACCUM_DTYPES)}")
        self.target, self.reduction = target, reduction
        self.dtype = ACCUM_DTYPES[accum_dtype]
        self.gradient_checkpointing = gradient_checkpointing

    def score(self, model: nn.Module, calib: Calibration, cost: Cost) -> torch.Tensor:
        with grad_state_preserved(model), gradient_checkpointing(model, self.gradient_checkpointing):
            if self.target == "weights":
                return self._score_weights(model, calib, cost)
            return self._score_activations(model, calib, cost)

    def _backward(self, model: nn.Module, batch: torch.Tensor, cost: Cost) -> None:
        # Keep only the loss: holding the output would keep the [B, T, vocab] logits alive through the backward.
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        cost.backward_tokens += batch.numel()

    def _score_weights(self, model: nn.Module, calib: Calibration, cost: Cost) -> torch.Tensor:
        layers = surgery.get_decoder_layers(model)
        n = len(layers)
        owner = only_layer_weights_trainable(model)
        numel = [sum(p.numel() for p in layer.parameters() if p.is_floating_point()) for layer in layers]
        partial = torch.zeros(n, 3, dtype=torch.float64)  # this micro-batch: sum|g|, sum g^2, sum W^2
        totals = torch.zeros(n, dtype=torch.float64)

        def hook(p: nn.Parameter) -> None:
            partial[owner[p]] += torch.tensor(reduce_weight_grad(p.grad, p, self.dtype), dtype=torch.float64)
            p.grad = None  # reduce-and-drop: no full gradient set is ever held

        handles = [p.register_post_accumulate_grad_hook(hook) for p in owner]
        device = model_device(model)
        try:
            for batch in calib.batches(device):
                partial.zero_()
                self._backward(model, batch, cost)
                w = batch.numel() / calib.num_tokens
                for i in range(n):
                    totals[i] += w * combine_weight_reduction(self.reduction, *partial[i].tolist(), numel[i])
        finally:
            for h in handles:
                h.remove()
        return totals

    def _score_activations(self, model: nn.Module, calib: Calibration, cost: Cost) -> torch.Tensor:
        n = surgery.num_layers(model)
        for p in model.parameters():
            p.requires_grad_(False)
        totals = torch.zeros(n, dtype=torch.float64)
        state = {"w": 0.0}

        def on_layer(pos: int, inp: torch.Tensor, out: torch.Tensor) -> None:
            update = (out - inp).detach() if self.reduction == "first_order" else None

            def on_grad(g: torch.Tensor) -> None:
                totals[pos] += state["w"] * reduce_activation_grad(self.reduction, g, update, self.dtype)

            out.register_hook(on_grad)

        # No parameter requires grad, so the graph must start at the embeddings' output.
        embed = model.get_input_embeddings()
        start = embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
        device = model_device(model)
        try:
            with layer_io(model, on_layer):
                for batch in calib.batches(device):
                    state["w"] = batch.numel() / calib.num_tokens
                    self._backward(model, batch, cost)
        finally:
            start.remove()
        return totals
