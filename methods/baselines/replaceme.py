"""ReplaceMe: a least-squares linear map at each gap, folded into the MLP output projection before it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from gradmap import surgery
from gradmap.data import Calibration
from gradmap.errors import ConfigError
from gradmap.stages import Cost
from methods.gradmap.projection import ProjectionCompensation


@dataclass(eq=False)
class ReplaceMe(ProjectionCompensation):
    """ReplaceMe (least-squares variant): GradMAP's projection with one site before every gap and no ridge.

    Paper: "ReplaceMe: Network Simplification via Depth Pruning and Transformer Block Linearization" (v1 title:
    "...via Depth Pruning and Linear Transformations"), Dmitriy Shopkhoev, Ammar Ali, Magauiya Zhussip, Valentin
    Malykh, Stamatios Lefkimmiatis, Nikos Komodakis, Sergey Zagoruyko, arXiv 2505.02819,
    https://arxiv.org/abs/2505.02819 (code: github.com/mts-ai/ReplaceMe).

    Method: a removed block [a, b] is replaced by a linear map T applied to the MLP output M of kept layer a-1,
    estimated in closed form on calibration tokens:

        T = argmin ||M T - (H_b - R)||^2 = (M^T M)^-1 M^T (H_b - R)

    with H_b the dense hidden state after the block (output of layer b) and R = h_{a-1} - M the residual that M is
    added to; T is folded into the layer's `down_proj` (W <- T^T W), so no parameters are added. Implemented by
    `ProjectionCompensation(sites="before_gap")`, whose fit is exactly this normal-equation solve in float64.

    Defaults: `alpha=0` (plain least squares) as in the paper's recommended `lstsq` method (`alpha: 0` in its
    reproduce configs); `guard=none`: the official code (`ReplaceMe/lstsq.py`) folds every estimated map without
    checking its effect. `guard=final_error` (GradMAP projection's guard, an option here) undoes a fold that raises
    the final-layer calibration error.

    Differences from the paper / its code:
    * Ridge: projection's ridge pulls T toward I with lam = alpha * tr(M^T M) / d; ReplaceMe's optional ridge is
      alpha * I toward 0. Identical at the default alpha = 0.
    * Several gaps: ReplaceMe estimates every block's T from one dense forward; here gaps are fitted in depth order
      on the pruned model with the earlier maps already folded (inputs M and R as the pruned model sees them; the
      targets H_b are dense, taken before any fold). For the first gap both are the same.
    * The paper's cosine-distance objective (solved with Adam) is not implemented; LS is the closed-form variant.
    * The paper selects the block with its own cosine-distance criterion; here any metric's selection is accepted.
    * A gap that starts at layer 0 has no MLP before it and is left uncompensated (listed in the report).
    * Calibration has no padding here; the reference code also fits on padded positions.
    * A norm after the MLP output (Gemma 2/3): the official code has no such case; refused by default
      (`post_norm=refuse`), or folded as `ProjectionCompensation`'s `post_norm` says (gradmap/post_norm.py).
    """

    name = "replaceme"

    # Fixed, not options: one site before every gap (top_k and shift only matter for other site rules).
    sites: str = field(default="before_gap", init=False)
    top_k: int = field(default=2, init=False)
    shift: str = field(default="mean", init=False)

    def check_calibration(self, model: nn.Module, num_tokens: int) -> None:
        d = model.get_input_embeddings().weight.shape[-1]
        if self.alpha == 0 and num_tokens < d:
            # M^T M (d x d) is singular with fewer tokens than dimensions; plain LS has no unique solution then.
            raise ConfigError("alpha", self.alpha, f"alpha > 0, or at least hidden_size={d} calibration tokens "
                              f"(calibration.num_samples x calibration.seq_len)",
                              problem=f"plain least squares (alpha=0) needs at least hidden_size={d} calibration "
                                      f"tokens, got {num_tokens}")

    def apply(self, model: nn.Module, removed: Mapping[int, nn.Module], calib: Calibration,
              cost: Cost) -> dict[str, Any]:
        if removed:
            self.check_calibration(model, calib.num_tokens)
        report = super().apply(model, removed, calib, cost)
        report["method"] = "ReplaceMe lstsq"
        report["uncompensated_gaps"] = [[a, b] for a, b in surgery.contiguous_gaps(removed) if a == 0]
        return report
