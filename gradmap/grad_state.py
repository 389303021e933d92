"""Context managers that leave a model's training state as they found it: `requires_grad`, `.grad`, train/eval
mode, gradient checkpointing; shared by the metrics that take gradients (GradMAP, Taylor) or only measure."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from gradmap import surgery


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
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Measure without dropout; every module's own train/eval flag is put back on exit."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Recompute each decoder layer's activations in the backward. HF checkpoints a layer only when that layer's own
    `training` flag is set, so exactly those flags are set and every other module (attention, dropout) stays in eval
    mode: outputs are those of the eval-mode model whatever its dropout. Modes are restored by the callers'
    `grad_state_preserved` / `eval_mode`."""
    if not enabled:
        yield
        return
    was = getattr(model, "is_activation_checkpointing", None)
    was = getattr(model, "is_gradient_checkpointing", False) if was is None else was
    modes = {m: m.training for m in model.modules()}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    for layer in surgery.get_decoder_layers(model):
        layer.training = True
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        if not was:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
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
