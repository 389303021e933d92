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
     (`surgery.layers_removed`) and the calibration perplexity measured
     (`methods.baselines.ppl.calibration_perplexity`, on the same calibration tokens, exactly as SLEB scores a
     block): k forward passes over the calibration set;
  3. remove the candidate with the lowest calibration perplexity (ties: the lower index, as SLEB).

Limits: k=1 is GradMAP (the verification pass is skipped: one candidate needs no check); when k >= the number of
prunable layers still present, every one of them is verified, so the screening pass cannot change the choice and is
skipped: that decision is exactly SLEB's, scores and cost alike. Cost per decision: N forward + N backward tokens
for the screen plus min(k, prunable present) * N forward tokens for the verification (N = calibration tokens),
against SLEB's (prunable present) * N forward tokens (SLEB, as its official code, scores only the blocks it may
remove).

Budget options (issue #18; every default reproduces the above exactly; costs in the README's gradmap_verify section):
  verify_fraction f < 1: successive halving (`methods.gradmap.verify_budget`): the candidates are measured on the first
      ceil(f x W) of the W calibration windows (a fixed order drawn from `verify_seed`), the better half (ceil) kept,
      the windows doubled (nested: a survivor is measured only on the windows it has not seen), until one is left;
      it is removed. Verification cost: seq_len x sum over candidates of the windows each reached (k=4, f=1/8:
      (1+1+2+2) windows = 0.75 N instead of 4 N). Also applies when every prunable layer is a candidate (SLEB's
      case), so k >= all with f=1 is still SLEB.
  screen_every m > 1: a fresh screen only every m decisions; in between, the candidates are the k lowest of the
      last screen among the layers still present (no backward: N forward + N backward tokens saved per reuse).
      rescreen_at_cut: also screen anew after a decision whose winner was the last layer of its shortlist.
  verify_signal: `full` (every next-token prediction), `last` (the last `verify_positions` predictions of each
      window) or `random` (`verify_positions` positions drawn once from `verify_seed`, the same in every window).
      A causal model must still run the whole window, so the forward tokens are the same; only the LM head runs
      on fewer positions (`logits_to_keep`). `dense_kl`: KL(dense || candidate-removed) of the next-token
      distributions at every position (`verify_budget.kl_sum`), a soft target with less sampling noise than the
      text's one token; the dense log-probabilities of the windows halving can reach are computed once per
      selection (booked to the first decision's verification: reached windows x seq_len forward tokens).
  screen_windows s > 0: the gradient screen runs on the first s windows of the halving order only (s x seq_len
      forward + backward tokens instead of N each); 0 = every window.

What a `Decision` holds (indexed by original layer, None = removed or not measured):
  scores          the verified calibration perplexities of the candidates, None elsewhere (SLEB's score: the
                  perplexity *is* the importance, higher = keep); when no verification pass ran (k=1), the GradMAP
                  scores, exactly as `GradMAPMetric` records them;
  gradient_scores the GradMAP screening scores of every present layer (None when the screen was skipped);
  verified        the candidates measured exactly, in screening order (lowest GradMAP score first);
  score_seconds   screen + verification (all scoring passes, as for every metric); verify_seconds its verification
                  part; forward_tokens / backward_tokens the whole decision, verify_forward_tokens the verification
                  part (the screen is the rest). `cost_split` sums them per phase; the runner records it.
  verify_tokens   (verify_fraction < 1) the tokens each verified layer was measured on; its score is the perplexity
                  on those windows only (`dense_kl`: the mean KL per prediction in nats, not a perplexity);
  screened_at     (screen reused) the decision whose screen ranked the candidates.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradmap import surgery
from gradmap.data import Calibration
from gradmap.grad_state import eval_mode
from gradmap.schema import option
from gradmap.selection import Decision, DecisionCallback, DecisionTimer, Selection, SelectionKind
from gradmap.stages import Cost
from methods.gradmap.metric import GradMAPMetric
from methods.gradmap.verify_budget import (
    SIGNALS,
    first_windows,
    kl_sum,
    loss_positions,
    loss_sum,
    next_token_log_probs,
    reached_windows,
    window_order,
)


@dataclass(eq=False)
class GradMAPVerify(GradMAPMetric):
    """GradMAP screening + exact (SLEB) verification of the k lowest-scoring layers; see the module docstring.

    Options (values: conf/metric/gradmap_verify.yaml):
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
        verify_fraction: first halving round's share of the calibration windows; 1 = exact verification (default).
        screen_every / rescreen_at_cut: screen reuse; 1 / false = a fresh screen at every decision (default).
        verify_signal / verify_positions: the verification loss and its positions; `full` = the cross-entropy of
            every prediction (default); `dense_kl` = KL from the dense model at every prediction.
        screen_windows: windows the gradient screen runs on (the first of the halving order); 0 = all (default).
        verify_seed: the order of the windows for halving and the screen, and the `random` positions.

    Always iterative (one screen per removed layer), so cached selections are reused as prefixes.
    """

    name = "gradmap_verify"

    iterative: bool = field(default=True, init=False)  # one screen per removed layer
    candidates: int = option(ge=1)
    verify_fraction: float = option(gt=0, le=1, allowed="a number in (0, 1] (1 = exact verification)")
    screen_every: int = option(ge=1)
    rescreen_at_cut: bool = option()
    verify_signal: str = option(choices=SIGNALS)
    verify_positions: int = option(ge=1)
    verify_seed: int = option()
    screen_windows: int = option(ge=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.verify_fraction = float(self.verify_fraction)

    # One screened-and-verified decision per removed layer: cached runs serve as prefixes.
    selection_kind = SelectionKind.GREEDY

    def _verify(self, model: nn.Module, calib: Calibration, kept: list[int], candidates: list[int],
                reference: torch.Tensor | None) -> tuple[list[float], list[int], int]:
        """Successive halving of the candidates (original indices) by the calibration perplexity of the current model
        without each (`methods.gradmap.verify_budget`): (perplexity of each on the windows it reached, tokens each was
        measured on, the winner). verify_fraction=1 measures every candidate on every window in calibration order,
        which is SLEB's score bit for bit; the winner is then the lowest perplexity (ties: the lower index).
        `dense_kl`: the mean KL from `reference` (the dense log-probs of the first windows of the halving order)
        instead of the perplexity."""
        ids = calib.input_ids
        windows, seq_len = ids.shape
        order = window_order(windows, self.verify_seed)
        rank = {win: j for j, win in enumerate(order)}
        positions = loss_positions(self.verify_signal, seq_len, self.verify_positions, self.verify_seed)
        sums = {c: (0.0, 0) for c in candidates}
        seen = {c: 0 for c in candidates}  # windows measured so far (a prefix of `order`)
        alive, w = list(candidates), first_windows(self.verify_fraction, windows)
        with eval_mode(model):
            while True:
                for c in alive:
                    new = sorted(order[seen[c]:w])
                    if new:
                        with surgery.layers_removed(model, [kept.index(c)]):
                            if reference is None:
                                total, count = loss_sum(model, ids[new], calib.batch_size, positions)
                            else:
                                total, count = kl_sum(model, ids[new], calib.batch_size,
                                                      reference[[rank[x] for x in new]])
                        sums[c] = (sums[c][0] + total, sums[c][1] + count)
                        seen[c] = w
                mean = {c: sums[c][0] / sums[c][1] for c in alive}
                alive = sorted(alive, key=lambda c: (mean[c], c))[:math.ceil(len(alive) / 2)]
                if len(alive) == 1:
                    break
                w = min(windows, 2 * w)
        score = (lambda x: x) if reference is not None else math.exp  # mean KL, or the perplexity
        return [score(sums[c][0] / sums[c][1]) for c in candidates], [seen[c] * seq_len for c in candidates], alive[0]

    def _screen_calibration(self, calib: Calibration) -> Calibration:
        """The windows the gradient screen runs on: every one (screen_windows=0), else the first of the halving
        order, in calibration order."""
        windows = calib.input_ids.shape[0]
        if self.screen_windows == 0 or self.screen_windows >= windows:
            return calib
        rows = sorted(window_order(windows, self.verify_seed)[:self.screen_windows])
        return Calibration(input_ids=calib.input_ids[rows], batch_size=calib.batch_size)

    def _dense_reference(self, model: nn.Module, calib: Calibration, candidates: int) -> torch.Tensor:
        """`dense_kl`'s reference: the model's next-token log-probs on the windows a decision among `candidates`
        can reach, in halving order (the model as given: no layer removed)."""
        windows = calib.input_ids.shape[0]
        reach = reached_windows(candidates, windows, first_windows(self.verify_fraction, windows))
        rows = window_order(windows, self.verify_seed)[:reach]
        with eval_mode(model):
            return next_token_log_probs(model, calib.input_ids[rows], calib.batch_size)

    def _fresh_screen(self, step: int, decisions: list[Decision], screen_step: int | None) -> bool:
        """Screen anew at this decision? Always when screen_every=1; else when no screen exists yet, when the last
        one is `screen_every` decisions old, or (rescreen_at_cut) when the previous decision chose the last layer
        of its shortlist: the exact check then preferred the layer at the screen's cut, so a stale ranking may hide
        better layers beyond it."""
        if screen_step is None or step - screen_step >= self.screen_every:
            return True
        last = decisions[-1] if decisions else None
        return bool(self.rescreen_at_cut and last is not None and len(last.verified) == self.candidates > 1
                    and last.removed == last.verified[-1:])

    def select(self, model: nn.Module, calib: Calibration, num_prune: int, cost: Cost,
               resume: Selection | None = None, on_decision: DecisionCallback | None = None) -> Selection:
        original_count = surgery.num_layers(model)
        self.check_budget(original_count, num_prune)
        loss_positions(self.verify_signal, calib.input_ids.shape[1], self.verify_positions, self.verify_seed)
        decisions: list[Decision] = list(resume.decisions[:num_prune]) if resume else []
        removed: list[int] = [i for d in decisions for i in d.removed]
        # The newest screen (a resumed prefix carries it in its last screening decision).
        screen, screen_step = next(((d.gradient_scores, d.step) for d in reversed(decisions)
                                    if d.gradient_scores is not None), (None, None))
        screen_calib = self._screen_calibration(calib)
        reference: torch.Tensor | None = None  # dense_kl: the dense log-probs, computed at the first verification
        for step in range(len(decisions), num_prune):
            timer = DecisionTimer(cost)
            kept = surgery.kept_indices(original_count, removed)
            prunable = [i for i in self.prunable(original_count) if i in kept]
            ref_seconds, ref_tokens = 0.0, 0
            measured = min(self.candidates, len(prunable))  # candidates this decision verifies (if more than 1)
            if self.verify_signal == "dense_kl" and reference is None and measured > 1:
                t0, f0 = time.perf_counter(), cost.forward_tokens  # booked as this decision's verification
                reference = self._dense_reference(model, calib, measured)
                ref_seconds, ref_tokens = time.perf_counter() - t0, cost.forward_tokens - f0
            gradient: list[float | None] | None = None
            ranking: list[float | None] | None = None
            reused_from: int | None = None
            verified: list[int] = []
            with surgery.layers_removed(model, sorted(removed)):
                if self.candidates == 1 or len(prunable) > self.candidates:  # screen
                    if self._fresh_screen(step, decisions, screen_step):
                        gradient = self.layer_scores(model, screen_calib, cost, kept, original_count)
                        screen, screen_step = gradient, step
                        ranking = gradient
                    else:  # rank with the last screen, without the layers removed since
                        reused_from = screen_step
                        ranking = [s if i in kept else None for i, s in enumerate(screen)]
                    verified = self.lowest(ranking, self.candidates) if self.candidates > 1 else []
                else:  # every prunable layer is a candidate: the screen cannot change the choice
                    verified = prunable
                screen_seconds = timer.scored() - ref_seconds
                mid = Cost(**cost.as_dict())
                ppl, tokens, winner = (self._verify(model, calib, kept, verified, reference) if verified
                                       else ([], [], None))
            score_seconds = timer.scored()
            if not all(torch.isfinite(torch.tensor(ppl, dtype=torch.float64))):
                raise RuntimeError(f"gradmap_verify: non-finite calibration perplexity {ppl} for layers {verified}")
            if verified:
                full: list[float | None] = [None] * original_count
                for c, p in zip(verified, ppl):
                    full[c] = p
                take = [winner]
            else:
                full = list(ranking)
                take = self.lowest(full, 1)
            removed.extend(take)
            decisions.append(timer.decision(
                step, full, take, gradient_scores=gradient, verified=list(verified),
                verify_seconds=score_seconds - screen_seconds if verified else 0.0,
                verify_forward_tokens=cost.forward_tokens - mid.forward_tokens + ref_tokens,
                verify_tokens=tokens if self.verify_fraction < 1 else [], screened_at=reused_from))
            if on_decision is not None:
                on_decision(decisions[-1])
        return Selection(removed=removed, decisions=decisions)

    @staticmethod
    def cost_split(selection: Selection) -> dict[str, Any]:
        """Screening (gradient) vs verification: passes over the calibration set, seconds and tokens, summed over
        the decisions. Forward tokens are counted only while a token hook is active (the runner's stages are)."""
        ds = selection.decisions
        split = {
            "gradient": {"passes": sum(d.gradient_scores is not None for d in ds),
                         "seconds": sum(d.score_seconds - d.verify_seconds for d in ds),
                         "forward_tokens": sum(d.forward_tokens - d.verify_forward_tokens for d in ds),
                         "backward_tokens": sum(d.backward_tokens for d in ds)},
            "verification": {"passes": sum(len(d.verified) for d in ds),
                             "seconds": sum(d.verify_seconds for d in ds),
                             "forward_tokens": sum(d.verify_forward_tokens for d in ds),
                             "backward_tokens": 0},
        }
        reused = sum(d.screened_at is not None for d in ds)
        if reused:  # screen_every > 1 / rescreen_at_cut: decisions ranked by an earlier screen (no pass of their own)
            split["gradient"]["reused"] = reused
        return split
