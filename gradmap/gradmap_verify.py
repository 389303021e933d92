"""GradMAP screening with exact verification: a gradient shortlist, then SLEB's exact check on the shortlist only.

Beyond the paper (issue #11). GradMAP ("GradMAP: Faster Layer Pruning with Gradient Metric and Projection
Compensation", arXiv 2602.14649, https://arxiv.org/abs/2602.14649) scores every layer from one forward+backward;
SLEB ("SLEB: Streamlining LLMs through Redundancy Verification and Elimination of Transformer Blocks", Song et al.,
arXiv 2402.09025, https://arxiv.org/abs/2402.09025) removes each block in turn and measures the calibration
perplexity exactly, which costs one pass over the calibration set per remaining block and decision. This metric
spends GradMAP's single gradient pass to pick `candidates` = k layers and SLEB's exact measurement on those k only.

One decision (iterative: one per removed layer; the smaller model is rescreened each time):
  1. screen: GradMAP's score of every present layer (`GradMAPMetric.score`, configured by the same keys as
     conf/metric/gradmap.yaml: target, reduction, accum_dtype, grad_accumulation, gradient_checkpointing,
     loss_chunk_tokens): one
     forward+backward over the calibration tokens;
  2. verify: the k lowest-scoring *prunable* layers (ties: the lower index) are each removed in turn
     (`surgery.layers_removed`) and the calibration perplexity measured (`baselines.ppl.calibration_perplexity`, on
     the same calibration tokens, exactly as SLEB scores a block): k forward passes over the calibration set;
  3. remove the candidate with the lowest calibration perplexity (ties: the lower index, as SLEB).

Limits: k=1 is GradMAP (the verification pass is skipped: one candidate needs no check); when k >= the number of
prunable layers still present, every one of them is verified, so the screening pass cannot change the choice and is
skipped: that decision is exactly SLEB's, scores and cost alike. Cost per decision: N forward + N backward tokens
for the screen plus min(k, prunable present) * N forward tokens for the verification (N = calibration tokens),
against SLEB's (prunable present) * N forward tokens (SLEB, as its official code, scores only the blocks it may
remove).

What a `Decision` holds (indexed by original layer, None = removed or not measured):
  scores          the verified calibration perplexities of the candidates, None elsewhere (SLEB's score: the
                  perplexity *is* the importance, higher = keep); when no verification pass ran (k=1), the GradMAP
                  scores, exactly as `GradMAPMetric` records them;
  gradient_scores the GradMAP screening scores of every present layer (None when the screen was skipped);
  verified        the candidates measured exactly, in screening order (lowest GradMAP score first);
  score_seconds   screen + verification (all scoring passes, as for every metric); verify_seconds its verification
                  part; forward_tokens / backward_tokens the whole decision, verify_forward_tokens the verification
                  part (the screen is the rest). `cost_split` sums them per phase; the runner records it.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

import baselines.ppl
from gradmap import surgery
from gradmap.grad_state import eval_mode
from gradmap.gradmap_metric import GradMAPMetric
from gradmap.metric import Calibration, Cost, Decision, DecisionCallback, Reuse, Selection


class GradMAPVerify(GradMAPMetric):
    """GradMAP screening + exact (SLEB) verification of the k lowest-scoring layers; see the module docstring.

    Args:
        candidates: k, the number of GradMAP's lowest-scoring prunable layers verified exactly per decision. 1 =
            GradMAP; >= the number of prunable layers = SLEB. The default (4) was chosen on validation text
            (experiment=choose_verify_k: lowest validation perplexity with the projection among 1, 2, 4, 8).
        target, reduction, accum_dtype, grad_accumulation, gradient_checkpointing, loss_chunk_tokens: GradMAP's
            screening score
            (`GradMAPMetric`); defaults as conf/metric/gradmap.yaml.
        protect_first / protect_last: never prune the first / last k layers; 1 / 1 by default, SLEB's official
            barriers: the decision is SLEB's criterion on a shortlist, so the k >= all limit is exactly default SLEB
            and a difference from SLEB is due to the screening alone. (GradMAP's default is 0 / 0; k=1 equals
            GradMAP with the same protection.) Protected layers are screened but never verified nor removed.

    Always iterative (one screen per removed layer), so cached selections are reused as prefixes.
    """

    name = "gradmap_verify"

    def __init__(self, candidates: int = 4, target: str = "activations", reduction: str = "first_order",
                 accum_dtype: str = "float64", grad_accumulation: str = "full", gradient_checkpointing: bool = True,
                 loss_chunk_tokens: int = 256, protect_first: int = 1, protect_last: int = 1):
        super().__init__(target=target, reduction=reduction, iterative=True, accum_dtype=accum_dtype,
                         grad_accumulation=grad_accumulation, gradient_checkpointing=gradient_checkpointing,
                         loss_chunk_tokens=loss_chunk_tokens, protect_first=protect_first, protect_last=protect_last)
        if int(candidates) < 1:
            raise ValueError(f"candidates={candidates} is not valid; allowed: an integer >= 1")
        self.candidates = int(candidates)

    reuse = Reuse.GREEDY  # one screened-and-verified decision per removed layer: cached runs serve as prefixes

    def _verify(self, model: nn.Module, calib: Calibration, kept: list[int], candidates: list[int]) -> list[float]:
        """Calibration perplexity of the current model without each candidate (original indices), as SLEB."""
        with eval_mode(model):
            out = []
            for c in candidates:
                with surgery.layers_removed(model, [kept.index(c)]):
                    out.append(float(baselines.ppl.calibration_perplexity(model, calib)))
        return out

    def select(self, model: nn.Module, calib: Calibration, num_prune: int, cost: Cost,
               resume: Selection | None = None, on_decision: DecisionCallback | None = None) -> Selection:
        original_count = surgery.num_layers(model)
        self.check_budget(original_count, num_prune)
        decisions: list[Decision] = list(resume.decisions[:num_prune]) if resume else []
        removed: list[int] = [i for d in decisions for i in d.removed]
        for step in range(len(decisions), num_prune):
            t0 = time.perf_counter()
            before = Cost(**cost.as_dict())
            kept = surgery.kept_indices(original_count, removed)
            prunable = [i for i in self.prunable(original_count) if i in kept]
            gradient: list[float | None] | None = None
            verified: list[int] = []
            with surgery.layers_removed(model, sorted(removed)):
                if self.candidates == 1 or len(prunable) > self.candidates:  # screen
                    gradient = self.layer_scores(model, calib, cost, kept, original_count)
                    verified = self.lowest(gradient, self.candidates) if self.candidates > 1 else []
                else:  # every prunable layer is a candidate: the screen cannot change the choice
                    verified = prunable
                screen_done = time.perf_counter()
                mid = Cost(**cost.as_dict())
                ppl = self._verify(model, calib, kept, verified) if verified else []
            score_seconds = time.perf_counter() - t0
            if not all(torch.isfinite(torch.tensor(ppl, dtype=torch.float64))):
                raise RuntimeError(f"gradmap_verify: non-finite calibration perplexity {ppl} for layers {verified}")
            if verified:
                full: list[float | None] = [None] * original_count
                for c, p in zip(verified, ppl):
                    full[c] = p
            else:
                full = list(gradient)
            take = self.lowest(full, 1)
            removed.extend(take)
            decisions.append(Decision(
                step=step, scores=full, removed=take, seconds=time.perf_counter() - t0, score_seconds=score_seconds,
                forward_tokens=cost.forward_tokens - before.forward_tokens,
                backward_tokens=cost.backward_tokens - before.backward_tokens,
                gradient_scores=gradient, verified=list(verified),
                verify_seconds=score_seconds - (screen_done - t0) if verified else 0.0,
                verify_forward_tokens=cost.forward_tokens - mid.forward_tokens))
            if on_decision is not None:
                on_decision(decisions[-1])
        return Selection(removed=removed, decisions=decisions)

    @staticmethod
    def cost_split(selection: Selection) -> dict[str, Any]:
        """Screening (gradient) vs verification: passes over the calibration set, seconds and tokens, summed over
        the decisions. Forward tokens are counted only while a token hook is active (the runner's stages are)."""
        ds = selection.decisions
        return {
            "gradient": {"passes": sum(d.gradient_scores is not None for d in ds),
                         "seconds": sum(d.score_seconds - d.verify_seconds for d in ds),
                         "forward_tokens": sum(d.forward_tokens - d.verify_forward_tokens for d in ds),
                         "backward_tokens": sum(d.backward_tokens for d in ds)},
            "verification": {"passes": sum(len(d.verified) for d in ds),
                             "seconds": sum(d.verify_seconds for d in ds),
                             "forward_tokens": sum(d.verify_forward_tokens for d in ds),
                             "backward_tokens": 0},
        }
