"""GradMAP as implemented here, stage 2: projection compensation (our reading; the paper's formulas are not public).

GradMAP: Faster Layer Pruning with Gradient Metric and Projection Compensation (arXiv 2602.14649,
https://arxiv.org/abs/2602.14649). After removal, the pruned model's hidden states drift from the dense ones.
The paper's abstract: compensation finds where the drift is largest and corrects it in one step with a projection
matrix. Here a square projection is folded into an existing weight (no extra parameters) at every kept layer before
a gap by default (`sites=before_gap`; the literal one-site reading is `sites=largest`), with a ridge pull toward the
identity and a guard, all chosen on validation text.

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
  dense targets are computed once, before any fold, from the removed layers kept in memory (their dense view).
* Where a norm follows the MLP (Gemma 2/3), `post_norm` says what is folded instead (gradmap/post_norm.py: an
  exact per-channel scale in the norm's gain, and/or an approximate map fitted through the norm); `refuse` refuses
  such models. Layers without that norm take the path above, whatever `post_norm` says.
* Guard (`guard=final_error`, our addition): a fit lowers the error at its own site by construction, but the layers
  after it can amplify what it changed (seen on SmolLM2 after an 11-layer gap: site error 0.95 -> 0.25, final-layer
  error 0.68 -> 1.61, perplexity 244 -> 2220). So after each fold the final-layer calibration error is measured
  and the fold is undone if that error rose. The check rides on the forward pass that fits the next site (and the
  closing error pass for the last one), so it costs an extra pass only when a fold is undone. `guard=none` keeps
  every fold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradmap import surgery
from gradmap.capture import FinalErrorSums, dense_states, layer_outputs
from gradmap.compensation import Compensation, IncompatibleCompensationError
from gradmap.data import Calibration
from gradmap.models import model_device
from gradmap.module_paths import OUTPUT_PROJECTIONS, POST_MLP_NORMS, first_path
from gradmap.post_norm import (
    POST_NORM_MODES,
    error_split,
    fit_direction_from,
    fit_scale_from,
    gain_offset,
    modules_of,
    norm_gain,
    post_mlp_norm,
    post_norm_sums,
    scale_gain,
)
from gradmap.progress import progress
from gradmap.schema import option
from gradmap.stages import Cost

SITE_RULES = ("largest", "largest_gap", "topk", "before_gap")
SHIFT_MEASURES = ("mean", "rms")
GUARDS = ("final_error", "none")


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


def identity_distance(a: torch.Tensor) -> float:
    """||A - I||_F / sqrt(d): how far a fitted map is from changing nothing."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return float(torch.linalg.matrix_norm(a - eye) / a.shape[0] ** 0.5)


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
    found = first_path(layer, OUTPUT_PROJECTIONS)
    if found is None:
        raise IncompatibleCompensationError(
            f"projection compensation cannot find the MLP output projection of {type(layer).__name__}; "
            f"looked for: {list(OUTPUT_PROJECTIONS)}")
    return found[1]


class _Guard:
    """`guard=final_error`: the last fold waits here until the final-layer error with it is known, then is kept (the
    error becomes the one to beat) or undone bit-exactly."""

    def __init__(self, final_error: float):
        self.final_error = final_error
        self.pending: tuple[dict[str, Any], list[nn.Module], list[dict[str, torch.Tensor]]] | None = None

    def hold(self, report: dict[str, Any], modules: list[nn.Module], originals: list[dict[str, torch.Tensor]]) -> None:
        self.pending = (report, modules, originals)

    def settle(self, err: float) -> bool:
        """Keep or undo the pending fold given the final error measured with it; True if undone."""
        report, modules, originals = self.pending
        self.pending = None
        report["final_rel_error_with_fold"] = err
        if err > self.final_error:
            for module, original in zip(modules, originals):
                module.load_state_dict(original)  # bit-exact original weights
            report["kept"] = False
            return True
        self.final_error = err
        return False


class _NormalEquations(FinalErrorSums):
    """Y^T Y and Y^T T at kept layer `site`, summed in float64 over calibration batches, and the relative squared
    error at the last kept layer on the same pass (hooks on the output projection and the layers)."""

    def __init__(self, site: int, last: int, targets: list[torch.Tensor], final_targets: list[torch.Tensor]):
        super().__init__(last, final_targets)
        self.site, self.targets = site, targets
        self.yty: torch.Tensor | None = None
        self.ytt: torch.Tensor | None = None
        self.y: torch.Tensor | None = None  # the output projection's output in this batch

    def on_projection(self, _module, _args, out: torch.Tensor) -> None:
        self.y = out.detach()

    def on_layer(self, pos: int, _inp: torch.Tensor, out: torch.Tensor) -> None:
        b = self.batch
        if pos == self.site:
            y = self.y.double().flatten(0, -2)
            r = out.detach().double().flatten(0, -2) - y
            t = self.targets[b].double().flatten(0, -2).to(y.device) - r
            self.yty = y.T @ y if self.yty is None else self.yty + y.T @ y
            self.ytt = y.T @ t if self.ytt is None else self.ytt + y.T @ t
        if pos == self.last:
            self.add_final(b, out)


@dataclass(eq=False)
class ProjectionCompensation(Compensation):
    """GradMAP projection compensation (arXiv 2602.14649); see the module docstring. Defaults: conf/compensation/
    projection.yaml (chosen by measurement, README).

    Options:
        sites: `largest` | `largest_gap` | `topk` | `before_gap`.
        top_k: number of sites for `topk`.
        shift: `mean` | `rms`, how the drift at each kept layer is measured.
        alpha: ridge strength toward the identity, relative to tr(Y^T Y)/d.
        guard: `final_error` (undo a fold that raises the final-layer calibration error) | `none`.
        post_norm: where a norm follows the MLP: `refuse` | `norm_scale` (exact) | `direction_approx` (default,
            chosen on validation: README) | `direction_approx_norm_scale` (gradmap/post_norm.py); no effect on other
            layers.
    """

    name = "projection"

    sites: str = option(choices=SITE_RULES)
    top_k: int = option(ge=1)
    shift: str = option(choices=SHIFT_MEASURES)
    alpha: float = option(ge=0)
    guard: str = option(choices=GUARDS)
    post_norm: str = option(choices=POST_NORM_MODES)

    def check_compatible(self, model: nn.Module, removed: list[int]) -> None:
        layer = surgery.get_decoder_layers(model)[0]
        output_projection(layer)
        norm = post_mlp_norm(layer)
        if norm is not None and self.post_norm == "refuse":
            raise IncompatibleCompensationError(
                f"{self.name} folds into the MLP output projection, but {type(layer).__name__} normalises the MLP "
                f"output after it ({first_path(layer, POST_MLP_NORMS)[0]}), so that fold would not be exact; set "
                f"compensation.post_norm to one of "
                f"{[m for m in POST_NORM_MODES if m != 'refuse']} (gradmap/post_norm.py), or use compensation=none")
        if norm is not None and not isinstance(getattr(norm, "weight", None), torch.Tensor):
            raise IncompatibleCompensationError(f"{type(norm).__name__} after the MLP has no weight to fold into")

    # -- passes over the calibration data --------------------------------------------------------------------

    @torch.no_grad()
    def _drift(self, model, removed, calib, aligned: Sequence[int]) -> list[dict[str, Any]]:
        """Streaming drift statistics of every kept layer vs its aligned dense state (one batch in memory)."""
        stats = [{"n": 0, "diff_sum": 0.0, "dense_norm_sum": 0.0, "diff_sq_sum": 0.0, "dense_sq_sum": 0.0}
                 for _ in aligned]
        for batch in calib.batches(model_device(model)):
            with surgery.dense_view(model, removed):
                dense = layer_outputs(model, batch, sorted(set(aligned)))  # model dtype: memory
            pruned = layer_outputs(model, batch, range(len(aligned)))
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
    def _errors(self, model, calib, positions: Sequence[int], targets: Mapping[int, list[torch.Tensor]],
                aligned: Sequence[int]) -> dict[int, float]:
        """Relative squared error ||h_p - h_d||^2 / ||h_d||^2 at the given kept positions."""
        num = {j: 0.0 for j in positions}
        den = {j: 0.0 for j in positions}
        for b, batch in enumerate(calib.batches(model_device(model))):
            out = layer_outputs(model, batch, positions)
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
        # Dense outputs per calibration batch (sites x tokens x d, CPU), taken before any fold so later sites still
        # see the true dense model.
        targets = dense_states(model, removed, calib, [aligned[j] for j in watch])
        before = {j: stats[j]["diff_sq_sum"] / max(stats[j]["dense_sq_sum"], 1e-30) for j in watch}

        layers = surgery.get_decoder_layers(model)
        site_reports: list[dict[str, Any]] = []
        final_targets = targets[aligned[last]]
        guard = _Guard(before[last])
        for j in progress(sites, desc=f"{self.name}: fitting sites", unit="site"):
            proj, norm = output_projection(layers[j]), post_mlp_norm(layers[j])
            # The pass that fits site j also measures the final error with the previous fold: the guard is free.
            stats, err = self._site_pass(model, calib, j, proj, norm, targets[aligned[j]], last, final_targets)
            if guard.pending is not None and guard.settle(err):  # undone: that pass saw the wrong model
                stats, _ = self._site_pass(model, calib, j, proj, norm, targets[aligned[j]], last, final_targets)
            modules = [proj] if norm is None else list(modules_of(self.post_norm, proj, norm))
            original = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]
            report = {"kept_position": j, "original_layer": kept[j], "aligned_dense_layer": aligned[j],
                      "shift": shifts[j], "rel_error_before": before[j]}
            if norm is None:
                a = fit_projection(*stats, self.alpha)
                fold_projection(proj, a)
                report["identity_distance"] = identity_distance(a)
            else:
                report.update(self._fold_post_norm(model, calib, j, proj, norm, stats, targets[aligned[j]], last,
                                                   final_targets))
            report["kept"] = True
            site_reports.append(report)
            if self.guard == "final_error":
                guard.hold(site_reports[-1], modules, original)
        after = self._errors(model, calib, watch, targets, aligned)
        if guard.pending is not None and guard.settle(after[last]):
            after = self._errors(model, calib, watch, targets, aligned)
        for rep in site_reports:
            rep["rel_error_after"] = after[rep["kept_position"]]
        return {
            "sites": site_reports,
            "shift_per_kept_layer": {str(k): s for k, s in zip(kept, shifts)},
            "final_rel_error_before": before[last],
            "final_rel_error_after": after[last],
            "rule": self.sites, "shift_measure": self.shift, "alpha": self.alpha, "guard": self.guard,
            **({"post_norm": self.post_norm} if any("post_norm" in r for r in site_reports) else {}),
            "sites_undone": [rep["original_layer"] for rep in site_reports if not rep["kept"]],
        }

    def _site_pass(self, model, calib, j, proj, norm, targets, last, final_targets) -> tuple[Any, float]:
        """(the fit's statistics at kept layer j, the final-layer error of the model as it stands), in one pass."""
        if norm is None:
            yty, ytt, err = self._normal_equations(model, calib, j, proj, targets, last, final_targets)
            return (yty, ytt), err
        sums = post_norm_sums(model, calib, j, proj, norm, targets, last, final_targets,
                              direction=self.post_norm != "norm_scale")
        return sums, sums.final_error

    def _fold_post_norm(self, model, calib, j, proj, norm, sums, targets, last, final_targets) -> dict[str, Any]:
        """Fit and fold at a site whose MLP output passes through a norm (`post_norm`, gradmap/post_norm.py); the
        report says how the site's error splits (magnitude / direction) and what each fit predicted."""
        offset = gain_offset(norm)
        out: dict[str, Any] = {"post_norm": self.post_norm, **error_split(sums)}
        if self.post_norm.startswith("direction_approx"):
            a, out["direction_predicted_rel_error"] = fit_direction_from(sums, norm_gain(norm, offset), self.alpha)
            fold_projection(proj, a)
            out["identity_distance"] = identity_distance(a)
            if self.post_norm.endswith("norm_scale"):  # the scale is refitted on the corrected outputs
                sums = post_norm_sums(model, calib, j, proj, norm, targets, last, final_targets, direction=False)
                out["rel_error_after_direction"] = error_split(sums)["rel_error_at_fit"]
        if self.post_norm.endswith("norm_scale"):
            s, out["scale_predicted_rel_error"] = fit_scale_from(sums, self.alpha)
            scale_gain(norm, s, offset)
            out["scale_min_max"] = [float(s.min()), float(s.max())]
        return out

    @torch.no_grad()
    def _normal_equations(self, model, calib, j, proj, targets: list[torch.Tensor], last: int,
                          final_targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Accumulate Y^T Y and Y^T T at kept layer j in float64, streaming over calibration batches; the same pass
        returns the relative squared error at the last kept layer of the model as it stands."""
        sums = _NormalEquations(j, last, targets, final_targets)
        sums.stream(model, calib, {j, last}, [proj.register_forward_hook(sums.on_projection)])
        return sums.yty, sums.ytt, sums.final_error
