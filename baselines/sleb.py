"""SLEB: iterative block elimination by calibration perplexity."""

from __future__ import annotations

from baselines.ppl import PerplexityDrop
from gradmap.metric import Reuse


class SLEB(PerplexityDrop):
    """SLEB: at each step remove the block whose removal gives the lowest calibration perplexity, then rescore.

    Paper: "SLEB: Streamlining LLMs through Redundancy Verification and Elimination of Transformer Blocks",
    Jiwon Song, Kyungseok Oh, Taesu Kim, Hyungjun Kim, Yulhwa Kim, Jae-Joon Kim, arXiv 2402.09025,
    https://arxiv.org/abs/2402.09025

    Formula: at step k, for every block l still present, score_l = PPL(current model without l) =
    exp(mean next-token CE over the calibration tokens); the lowest is removed and the smaller model is rescored.
    Scoring is `PerplexityDrop.score`; only the defaults differ (iterative, first and last block protected), so
    pruning n of L blocks costs L + (L-1) + ... + (L-n+1) passes over the calibration set.

    Direction: the score is the perplexity; the lowest (the removal that hurts least) is pruned.

    Args:
        iterative: True by default: the paper recomputes the redundancy after every elimination.
        protect_first / protect_last: blocks never pruned; 1 / 1 by default as in the official code (`sleb.py` in
            jiwonsong-dev/SLEB: `early_barrier=1`, `latter_barrier=1`; the search skips the first and the last
            *remaining* block). Since those are never removed they stay the original first and last blocks, so
            protecting original blocks 0 and L-1 is the same rule. The official search also skips scoring them;
            here they are still scored (two extra calibration passes per step), only never removed.
    """

    name = "sleb"
    reuse = Reuse.RANKED  # iterative (the paper): a greedy order, reused as a prefix

    def __init__(self, iterative: bool = True, protect_first: int = 1, protect_last: int = 1):
        super().__init__(iterative=iterative, protect_first=protect_first, protect_last=protect_last)
