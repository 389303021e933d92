"""What a metric must leave exactly as it found it: weights, hooks, gradients, flags and the layer list."""

from __future__ import annotations

import torch
from torch import nn

from gradmap import surgery

_MODULE_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks",
                 "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
_PARAM_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "module_hooks": {name: tuple(tuple(getattr(m, attr).keys()) for attr in _MODULE_HOOKS)
                         for name, m in model.named_modules()},
        "param_hooks": {name: tuple(tuple((getattr(p, attr) or {}).keys()) for attr in _PARAM_HOOKS)
                        for name, p in model.named_parameters()},
        # Same tensor object (not a copy the metric put back) and same values.
        "grad_ids": {name: None if p.grad is None else id(p.grad) for name, p in model.named_parameters()},
        "grad_values": {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "training": {name: m.training for name, m in model.named_modules()},
        "layers": [id(layer) for layer in surgery.get_decoder_layers(model)],
        "num_hidden_layers": model.config.num_hidden_layers,
    }


def assert_unchanged(before: dict, after: dict) -> None:
    surgery.assert_same_weights(before["state"], after["state"])
    for name, g in before["grad_values"].items():
        h = after["grad_values"][name]
        assert (g is None) == (h is None), f"metric changed whether {name} has a .grad"
        assert g is None or torch.equal(g, h), f"metric changed {name}.grad"
    for key in before:
        if key not in ("state", "grad_values"):
            assert before[key] == after[key], f"metric changed the model's {key}"
