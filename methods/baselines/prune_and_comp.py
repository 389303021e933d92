"""Prune&Comp: iterative layer pruning with magnitude compensation (training-free, folded into existing weights)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradmap import surgery
from gradmap.capture import dense_final_states, final_rel_error, layer_io_stats, layer_states
from gradmap.compensation import IncompatibleCompensationError, InterleavedCompensation
from gradmap.data import Calibration
from gradmap.metric import LayerMetric
from gradmap.module_paths import (
    POST_SUBLAYER_NORMS,
    RESIDUAL_WRITERS,
    SANDWICH_INPUT_NORMS,
    SANDWICH_WRITER_NORMS,
    get_path,
)
from gradmap.post_norm import gain_offset, scale_gain
from gradmap.progress import progress
from gradmap.schema import option
from gradmap.selection import Decision, DecisionCallback, Selection, SelectionKind
from gradmap.stages import Cost


def embeddings_tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def untie_embeddings(model: nn.Module) -> int:
    """Give the LM head its own copy of the (tied) embedding matrix; returns the number of parameters added.

    The config flag is cleared too, so saving and reloading keeps the two matrices apart."""
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "text_config", None)
    if text_config is not None and hasattr(text_config, "tie_word_embeddings"):
        text_config.tie_word_embeddings = False
    return head.weight.numel()


@torch.no_grad()
def scale_prefix(model: nn.Module, upto: int, s: float) -> None:
    """Multiply the residual stream after kept layer `upto` (-1: after the embedding) by s, exactly up to the
    norms' epsilon: scale the embedding and every residual writer of kept layers 0..upto.

    Why this is the hidden state times s: the residual stream at that point is the embedding plus the writers'
    outputs, and every writer reads its input through a scale-invariant pre-norm (RMSNorm/LayerNorm), so scaling all
    of them scales every state up to there by s and changes nothing else. In a sandwich layer (Gemma 2/3) the
    writers' outputs pass through a norm, so the scale goes into those norms' gains instead (`is_sandwich`)."""
    emb = model.get_input_embeddings()
    emb.weight.mul_(s)
    layers = surgery.get_decoder_layers(model)
    for j in range(upto + 1):
        if is_sandwich(layers[j]):
            for name in SANDWICH_WRITER_NORMS:
                norm = getattr(layers[j], name)
                scale_gain(norm, s, gain_offset(norm))
            continue
        for path in RESIDUAL_WRITERS:
            proj = get_path(layers[j], path)
            proj.weight.mul_(s)
            if getattr(proj, "bias", None) is not None:
                proj.bias.mul_(s)


def is_sandwich(layer: nn.Module) -> bool:
    """Input and output norms around both sublayers (Gemma 2/3; `gradmap.module_paths.SANDWICH_*`)."""
    return all(isinstance(getattr(layer, n, None), nn.Module) for n in SANDWICH_INPUT_NORMS + SANDWICH_WRITER_NORMS)


RATIOS = ("channel_mean_abs", "token_l2")


def channel_stat(h: torch.Tensor) -> torch.Tensor:
    """[..., seq, hidden] -> [sequences, hidden]: per sequence and channel, the mean over tokens of |h|, in float64."""
    return h.double().abs().mean(dim=-2).reshape(-1, h.shape[-1])


def token_stat(h: torch.Tensor) -> torch.Tensor:
    """[..., hidden] -> [tokens]: the L2 norm of every token's state, in float64."""
    return h.double().flatten(0, -2).norm(dim=-1)


STATS = {"channel_mean_abs": channel_stat, "token_l2": token_stat}


def ratio_from_stats(dense: list[torch.Tensor], pruned: list[torch.Tensor], ratio: str) -> tuple[float, float, float]:
    """(s, dense magnitude, pruned magnitude) from per-batch `STATS[ratio]` reductions of the two states.

    channel_mean_abs (the official code): s = mean over sequences r and channels c of
        mean_t |h_dense[r, t, c]| / mean_t |h_pruned[r, t, c]|
    token_l2 (the earlier variant here): s = mean_t ||h_dense,t|| / mean_t ||h_pruned,t|| over all tokens."""
    d, p = torch.cat(dense), torch.cat(pruned)
    if ratio == "channel_mean_abs":
        s = (d / p).mean().item()
    else:
        s = d.mean().item() / max(p.mean().item(), 1e-30)
    if not math.isfinite(s) or s <= 0:
        raise RuntimeError(f"prune_and_comp: magnitude ratio {s} ({ratio}) is not a positive finite number; the "
                           "pruned state has a zero-magnitude channel or sequence on the calibration data")
    return s, d.mean().item(), p.mean().item()


def channel_magnitude_ratio(dense: list[torch.Tensor], pruned: list[torch.Tensor]) -> tuple[float, float, float]:
    """(s, dense mean |h|, pruned mean |h|) of full [batch, seq, hidden] states per batch, the official ratio:
    s = mean_{r, c} (mean_t |h_dense[r, t, c]| / mean_t |h_pruned[r, t, c]|), r = sequence, c = channel."""
    return ratio_from_stats([channel_stat(h) for h in dense], [channel_stat(h) for h in pruned], "channel_mean_abs")


def magnitude_ratio(dense: list[torch.Tensor], pruned: list[torch.Tensor]) -> tuple[float, float, float]:
    """(s, dense mean norm, pruned mean norm): s = mean_t ||h_dense,t|| / mean_t ||h_pruned,t||, in float64."""
    return ratio_from_stats([token_stat(h) for h in dense], [token_stat(h) for h in pruned], "token_l2")


def selects_itself(metric: LayerMetric) -> bool:
    """Metrics whose selection is not a ranking of per-layer scores (they override `select`: a contiguous span in
    one decision, or their own screen-then-verify loop): Prune&Comp selects with them once, on the dense model, and
    compensates once per gap (`procedure: span`), since its loop can only take a ranking's lowest layer."""
    return type(metric).select is not LayerMetric.select


@dataclass(eq=False)
class PruneAndComp(InterleavedCompensation):
    """Prune&Comp: iterative layer pruning with magnitude compensation folded into the remaining weights.

    Paper: "Prune&Comp: Free Lunch for Layer-Pruned LLMs via Iterative Pruning with Magnitude Compensation",
    Xinrui Chen, Hongxing Zhang, Fanyi Zeng, Yongxian Wei, Yizhi Wang, Xitong Ling, Guanghao Li, Chun Yuan,
    arXiv 2507.18212 (AAAI 2026), https://arxiv.org/abs/2507.18212
    Official code: https://github.com/chenxinrui-tsinghua/PruneAndComp (`magcomp.py`: `get_scale_params`,
    `fuse_scale`; the loop in `CosSim_BI.py`, `Taylor+.py`, `PPL.py`, `mag+.py`; one span in `CosSim_CL.py`).

    Removing a layer leaves a magnitude gap: the next layer receives the removed layer's input instead of its
    (larger) output. Prune&Comp estimates the gap on calibration data and closes it by rescaling weights offline.

    Method (`iterative=true`, the default and the official procedure; `prune_iteratively`): for k = 1..n
      1. score the current model (already pruned and compensated k-1 times) with the run's metric and take its
         lowest-scoring prunable layer, at current position p (the metric's own `iterative` flag is not consulted:
         the loop always rescores, as the official scripts do for every metric);
      2. on that same current model (the reference is the model before this removal, not the original dense
         model), measure x = input of layer p (what the next layer will receive once p is gone) and y = output of
         layer p (what it receives now), and
             s = mean over sequences r and channels c of  mean_t |y[r, t, c]| / mean_t |x[r, t, c]|
         (`ratio=channel_mean_abs`, as `magcomp.get_scale_params`: per-channel mean |.| over a sequence's tokens,
         the ratio averaged over the calibration sequences, then over channels; one scalar);
      3. remove layer p (`surgery.remove_layers`), then fold s into the input embedding and the residual writers
         (`self_attn.o_proj`, `mlp.down_proj`; weights and biases) of every layer before p (`scale_prefix`, as
         `magcomp.fuse_scale`). Exact up to the pre-norms' epsilon: every writer reads its input through a
         scale-invariant norm, so the residual stream up to p is multiplied by s and nothing else changes.
    Decisions are recorded with original layer indices. Span metrics (one contiguous block in one decision, e.g.
    `streamline`, `angular`; the official `CosSim_CL.py`) are scored once on the dense model and compensated once
    at their gap (`procedure: span`).

    `iterative=false` (the paper's "+Magnitude Compensation" one-shot ablation row; `apply`): the metric's
    selection is removed at once, then each contiguous gap [a, b] of removed original layers is compensated in
    depth order with s from the dense output of layer b (dense model, captured before any change) and the pruned
    state at the gap (the model with the earlier gaps already compensated); the scales of earlier gaps multiply in.
    `ratio=token_l2` (not in the official code; the earlier default here): s = mean_t ||y_t|| / mean_t ||x_t||, a
    ratio of mean token L2 norms over all calibration tokens.

    Differences from the official code that are not options: the dense reference is the removed layer's output, the
    same tensor as the next layer's input that `get_scale_params` hooks, but defined for the last layer too (there the
    official code has no layer j to hook); reductions run in float64 (the official model runs in float16); biases of
    the writers are scaled too (Llama has none); the run's calibration set serves the metric and the scale (the
    official scripts use 128-256 WikiText-2 sequences of 2048 tokens for the scale, some a separate set for scoring).

    Tied embeddings: the embedding matrix is scaled, so a tied LM head is first given its own copy
    (`untie_embeddings`, reported as `untied_embeddings` and `extra_parameters`; vocab x hidden parameters, e.g. +28M on
    SmolLM2-135M; the official `fuse_scale` scales the shared matrix in place, i.e. the LM head too).

    Options:
        iterative: True (official): the runner must call `prune_iteratively` (`interleaved` is True) instead of
            select -> remove_layers -> apply; False: the one-shot ablation, through `apply`.
        ratio: `channel_mean_abs` (official) or `token_l2`.

    Supports pre-norm layers with `self_attn.o_proj` and `mlp.down_proj` (Llama, Mistral, Qwen2/3, Phi-3) and
    sandwich layers (Gemma 2/3: the scale goes into the gains of the norms after attention and MLP, exactly as the
    official fold scales the writers, which have no norm after them in the models it supports); other layouts are
    refused in `check_compatible`.
    """

    name = "prune_and_comp"

    iterative: bool = option()
    ratio: str = option(choices=RATIOS)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.interleaved = self.iterative

    def check_compatible(self, model: nn.Module, removed: list[int]) -> None:
        layer = surgery.get_decoder_layers(model)[0]
        missing = [p for p in RESIDUAL_WRITERS if not isinstance(get_path(layer, p), nn.Linear)]
        if missing:
            raise IncompatibleCompensationError(
                f"prune_and_comp folds its scale into the residual writers {list(RESIDUAL_WRITERS)} and the input "
                f"embedding; {type(layer).__name__} has no {missing}; use compensation=none")
        norms = [n for n in POST_SUBLAYER_NORMS if hasattr(layer, n)]
        if norms and not is_sandwich(layer):
            raise IncompatibleCompensationError(
                f"prune_and_comp scales the residual writers, but {type(layer).__name__} normalises their outputs "
                f"({norms}) before the residual add without normalising every sublayer's input, so no fold scales "
                f"the residual stream exactly; use compensation=none")
        if model.get_input_embeddings() is None:
            raise IncompatibleCompensationError(f"{type(model).__name__} exposes no input embedding to scale")

    def selection_kind(self, metric: LayerMetric) -> SelectionKind:
        """What the interleaved selection is, for the selection cache: a greedy order for ranking metrics (the first
        k decisions of a longer run are the run for k, and `prune_iteratively(resume=...)` replays cached
        decisions), else one selection for exactly n (a span)."""
        return SelectionKind.SPAN if selects_itself(metric) else SelectionKind.GREEDY

    # ------------------------------------------------------------------------------------------------- one-shot

    def apply(self, model: nn.Module, removed: Mapping[int, nn.Module], calib: Calibration,
              cost: Cost) -> dict[str, Any]:
        """One-shot compensation of an already removed selection (`iterative=false`; also the span case)."""
        report = self._one_shot(model, removed, calib)
        if self.interleaved and removed:
            report["note"] = ("iterative=true, but the layers were selected and removed before compensation: this is "
                              "the one-shot procedure; the official loop is PruneAndComp.prune_iteratively")
        return report

    def _one_shot(self, model: nn.Module, removed: Mapping[int, nn.Module], calib: Calibration) -> dict[str, Any]:
        if not removed:
            return {"procedure": "one_shot", "ratio": self.ratio, "sites": [], "note": "nothing removed"}
        self.check_compatible(model, sorted(removed))
        stat = STATS[self.ratio]
        original_count = surgery.num_layers(model) + len(removed)
        kept = surgery.kept_indices(original_count, list(removed))
        gaps = surgery.contiguous_gaps(removed)
        with surgery.dense_view(model, removed):  # dense references first: the folds change shared kept layers
            ends = sorted({b for _, b in gaps})
            dense = {b: outs for b, (_, outs) in layer_io_stats(model, calib, ends, stat).items()}
        dense_final = dense_final_states(model, removed, calib)
        error_before = final_rel_error(model, calib, dense_final)

        extra = untie_embeddings(model) if embeddings_tied(model) else 0
        sites = []
        for a, b in gaps:
            upto = sum(k < a for k in kept) - 1  # last kept position before the gap; -1 = the embedding
            ins, outs = layer_io_stats(model, calib, [max(upto, 0)], stat)[max(upto, 0)]
            s, dense_mag, pruned_mag = ratio_from_stats(dense[b], ins if upto < 0 else outs, self.ratio)
            scale_prefix(model, upto, s)
            sites.append({"gap": [a, b], "kept_position_before": upto,
                          "original_layer_before": kept[upto] if upto >= 0 else None,
                          "scale": s, "dense_magnitude": dense_mag, "pruned_magnitude": pruned_mag})
        return {
            "procedure": "one_shot",
            "ratio": self.ratio,
            "sites": sites,
            "untied_embeddings": extra > 0,
            "extra_parameters": extra,
            "final_rel_error_before": error_before,
            "final_rel_error_after": final_rel_error(model, calib, dense_final),
        }

    # ------------------------------------------------------------------------------------------------ iterative

    def prune_iteratively(self, model: nn.Module, metric: LayerMetric, calib: Calibration, num_prune: int,
                          cost: Cost, resume: Selection | None = None, on_decision: DecisionCallback | None = None,
                          ) -> tuple[Selection, dict[str, Any]]:
        """The official Prune&Comp loop: n times (score the current model with `metric`, remove its lowest layer,
        fold the magnitude compensation). Changes `model` in place (layers removed through `surgery`, scales folded);
        returns the selection (one `Decision` per removal, scores and removals in original layer indices) and the
        compensation report.

        `resume`: an earlier selection of this same procedure (metric, compensation, calibration); its first
        decisions are replayed (removal and fold redone, no rescoring) and the loop continues from there.
        `on_decision`: called with each new decision as soon as it is made; a progress bar counts the steps."""
        original_count = surgery.num_layers(model)
        metric.check_budget(original_count, num_prune)
        self.check_compatible(model, [])
        if selects_itself(metric):  # one selection, compensated once per gap (span metrics: the official CosSim_CL.py)
            selection = metric.select(model, calib, num_prune, cost, on_decision=on_decision,
                                      **({"resume": resume} if resume else {}))
            report = self._one_shot(model, surgery.remove_layers(model, selection.removed), calib)
            return selection, {**report, "procedure": "span"}

        replay = list(resume.decisions[:num_prune]) if resume is not None else []
        if any(len(d.removed) != 1 for d in replay):
            raise ValueError("resume: an interleaved Prune&Comp selection has one removed layer per decision; got "
                             f"{[d.removed for d in replay]}")
        stat = STATS[self.ratio]
        last = original_count - 1
        dense_final = layer_states(model, calib, [last])[last]  # the original dense model, for the report only
        extra = untie_embeddings(model) if embeddings_tied(model) else 0
        kept = list(range(original_count))  # kept[current position] = original layer index
        decisions: list[Decision] = []
        sites: list[dict[str, Any]] = []
        bar = progress(range(num_prune), desc="prune_and_comp: prune + compensate", unit="layer")
        for step in bar:
            if step < len(replay):
                decision = replay[step]  # scored earlier on this same pruned and compensated model
            else:
                decision = metric.decide(model, calib, cost, step, kept, original_count, 1)
                if on_decision is not None:
                    on_decision(decision)
            (orig,) = decision.removed
            pos = kept.index(orig)
            t0 = time.perf_counter()
            # Reference = the current model before this removal: the removed layer's output (what the next layer
            # receives now) vs its input (what the next layer receives once it is gone).
            ins, outs = layer_io_stats(model, calib, [pos], stat)[pos]
            s, dense_mag, pruned_mag = ratio_from_stats(outs, ins, self.ratio)
            surgery.remove_layers(model, [pos])
            scale_prefix(model, pos - 1, s)
            del kept[pos]
            decisions.append(decision)
            sites.append({"step": step, "original_layer": orig, "position": pos, "kept_position_before": pos - 1,
                          "original_layer_before": kept[pos - 1] if pos > 0 else None, "scale": s,
                          "dense_magnitude": dense_mag, "pruned_magnitude": pruned_mag,
                          "seconds": time.perf_counter() - t0, "replayed": step < len(replay)})
        selection = Selection(removed=[d.removed[0] for d in decisions], decisions=decisions)
        return selection, {
            "procedure": "iterative",
            "ratio": self.ratio,
            "sites": sites,
            "untied_embeddings": extra > 0,
            "extra_parameters": extra,
            "compensation_seconds": sum(site["seconds"] for site in sites),
            "final_rel_error_after": final_rel_error(model, calib, dense_final),
        }
