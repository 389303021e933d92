"""Budgeted exact verification for `gradmap_verify` (issue #18): successive halving over calibration windows, and
the loss on a fixed set of positions. Pure functions; `methods.gradmap.verify.GradMAPVerify` wires them in.

Successive halving (Jamieson & Talwalkar, "Non-stochastic Best Arm Identification and Hyperparameter Optimization",
AISTATS 2016, arXiv 1502.07943): measure every candidate on the first w0 windows of a seeded, fixed order of the
calibration windows, keep the better half (ceil), double the windows (at most all of them), until one candidate is
left. Windows are nested (round r's windows contain round r-1's), so a survivor is measured only on the windows it
has not seen yet: a candidate costs (windows it reached) x seq_len forward tokens, whatever the rounds.

The `dense_kl` signal measures a candidate by KL(dense model || candidate-removed model) of the next-token
distributions at every position, averaged over predictions, instead of the cross-entropy with the text's next token:
the dense model's full distribution is a soft target, so a few windows tell two candidates apart with far less
sampling noise than the one observed token per position does (the variance that made one-window halving swing).
The dense log-probabilities are computed once per selection (one forward over the windows halving can reach).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gradmap.errors import ConfigError
from gradmap.models import model_device

SIGNALS = ("full", "last", "random", "dense_kl")


def first_windows(fraction: float, num_windows: int) -> int:
    """Windows of the first halving round: ceil(fraction x windows), at least 1 (fraction 1 = every window)."""
    return max(1, min(num_windows, math.ceil(fraction * num_windows - 1e-9)))


def window_order(num_windows: int, seed: int) -> list[int]:
    """The fixed order in which halving rounds take calibration windows: a permutation drawn from `seed`."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(num_windows, generator=g).tolist()


def halving_windows(candidates: int, num_windows: int, first: int) -> list[int]:
    """Windows each candidate is measured on, best first, under successive halving with nested windows (the formula
    of the verification cost: sum(...) x seq_len forward tokens). candidates=1 needs no measurement: []."""
    if candidates <= 1:
        return []
    reached: list[int] = []
    alive, w = candidates, min(first, num_windows)
    while True:
        keep = math.ceil(alive / 2)
        reached = [w] * (alive - keep) + reached  # the dropped ones stop here
        if keep == 1:
            return [w] + reached
        alive, w = keep, min(num_windows, 2 * w)


def loss_positions(signal: str, seq_len: int, count: int, seed: int) -> torch.Tensor | None:
    """Positions (0..seq_len-2) whose next-token prediction the verification loss uses: None = every position
    (`full`, `dense_kl`), the last `count` (`last`), or `count` drawn once from `seed` (`random`, sorted); the same
    for every window."""
    if signal not in SIGNALS:
        raise ConfigError("verify_signal", signal, list(SIGNALS))
    if signal in ("full", "dense_kl"):
        return None
    if not 1 <= count <= seq_len - 1:
        raise ConfigError("verify_positions", count, f"1..{seq_len - 1} (calibration windows of {seq_len} tokens)")
    if signal == "last":
        return torch.arange(seq_len - 1 - count, seq_len - 1)
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(seq_len - 1, generator=g)[:count].sort().values


@torch.no_grad()
def loss_sum(model: nn.Module, ids: torch.Tensor, batch_size: int,
             positions: torch.Tensor | None = None) -> tuple[float, int]:
    """(sum of next-token cross-entropy, predictions) over the rows `ids`, in micro-batches of `batch_size`.

    positions=None: every prediction, summed exactly as `methods.baselines.ppl.calibration_perplexity` sums it (HF's
    mean loss per micro-batch x its count, in a Python float), so all windows in their order give its perplexity
    bit for bit. Otherwise only the predictions made at `positions` (logits computed there alone: `logits_to_keep`).
    """
    device = model_device(model)
    total, count = 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start:start + batch_size].to(device)
        if positions is None:
            n = batch.shape[0] * (batch.shape[1] - 1)
            total += float(model(input_ids=batch, labels=batch, use_cache=False).loss) * n
        else:
            pos = positions.to(device)
            logits = model(input_ids=batch, use_cache=False, logits_to_keep=pos).logits
            target = batch[:, pos + 1]
            n = target.numel()
            total += float(F.cross_entropy(logits.float().reshape(n, -1), target.reshape(n), reduction="sum"))
        count += n
    return total, count


def reached_windows(candidates: int, num_windows: int, first: int) -> int:
    """How many windows (a prefix of the halving order) a decision among `candidates` can measure at most."""
    reached = halving_windows(candidates, num_windows, first)
    return reached[0] if reached else 0


@torch.no_grad()
def next_token_log_probs(model: nn.Module, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """float32 log-probabilities of the next token at every position but the last: [rows, seq_len - 1, vocab]
    (on the model's device; the `dense_kl` reference: rows x (seq_len - 1) x vocab x 4 bytes)."""
    device = model_device(model)
    out = [F.log_softmax(model(input_ids=ids[s:s + batch_size].to(device), use_cache=False).logits[:, :-1].float(),
                         dim=-1) for s in range(0, ids.shape[0], batch_size)]
    return torch.cat(out)


@torch.no_grad()
def kl_sum(model: nn.Module, ids: torch.Tensor, batch_size: int, reference: torch.Tensor) -> tuple[float, int]:
    """(sum over predictions of KL(reference || model) in nats, predictions) over the rows `ids`; `reference` holds
    the reference model's `next_token_log_probs` of the same rows, in the same order."""
    total, count = 0.0, 0
    for s in range(0, ids.shape[0], batch_size):
        log_q = next_token_log_probs(model, ids[s:s + batch_size], batch_size)
        log_p = reference[s:s + batch_size]
        total += float((log_p.exp() * (log_p - log_q)).sum(dtype=torch.float64))
        count += log_p.shape[0] * log_p.shape[1]
    return total, count
