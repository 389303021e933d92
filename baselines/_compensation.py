"""Helpers shared by the compensation baselines: gaps of removed layers, hidden-state capture, calibration error.

Compensations change kept layers, which the dense view shares with the pruned model; so every dense reference is
captured once, *before* the first change, and kept on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from gradmap import surgery
from gradmap.capture import layer_io
from gradmap.metric import Calibration
from gradmap.models import model_device


def contiguous_gaps(removed: Iterable[int]) -> list[tuple[int, int]]:
    """Runs of consecutive removed original indices as (first, last), in depth order: [2, 3, 7] -> [(2, 3), (7, 7)]."""
    gaps: list[tuple[int, int]] = []
    for i in sorted(removed):
        if gaps and i == gaps[-1][1] + 1:
            gaps[-1] = (gaps[-1][0], i)
        else:
            gaps.append((i, i))
    return gaps


@torch.no_grad()
def layer_states(model: nn.Module, calib: Calibration, positions: Sequence[int],
                 inputs: bool = False) -> dict[int, list[torch.Tensor]]:
    """Per calibration batch, the outputs (or inputs) of the decoder layers at `positions` of the model as it
    currently is (pruned, or dense inside `surgery.dense_view`), as float32 CPU tensors."""
    states: dict[int, list[torch.Tensor]] = {p: [] for p in positions}
    pick = (lambda i, o: i) if inputs else (lambda i, o: o)
    with layer_io(model, lambda p, i, o: states[p].append(pick(i, o).detach().float().cpu()), positions):
        for batch in calib.batches(model_device(model)):
            model(input_ids=batch, use_cache=False)
    return states


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
