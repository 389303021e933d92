"""Forward hooks that read decoder-layer inputs and outputs (the residual stream) without changing the model.

Hooks on the layers themselves, not HF `output_hidden_states`: the latter applies the final norm to its last entry,
which would skew any metric that compares the last layer's input with its output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from gradmap import surgery

# fn(position, layer_input, layer_output) is called for every hooked layer on every forward.
LayerIOFn = Callable[[int, torch.Tensor, torch.Tensor], None]


def _hidden(x: object) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x  # type: ignore[return-value]


@contextlib.contextmanager
def layer_io(model: nn.Module, fn: LayerIOFn, positions: Sequence[int] | None = None) -> Iterator[None]:
    """Call `fn(position, input_hidden, output_hidden)` for each decoder layer forward while open."""
    layers = surgery.get_decoder_layers(model)
    positions = range(len(layers)) if positions is None else positions
    handles = []
    for pos in positions:
        def hook(_m, args, kwargs, output, pos=pos):
            inp = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            fn(pos, inp, _hidden(output))
        handles.append(layers[pos].register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_layer_io(model: nn.Module, input_ids: torch.Tensor,
                     positions: Sequence[int] | None = None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """One forward; returns {position: (input, output)} hidden states, detached."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with layer_io(model, lambda p, i, o: seen.__setitem__(p, (i.detach(), o.detach())), positions):
        model(input_ids=input_ids, use_cache=False)
    return seen
