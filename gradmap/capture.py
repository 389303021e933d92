"""Reading decoder-layer states without changing the model: forward hooks on the layers (the residual stream), and
the captures built on them that metrics and compensations share.

Hooks on the layers themselves, not HF `output_hidden_states`: the latter applies the final norm to its last entry,
which would skew any metric that compares the last layer's input with its output.

Compensations change kept layers, which the dense view shares with the pruned model; so every dense reference is
captured once (`dense_states`, `dense_final_states`), *before* the first change, and kept on the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from gradmap import surgery
from gradmap.data import Calibration
from gradmap.models import model_device

# fn(position, layer_input, layer_output) is called for every hooked layer on every forward.
LayerIOFn = Callable[[int, torch.Tensor, torch.Tensor], None]
# Decoder-layer call arguments that must not be replayed: the cache belongs to the forward that produced them.
NOT_REPLAYED = ("hidden_states", "past_key_values", "past_key_value", "layer_past", "use_cache", "cache_position")


def hidden_of(x: object) -> torch.Tensor:
    """The hidden state of a decoder layer's output (a tensor, or a tuple whose first entry it is)."""
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
            fn(pos, inp, hidden_of(output))
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


@torch.no_grad()
def layer_outputs(model: nn.Module, batch: torch.Tensor, positions: Sequence[int]) -> dict[int, torch.Tensor]:
    """One forward of `batch`; the outputs of the decoder layers at `positions`, detached, in the model's dtype and
    on its device."""
    out: dict[int, torch.Tensor] = {}
    with layer_io(model, lambda p, i, o: out.__setitem__(p, o.detach()), positions):
        model(input_ids=batch, use_cache=False)
    return out


@torch.no_grad()
def layer_states(model: nn.Module, calib: Calibration, positions: Sequence[int],
                 inputs: bool = False) -> dict[int, list[torch.Tensor]]:
    """Per calibration batch, the outputs (or inputs) of the decoder layers at `positions` of the model as it
    currently is (pruned, or dense inside a dense view), as float32 CPU tensors."""
    states: dict[int, list[torch.Tensor]] = {p: [] for p in positions}
    pick = (lambda i, o: i) if inputs else (lambda i, o: o)
    with layer_io(model, lambda p, i, o: states[p].append(pick(i, o).detach().float().cpu()), positions):
        for batch in calib.batches(model_device(model)):
            model(input_ids=batch, use_cache=False)
    return states


def dense_states(model: nn.Module, removed: Mapping[int, nn.Module], calib: Calibration,
                 layers: Sequence[int]) -> dict[int, list[torch.Tensor]]:
    """Per calibration batch, the dense model's outputs of the original `layers` (float32, CPU): take them before
    changing any kept layer, which the dense view shares."""
    with surgery.dense_view(model, removed):
        return layer_states(model, calib, sorted(layers))


def dense_final_states(model: nn.Module, removed: Mapping[int, nn.Module], calib: Calibration) -> list[torch.Tensor]:
    """Dense output of the last decoder layer per batch (take it before changing any kept layer)."""
    with surgery.dense_view(model, removed):
        last = surgery.num_layers(model) - 1
        return layer_states(model, calib, [last])[last]


def final_rel_error(model: nn.Module, calib: Calibration, dense: Sequence[torch.Tensor]) -> float:
    """||h_p - h_d||^2 / ||h_d||^2 at the last decoder layer's output over the calibration set, in float64."""
    last = surgery.num_layers(model) - 1
    pruned = layer_states(model, calib, [last])[last]
    num = sum(float((p.double() - d.double()).pow(2).sum()) for p, d in zip(pruned, dense))
    den = sum(float(d.double().pow(2).sum()) for d in dense)
    return num / max(den, 1e-30)


@torch.no_grad()
def layer_io_stats(model: nn.Module, calib: Calibration, positions: Sequence[int],
                   stat: Callable[[torch.Tensor], torch.Tensor]
                   ) -> dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Per calibration batch, `stat` of the input and of the output of the decoder layers at `positions` of the model
    as it currently is, in one forward per batch: {position: ([stat(input) per batch], [stat(output) per batch])}.

    `stat` reduces a [batch, seq, hidden] state on the model's device (e.g. to per-channel means), so only the small
    reductions are kept (on the CPU), never the hidden states themselves."""
    seen: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {p: ([], []) for p in positions}

    def keep(p: int, i: torch.Tensor, o: torch.Tensor) -> None:
        seen[p][0].append(stat(i.detach()).cpu())
        seen[p][1].append(stat(o.detach()).cpu())

    with layer_io(model, keep, positions):
        for batch in calib.batches(model_device(model)):
            model(input_ids=batch, use_cache=False)
    return seen


@torch.no_grad()
def layer_calls(model: nn.Module, calib: Calibration, position: int) -> list[tuple[torch.Tensor, tuple, dict]]:
    """Per calibration batch, (hidden input, other positional args, kwargs) of the decoder layer at `position`, as
    the current model calls it: replaying them runs the layer exactly as inside the model (RoPE position
    embeddings, attention mask, ...). The hidden input is kept as float32 on the CPU."""
    calls: list[tuple[torch.Tensor, tuple, dict]] = []

    def hook(_m, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        rest = args if "hidden_states" in kwargs else args[1:]
        kw = {k: v for k, v in kwargs.items() if k not in NOT_REPLAYED}
        calls.append((hidden.detach().float().cpu(), rest, {**kw, "use_cache": False}))

    handle = surgery.get_decoder_layers(model)[position].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calib.batches(model_device(model)):
            model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return calls


class FinalErrorSums:
    """The last kept layer's squared error against the dense final states, summed over calibration batches on a
    pass that fits a site (the projection guard's free check; shared by the projection's and post_norm's sums)."""

    def __init__(self, last: int, final_targets: list[torch.Tensor]):
        self.last, self.final_targets = last, final_targets
        self.num = self.den = 0.0
        self.batch = 0  # index of the calibration batch being run

    def on_layer(self, pos: int, inp: torch.Tensor, out: torch.Tensor) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def stream(self, model: nn.Module, calib: Calibration, positions: Sequence[int], handles: Sequence) -> None:
        """One pass over the calibration batches with `on_layer` on the layers at `positions`; the other hooks
        (`handles`, already registered) are removed afterwards."""
        try:
            with layer_io(model, self.on_layer, sorted(set(positions))):
                for batch in calib.batches(model_device(model)):
                    model(input_ids=batch, use_cache=False)
                    self.batch += 1
        finally:
            for h in handles:
                h.remove()

    def add_final(self, batch: int, out: torch.Tensor) -> None:
        hd = self.final_targets[batch].double().to(out.device)
        self.num += float((out.detach().double() - hd).pow(2).sum())
        self.den += float(hd.pow(2).sum())

    @property
    def final_error(self) -> float:
        return self.num / max(self.den, 1e-30)
