"""SLEB: iterative block elimination by calibration perplexity."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradmap.data import Calibration
from gradmap.stages import Cost
from methods.baselines.ppl import PerplexityDrop, removal_perplexities


@dataclass(eq=False)
class SLEB(PerplexityDrop):
    """SLEB: at each step remove the block whose removal gives the lowest calibration perplexity, then rescore.

    Paper: "SLEB: Streamlining LLMs through Redundancy Verification and Elimination of Transformer Blocks",
    Jiwon Song, Kyungseok Oh, Taesu Kim, Hyungjun Kim, Yulhwa Kim, Jae-Joon Kim, arXiv 2402.09025,
    https://arxiv.org/abs/2402.09025

    Formula: at step k, for every block l still present that may be removed, score_l = PPL(current model without l)
    = exp(mean next-token CE over the calibration tokens); the lowest is removed and the smaller model is rescored.
    As in the official search (`sleb.py` in jiwonsong-dev/SLEB: `for j in range(early_barrier,
    search_bound - latter_barrier)`), the protected blocks are not scored at all (None in the decision), so pruning
    n of L blocks with P protected costs (L-P) + (L-P-1) + ... + (L-P-n+1) passes over the calibration set.

    Direction: the score is the perplexity; the lowest (the removal that hurts least) is pruned.

    Args:
        iterative: True by default: the paper recomputes the redundancy after every elimination.
        protect_first / protect_last: blocks never pruned nor scored; 1 / 1 by default as in the official code
            (`early_barrier=1`, `latter_barrier=1`; the search skips the first and the last *remaining* block).
            Since those are never removed they stay the original first and last blocks, so protecting original
            blocks 0 and L-1 is the same rule.
    """

    name = "sleb"
    # Selections cached before revision 1 scored the protected blocks too (same removals, ~7% more tokens): their
    # token counts would be stale, so the revision is part of the selection cache key (`gradmap.cache`).
    scoring_revision = 1

    def layer_scores(self, model: nn.Module, calib: Calibration, cost: Cost, kept: list[int],
                     original_count: int) -> list[float | None]:
        """The removal perplexity of each present block that may be removed; None for removed and protected ones."""
        allowed = set(self.prunable(original_count))
        positions = [pos for pos, orig in enumerate(kept) if orig in allowed]
        scores = removal_perplexities(model, calib, positions, self.name)
        if not torch.isfinite(scores).all():
            raise RuntimeError(f"sleb: non-finite calibration perplexity {scores.tolist()} for layers "
                               f"{[kept[p] for p in positions]}")
        full: list[float | None] = [None] * original_count
        for pos, value in zip(positions, scores.tolist()):
            full[kept[pos]] = value
        return full
