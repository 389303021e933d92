"""Prune&Comp magnitude compensation (training-free, folded into existing weights)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from baselines._compensation import contiguous_gaps, dense_final_states, final_rel_error, layer_states
from gradmap import surgery
from gradmap.compensation import Compensation, IncompatibleCompensationError
from gradmap.metric import Calibration, Cost
from gradmap.projection import POST_MLP_NORMS

# The modules of a pre-norm decoder layer that write into the residual stream (attention and MLP output
# projections); together with the input embedding they are everything the residual stream is a sum of.
RESIDUAL_WRITERS = ("self_attn.o_proj", "mlp.down_proj")
# Norms applied to a sublayer's output before the residual add (Gemma 2/3) absorb any scale folded before them.
POST_SUBLAYER_NORMS = POST_MLP_NORMS + ("pre_feedforward_layernorm",)


def _submodule(layer: nn.Module, path: str) -> nn.Module | None:
    module: Any = layer
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


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
    of them scales every state up to there by s and changes nothing else."""
    emb = model.get_input_embeddings()
    emb.weight.mul_(s)
    layers = surgery.get_decoder_layers(model)
    for j in range(upto + 1):
        for path in RESIDUAL_WRITERS:
            proj = _submodule(layers[j], path)
            proj.weight.mul_(s)
            if getattr(proj, "bias", None) is not None:
                proj.bias.mul_(s)


def magnitude_ratio(dense: list[torch.Tensor], pruned: list[torch.Tensor]) -> tuple[float, float, float]:
    """(s, dense mean norm, pruned mean norm): s = mean_t ||h_dense,t|| / mean_t ||h_pruned,t||, in float64."""
    nd = torch.cat([h.double().flatten(0, -2).norm(dim=-1) for h in dense]).mean().item()
    npr = torch.cat([h.double().flatten(0, -2).norm(dim=-1) for h in pruned]).mean().item()
    return nd / max(npr, 1e-30), nd, npr


class PruneAndComp(Compensation):
    """Prune&Comp: rescale the hidden state at each gap so its magnitude matches the dense model's.

    Paper: "Prune&Comp: Free Lunch for Layer-Pruned LLMs via Iterative Pruning with Magnitude Compensation",
    Xinrui Chen, Hongxing Zhang, Fanyi Zeng, Yongxian Wei, Yizhi Wang, Xitong Ling, Guanghao Li, Chun Yuan,
    arXiv 2507.18212, https://arxiv.org/abs/2507.18212

    Method: removing layers leaves a magnitude gap in the hidden states fed to the next kept layer (the residual
    stream's norm grows with depth). The gap is estimated on calibration data and removed by rescaling weights
    offline, so there is no runtime cost. For each contiguous gap [a, b] of removed original layers, in depth order:

        s = mean_t ||h_dense,t(after layer b)|| / mean_t ||h_pruned,t(after the last kept layer before a)||

    (mean over all calibration tokens; the pruned state is measured on the model with the earlier gaps already
    compensated, which is the paper's prune-then-compensate order; the dense states are taken once, before any
    change). The state at the gap is then multiplied by s by folding s into the input embedding and the residual
    writers (`self_attn.o_proj`, `mlp.down_proj`, weights and biases) of every kept layer before the gap: exact up
    to the pre-norms' epsilon, because those norms make every layer's output homogeneous of degree one in these
    weights (`scale_prefix`). The scale of earlier gaps multiplies in, which is right: downstream of a gap only the
    ratio of the residual to later layers' outputs matters, and that ratio keeps its compensated value.

    Tied embeddings: the embedding matrix is scaled, so a tied LM head is first given its own copy
    (`untie_embeddings`, reported as `untied_embeddings` and `extra_parameters`; vocab x hidden parameters, e.g. +28M on
    SmolLM2-135M). A variant that avoids this is to scale every writer *after* the gap by 1/s instead: the final
    norm makes the logits the same (up to epsilon), but the raw hidden states then differ from the dense ones by a
    global factor; it is not implemented here.

    Not from the paper (our choices): the scalar is a ratio of mean token norms (the paper's "magnitude"); all
    tokens count, including the first token's large activations. No arguments: the method has no
    hyperparameters beyond the calibration set. Supports pre-norm layers with `self_attn.o_proj` and
    `mlp.down_proj` (Llama, Mistral, Qwen2/3, Phi-3); other layouts are refused in `check_compatible`.
    """

    name = "prune_and_comp"

    def check_compatible(self, model: nn.Module, removed: list[int]) -> None:
        layer = surgery.get_decoder_layers(model)[0]
        missing = [p for p in RESIDUAL_WRITERS if not isinstance(_submodule(layer, p), nn.Linear)]
        if missing:
            raise IncompatibleCompensationError(
                f"prune_and_comp folds its scale into the residual writers {list(RESIDUAL_WRITERS)} and the input "
                f"embedding; {type(layer).__name__} has no {missing}; use compensation=none")
        norms = [n for n in POST_SUBLAYER_NORMS if hasattr(layer, n)]
        if norms:
            raise IncompatibleCompensationError(
                f"prune_and_comp scales the residual writers, but {type(layer).__name__} normalises their outputs "
                f"({norms}) before the residual add, which would undo the scale; use compensation=none")
        if model.get_input_embeddings() is None:
            raise IncompatibleCompensationError(f"{type(model).__name__} exposes no input embedding to scale")

    def apply(self, model: nn.Module, removed: Mapping[int, nn.Module], calib: Calibration,
              cost: Cost) -> dict[str, Any]:
        if not removed:
            return {"sites": [], "note": "nothing removed"}
        self.check_compatible(model, sorted(removed))
        original_count = surgery.num_layers(model) + len(removed)
        kept = surgery.kept_indices(original_count, list(removed))
        gaps = contiguous_gaps(removed)
        with surgery.dense_view(model, removed):  # dense references first: the folds change shared kept layers
            dense = layer_states(model, calib, sorted({b for _, b in gaps}))
        dense_final = dense_final_states(model, removed, calib)
        error_before = final_rel_error(model, calib, dense_final)

        extra = untie_embeddings(model) if embeddings_tied(model) else 0
        sites = []
        for a, b in gaps:
            upto = sum(k < a for k in kept) - 1  # last kept position before the gap; -1 = the embedding
            pruned = (layer_states(model, calib, [0], inputs=True)[0] if upto < 0
                      else layer_states(model, calib, [upto])[upto])
            s, dense_norm, pruned_norm = magnitude_ratio(dense[b], pruned)
            scale_prefix(model, upto, s)
            sites.append({"gap": [a, b], "kept_position_before": upto,
                          "original_layer_before": kept[upto] if upto >= 0 else None,
                          "scale": s, "dense_mean_norm": dense_norm, "pruned_mean_norm": pruned_norm})
        return {
            "sites": sites,
            "untied_embeddings": extra > 0,
            "extra_parameters": extra,
            "final_rel_error_before": error_before,
            "final_rel_error_after": final_rel_error(model, calib, dense_final),
        }
