"""GradMAP stage 2: projection compensation.

GradMAP: Faster Layer Pruning with Gradient Metric and Projection Compensation (arXiv 2602.14649,
https://arxiv.org/abs/2602.14649). After removal, the pruned model's hidden states drift from the dense ones.
Compensation finds where the drift is largest and corrects it in one step with a square projection matrix folded
into an existing weight, so the pruned model has no extra parameters.

Our interpretation (the paper's exact formulas are not public):

* Alignment. The state after kept layer j (original index k_j) is compared with the dense state at the same point
  of the computation: the dense input of the next kept layer, i.e. the output of original layer k_{j+1} - 1 (for the
  last kept layer, the dense output of the last layer). For the layer just before a gap, the target is the dense
  state *after* the gap.
* Shift. `shift=mean`: ||E_t[h_p - h_d]|| / E_t||h_d||, the relative shift of the mean hidden state;
  `shift=rms`: sqrt(E||h_p - h_d||^2 / E||h_d||^2).
* Sites (`sites`): `largest` (the one kept layer with the largest shift; in practice the last layer, where drift
  has accumulated), `largest_gap` (the one kept layer right before a gap with the largest shift), `topk` (the k
  largest), `before_gap` (every kept layer right before a gap).
* Fit. At a site the layer output is h = r + y, with y the MLP's output projection (`down_proj`) and r the residual.
  A square A minimises ||Y A - T||^2 + lam ||A - I||^2 with T = H_dense - R (what the MLP should have output):
  A = (Y^T Y + lam I)^-1 (Y^T T + lam I), in float64; lam = alpha * tr(Y^T Y) / d keeps alpha scale-free, and
  alpha -> inf gives A = I (no change). Folding: y' = A^T y, so W_down <- A^T W_down (and the bias likewise).
* Multiple sites are fitted in depth order, each on the model with the earlier corrections already folded in; the
  dense targets are computed once, before any fold, from the removed layers kept in memory (`surgery.dense_view`).
* Guard (`guard=final_error`, our addition): a fit lowers the error at its own site by construction, but the layers
  after it can amplify what it changed (seen on SmolLM2 after an 11-layer gap: site error 0.95 -> 0.25, final-layer
  error 0.68 -> 1.61, perplexity 244 -> 2220). So after each fold the final-layer calibration error is measured
  and the fold is undone if that error rose. The check rides on the forward pass that fits the next site (and the
  closing error pass for the last one), so it costs an extra pass only when a fold is undone. `guard=none` keeps
  every fold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradmap import surgery
from gradmap.capture import layer_io
from gradmap.compensation import Compensation, IncompatibleCompensationError
from gradmap.metric import Calibration, Cost, progress
from gradmap.models import model_device
from gradmap.validation import ConfigError

SITE_RULES = ("largest", "largest_gap", "topk", "before_gap")
SHIFT_MEASURES = ("mean", "rms")
GUARDS = ("final_error", "none")
# Output projection of the MLP, per architecture family; folding into it is exact when nothing follows it but
# the residual add.
OUTPUT_PROJECTIONS = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "fc2")
# A norm between the MLP and the residual add makes folding inexact (e.g. Gemma's post_feedforward_layernorm).
POST_MLP_NORMS = ("post_feedforward_layernorm",)


# ---------------------------------------------------------------- pure tensor maths


def fit_projection(yty: torch.Tensor, ytt: torch.Tensor, alpha: float) -> torch.Tensor:
    """Closed-form ridge solution A = (Y^T Y + lam I)^-1 (Y^T T + lam I), lam = alpha * tr(Y^T Y) / d, in float64.

    Args: yty = Y^T Y and ytt = Y^T T ([d, d] sums over calibration tokens). alpha = 0 is plain least squares.
    """
    yty, ytt = yty.double(), ytt.double()
    d = yty.shape[0]
    eye = torch.eye(d, dtype=torch.float64, device=yty.device)
    lam = alpha * torch.trace(yty) / d
    return torch.linalg.solve(yty + lam * eye, ytt + lam * eye)


def projected_weight(weight: torch.Tensor, a: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """W' with W' x = A^T (W x); `transposed` for GPT-2's Conv1D, whose weight is stored as [in, out]."""
    w = weight.double()
    out = w @ a.double() if transposed else a.double().T @ w
    return out.to(weight.dtype)


def fold_projection(linear: nn.Module, a: torch.Tensor) -> None:
    """Fold y -> A^T y into a Linear (or Conv1D) in place, bias included."""
    transposed = type(linear).__name__ == "Conv1D"
    with torch.no_grad():
        linear.weight.copy_(projected_weight(linear.weight, a, transposed))
        if getattr(linear, "bias", None) is not None:
            linear.bias.copy_((a.double().T @ linear.bias.double()).to(linear.bias.dtype))


def shift_value(measure: str, stats: Mapping[str, torch.Tensor | float]) -> float:
    n = stats["n"]
    if measure == "mean":
        return float(torch.linalg.vector_norm(stats["diff_sum"] / n) / max(stats["dense_norm_sum"] / n, 1e-30))
    if measure == "rms":
        return float((stats["diff_sq_sum"] / max(stats["dense_sq_sum"], 1e-30)) ** 0.5)
    raise ValueError(f"shift={measure!r} is not valid; allowed: {list(SHIFT_MEASURES)}")


def choose_sites(rule: str, shifts: Sequence[float], kept: Sequence[int], aligned: Sequence[int],
                 k: int = 1) -> list[int]:
    """Kept-layer positions to correct, in depth order. `kept`: original indices of the kept layers;
    `aligned`: the original layer whose dense output each kept layer's output is compared with."""
    if rule == "largest":
        return [max(range(len(shifts)), key=lambda j: (shifts[j], j))]
    if rule == "topk":
        return sorted(sorted(range(len(shifts)), key=lambda j: (-shifts[j], -j))[:k])
    gaps = [j for j in range(len(kept)) if aligned[j] != kept[j]]
    if rule == "before_gap":
        return gaps
    if rule == "largest_gap":
        return [max(gaps, key=lambda j: (shifts[j], j))] if gaps else []
    raise ValueError(f"sites={rule!r} is not valid; allowed: {list(SITE_RULES)}")


# ---------------------------------------------------------------- module helpers


def output_projection(layer: nn.Module) -> nn.Module:
    for path in OUTPUT_PROJECTIONS:
        module = layer
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if module is not None:
            return module
    raise IncompatibleCompensationError(
        f"projection compensation cannot find the MLP output projection of {type(layer).__name__}; "
        f"looked for: {list(OUTPUT_PROJECTIONS)}")


class ProjectionCompensation(Compensation):
    """GradMAP projection compensation (arXiv 2602.14649); see the module docstring.

    Args:
        sites: `largest` | `largest_gap` | `topk` | `before_gap`; default chosen by measurement (README).
        top_k: number of sites for `topk`.
        shift: `mean` | `rms`, how the drift at each kept layer is measured.
        alpha: ridge strength toward the identity, relative to tr(Y^T Y)/d.
        guard: `final_error` (undo a fold that raises the final-layer calibration error) | `none`.
    """

    name = "projection"

    def __init__(self, sites: str = "before_gap", top_k: int = 2, shift: str = "mean", alpha: float = 3.0,
                 guard: str = "final_error"):
        if guard not in GUARDS:
            raise ConfigError("guard", guard, list(GUARDS))
        if sites not in SITE_RULES:
            raise ConfigError("sites", sites, list(SITE_RULES))
        if shift not in SHIFT_MEASURES:
            raise ConfigError("shift", shift, list(SHIFT_MEASURES))
        if not alpha >= 0:
            raise ConfigError("alpha", alpha, "a number >= 0")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError("top_k", top_k, "an integer >= 1")
        self.sites, self.top_k, self.shift, self.alpha, self.guard = sites, top_k, shift, alpha, guard

    def check_compatible(self, model: nn.Module, removed: list[int]) -> None:
        layer = surgery.get_decoder_layers(model)[0]
        output_projection(layer)
        for name in POST_MLP_NORMS:
            if hasattr(layer, name):
                raise IncompatibleCompensationError(
                    f"projection compensation folds into the MLP output projection, but {type(layer).__name__} "
                    f"applies `{name}` after it, so folding would not be exact; use compensation=none")

    # -- passes over the calibration data --------------------------------------------------------------------

    @torch.no_grad()
    def _forward_capture(self, model, batch, positions: Sequence[int]) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        with layer_io(model, lambda p, i, o: out.__setitem__(p, o.detach()), positions):  # model dtype: memory
            model(input_ids=batch, use_cache=False)
        return out

    @torch.no_grad()
    def _drift(self, model, removed, calib, aligned: Sequence[int]) -> list[dict[str, Any]]:
        """Streaming drift statistics of every kept layer vs its aligned dense state (one batch in memory)."""
        stats = [{"n": 0, "diff_sum": 0.0, "dense_norm_sum": 0.0, "diff_sq_sum": 0.0, "dense_sq_sum": 0.0}
                 for _ in aligned]
        for batch in calib.batches(model_device(model)):
            with surgery.dense_view(model, removed):
                dense = self._forward_capture(model, batch, sorted(set(aligned)))
            pruned = self._forward_capture(model, batch, range(len(aligned)))
            for j, st in enumerate(stats):
                hd = dense[aligned[j]].double().flatten(0, -2)
                diff = pruned[j].double().flatten(0, -2) - hd
                st["n"] += diff.shape[0]
                st["diff_sum"] = st["diff_sum"] + diff.sum(0)
                st["dense_norm_sum"] += float(hd.norm(dim=-1).sum())
                st["diff_sq_sum"] += float(diff.pow(2).sum())
                st["dense_sq_sum"] += float(hd.pow(2).sum())
        return stats

    @torch.no_grad()
    def _dense_targets(self, model, removed, calib, targets: Sequence[int]) -> dict[int, list[torch.Tensor]]:
        """Dense outputs of the given original layers per calibration batch, on the CPU (sites x tokens x d),
        taken before any fold so later sites still see the true dense model."""
        states: dict[int, list[torch.Tensor]] = {t: [] for t in targets}
        with surgery.dense_view(model, removed):
            for batch in calib.batches(model_device(model)):
                for t, h in self._forward_capture(model, batch, sorted(states)).items():
                    states[t].append(h.float().cpu())
        return states

    @torch.no_grad()
    def _errors(self, model, calib, positions: Sequence[int], targets: Mapping[int, list[torch.Tensor]],
                aligned: Sequence[int]) -> dict[int, float]:
        """Relative squared error ||h_p - h_d||^2 / ||h_d||^2 at the given kept positions."""
        num = {j: 0.0 for j in positions}
        den = {j: 0.0 for j in positions}
        for b, batch in enumerate(calib.batches(model_device(model))):
            out = self._forward_capture(model, batch, positions)
            for j in positions:
                hd = targets[aligned[j]][b].double().to(out[j].device)
                num[j] += float((out[j].double() - hd).pow(2).sum())
                den[j] += float(hd.pow(2).sum())
        return {j: num[j] / max(den[j], 1e-30) for j in positions}

    def apply(self, model: nn.Module, removed: Mapping[int, nn.Module], calib: Calibration,
              cost: Cost) -> dict[str, Any]:
        if not removed:
            return {"sites": [], "note": "nothing removed"}
        self.check_compatible(model, sorted(removed))
        kept, aligned = surgery.aligned_dense_layers(surgery.num_layers(model) + len(removed), list(removed))
        last = len(kept) - 1

        stats = self._drift(model, removed, calib, aligned)
        shifts = [shift_value(self.shift, st) for st in stats]
        sites = choose_sites(self.sites, shifts, kept, aligned, self.top_k)
        watch = sorted(set(sites) | {last})
        targets = self._dense_targets(model, removed, calib, [aligned[j] for j in watch])
        before = {j: stats[j]["diff_sq_sum"] / max(stats[j]["dense_sq_sum"], 1e-30) for j in watch}

        layers = surgery.get_decoder_layers(model)
        site_reports: list[dict[str, Any]] = []
        final_targets = targets[aligned[last]]
        state = {"final_error": before[last], "pending": None}  # pending: the last fold, awaiting the guard's check

        def settle(err: float) -> bool:
            """Keep or undo the pending fold given the final error measured with it; True if undone."""
            rep, proj, original = state["pending"]
            state["pending"] = None
            rep["final_rel_error_with_fold"] = err
            if err > state["final_error"]:
                proj.load_state_dict(original)  # bit-exact original weights
                rep["kept"] = False
                return True
            state["final_error"] = err
            return False

        for j in progress(sites, desc=f"{self.name}: fitting sites", unit="site"):
            proj = output_projection(layers[j])
            # The pass that fits site j also measures the final error with the previous fold: the guard is free.
            yty, ytt, err = self._normal_equations(model, calib, j, proj, targets[aligned[j]], last, final_targets)
            if state["pending"] is not None and settle(err):  # undone: that pass saw the wrong model
                yty, ytt, _ = self._normal_equations(model, calib, j, proj, targets[aligned[j]], last, final_targets)
            a = fit_projection(yty, ytt, self.alpha)
            original = {k: v.detach().clone() for k, v in proj.state_dict().items()}
            fold_projection(proj, a)
            eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
            site_reports.append({"kept_position": j, "original_layer": kept[j], "aligned_dense_layer": aligned[j],
                                 "shift": shifts[j], "rel_error_before": before[j],
                                 "identity_distance": float(torch.linalg.matrix_norm(a - eye) / a.shape[0] ** 0.5),
                                 "kept": True})
            if self.guard == "final_error":
                state["pending"] = (site_reports[-1], proj, original)
        after = self._errors(model, calib, watch, targets, aligned)
        if state["pending"] is not None and settle(after[last]):
            after = self._errors(model, calib, watch, targets, aligned)
        for rep in site_reports:
            rep["rel_error_after"] = after[rep["kept_position"]]
        return {
            "sites": site_reports,
            "shift_per_kept_layer": {str(k): s for k, s in zip(kept, shifts)},
            "final_rel_error_before": before[last],
            "final_rel_error_after": after[last],
            "rule": self.sites, "shift_measure": self.shift, "alpha": self.alpha, "guard": self.guard,
            "sites_undone": [rep["original_layer"] for rep in site_reports if not rep["kept"]],
        }

    @torch.no_grad()
    def _normal_equations(self, model, calib, j, proj, targets: list[torch.Tensor], last: int,
                          final_targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Accumulate Y^T Y and Y^T T at kept layer j in float64, streaming over calibration batches; the same pass
        returns the relative squared error at the last kept layer of the model as it stands."""
        sums: dict[str, Any] = {"num": 0.0, "den": 0.0}
        captured: dict[str, torch.Tensor] = {}
        batch_index = {"i": 0}

        def on_layer(pos, _inp, out):
            b = batch_index["i"]
            if pos == j:
                y = captured["y"].double().flatten(0, -2)
                r = out.detach().double().flatten(0, -2) - y
                t = targets[b].double().flatten(0, -2).to(y.device) - r
                sums["yty"] = sums.get("yty", 0) + y.T @ y
                sums["ytt"] = sums.get("ytt", 0) + y.T @ t
            if pos == last:
                hd = final_targets[b].double().to(out.device)
                sums["num"] += float((out.detach().double() - hd).pow(2).sum())
                sums["den"] += float(hd.pow(2).sum())

        handle = proj.register_forward_hook(lambda _m, _a, out: captured.__setitem__("y", out.detach()))
        try:
            with layer_io(model, on_layer, sorted({j, last})):
                for batch in calib.batches(model_device(model)):
                    model(input_ids=batch, use_cache=False)
                    batch_index["i"] += 1
        finally:
            handle.remove()
        return sums["yty"], sums["ytt"], sums["num"] / max(sums["den"], 1e-30)
