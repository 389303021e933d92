"""gradmap_verify's budget options (issue #18): successive halving, screen reuse, the loss on some positions.

With an unlimited budget the halving verification is today's exact verification (bit for bit), and with k=all it is
SLEB; every option's token count equals its formula; the halving rounds, the reused ranking and the position loss are
each checked against an independent computation.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import methods.baselines.ppl
from gradmap import surgery
from gradmap.data import Calibration
from gradmap.errors import ConfigError
from gradmap.models import tiny_random_llama
from gradmap.selection import Selection
from gradmap.stages import Cost, count_forward_tokens
from methods.gradmap.verify import GradMAPVerify
from methods.gradmap.verify_budget import first_windows, halving_windows, loss_positions, loss_sum, window_order
from tests.model_state import assert_unchanged, snapshot
from tests.tiny_models import method

LAYERS, PRUNE, WINDOWS, SEQ = 8, 3, 8, 16
N, T = WINDOWS * SEQ, SEQ  # calibration tokens, tokens per window


def gradmap_verify(**options):
    """conf/metric/gradmap_verify.yaml's object, with `options` changed."""
    return method("metric/gradmap_verify", **options)


def make_model() -> nn.Module:
    return tiny_random_llama(num_layers=LAYERS, seed=0)


def make_calib() -> Calibration:
    g = torch.Generator().manual_seed(0)
    return Calibration(input_ids=torch.randint(0, 256, (WINDOWS, SEQ), generator=g), batch_size=3)


def counted_select(metric, model, calib, n, **kw):
    cost = Cost()
    with count_forward_tokens(model, cost):
        selection = metric.select(model, calib, n, cost, **kw)
    return selection, cost


def without(model: nn.Module, drop: list[int]) -> nn.Module:
    """A copy of `model` without the original layers `drop` (no surgery)."""
    ref = copy.deepcopy(model)
    ref.model.layers = nn.ModuleList([m for i, m in enumerate(ref.model.layers) if i not in drop])
    ref.config.num_hidden_layers = len(ref.model.layers)
    return ref


def window_ce(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor | None = None) -> list[float]:
    """Summed next-token cross-entropy of each window (full logits, one window at a time), at `positions` or all."""
    out = []
    with torch.no_grad():
        for row in ids:
            logits = model(input_ids=row[None], use_cache=False).logits[0, :-1].double()
            target = row[1:]
            pos = torch.arange(len(target)) if positions is None else positions
            out.append(float(F.cross_entropy(logits[pos], target[pos], reduction="sum")))
    return out


# ------------------------------------------------------------------------------------------------ formulas

def test_halving_formula():
    assert halving_windows(4, 8, 1) == [2, 2, 1, 1]  # 4 on 1 window, 2 on 2: 6 windows, 0.75 N
    assert halving_windows(3, 8, 1) == [2, 2, 1]
    assert halving_windows(2, 8, 2) == [2, 2]
    assert halving_windows(5, 8, 1) == [4, 4, 2, 1, 1]
    assert halving_windows(8, 8, 1) == [4, 4, 2, 2, 1, 1, 1, 1]  # 2 N, against 8 N exact
    assert halving_windows(4, 8, 8) == [8, 8, 8, 8]  # f=1: every candidate on every window, nothing measured twice
    assert halving_windows(1, 8, 1) == []
    assert [first_windows(f, 8) for f in (0.125, 0.25, 0.3, 0.5, 1.0, 0.01)] == [1, 2, 3, 4, 8, 1]
    assert sorted(window_order(8, 0)) == list(range(8)) and window_order(8, 0) == window_order(8, 0)
    assert window_order(8, 0) != window_order(8, 1)


# --------------------------------------------------------------------------------------- unlimited budget

def test_unlimited_budget_is_exact_verification():
    """f=1 (any window order): today's gradmap_verify, against a reference written out here (GradMAP screen, the
    k lowest prunable, SLEB's perplexity of each, the lowest removed)."""
    model, calib, k = make_model(), make_calib(), 3
    sel = gradmap_verify(candidates=k, verify_fraction=1.0, verify_seed=7).select(model, calib, PRUNE, Cost())
    removed: list[int] = []
    for d in sel.decisions:
        kept = surgery.kept_indices(LAYERS, removed)
        with surgery.layers_removed(model, sorted(removed)):
            screen = method("metric/gradmap").score(model, calib, Cost()).tolist()
            order = sorted((i for i in kept if 1 <= i <= LAYERS - 2), key=lambda i: (screen[kept.index(i)], i))[:k]
            ppl = {}
            for c in order:
                with surgery.layers_removed(model, [kept.index(c)]):
                    ppl[c] = methods.baselines.ppl.calibration_perplexity(model, calib)
        assert d.verified == order and d.verify_tokens == [] and d.screened_at is None
        assert {c: d.scores[c] for c in order} == ppl  # bit for bit
        assert d.removed == [min(order, key=lambda c: (ppl[c], c))]
        removed += d.removed
    default = gradmap_verify(candidates=k).select(model, calib, PRUNE, Cost())
    assert sel.removed == removed == default.removed
    assert [d.scores for d in sel.decisions] == [d.scores for d in default.decisions]


def test_unlimited_budget_all_candidates_is_sleb():
    model, calib = make_model(), make_calib()
    sleb = method("metric/sleb").select(model, calib, PRUNE, Cost())
    sel, cost = counted_select(gradmap_verify(candidates=LAYERS, verify_fraction=1.0, verify_seed=3), model, calib,
                               PRUNE)
    assert sel.removed == sleb.removed
    for d, s in zip(sel.decisions, sleb.decisions):
        assert [d.scores[i] for i in d.verified] == [s.scores[i] for i in d.verified]
    assert cost.backward_tokens == 0 and cost.forward_tokens == (6 + 5 + 4) * N


# ---------------------------------------------------------------------------------------- halving rounds

def test_halving_decisions_against_independent_computation():
    model, calib, k, f = make_model(), make_calib(), 4, 0.25  # rounds: 4 candidates on 2 windows, 2 on 4
    sel = gradmap_verify(candidates=k, verify_fraction=f, verify_seed=5).select(model, calib, PRUNE, Cost())
    order = window_order(WINDOWS, 5)
    removed: list[int] = []
    for d in sel.decisions:
        ce = {c: window_ce(without(model, removed + [c]), calib.input_ids) for c in d.verified}
        mean = lambda c, w: sum(ce[c][i] for i in order[:w]) / (w * (SEQ - 1))  # noqa: E731
        first = sorted(d.verified, key=lambda c: (mean(c, 2), c))[:2]
        winner = min(first, key=lambda c: (mean(c, 4), c))
        assert d.removed == [winner]
        assert d.verify_tokens == [4 * T if c in first else 2 * T for c in d.verified]
        for c in d.verified:
            assert d.scores[c] == pytest.approx(math.exp(mean(c, d.verify_tokens[d.verified.index(c)] // T)),
                                                rel=1e-5)
        removed += d.removed
    assert removed == sel.removed


# ------------------------------------------------------------------------------------------ token counts

# Per decision (prunable layers present 6, 5, 4; N = 128, T = 16 tokens per window), written out by hand:
#   screen: N forward + N backward; reused screen: 0; k >= prunable: no screen.
#   halving windows: halving_windows(k, 8, ceil(8 f)) summed (k=4, f=1/8: 6; k=2, f=1/4: 4; 6/5/4 cands, f=1/8:
#   13/12/6; k=4, f=1: 4 x 8 = 32).
CASES = {
    "halving k=4 f=1/8": (dict(candidates=4, verify_fraction=0.125), 2 * N + (6 + 6 + 6) * T, 2 * N),
    "halving + screen every 3": (dict(candidates=4, verify_fraction=0.125, screen_every=3), N + 18 * T, N),
    "k=2 f=1/4 screen every 2": (dict(candidates=2, verify_fraction=0.25, screen_every=2), 2 * N + 12 * T, 2 * N),
    "last positions": (dict(candidates=4, verify_fraction=0.125, verify_signal="last", verify_positions=5),
                       2 * N + 18 * T, 2 * N),
    "random positions, exact": (dict(candidates=4, verify_signal="random", verify_positions=7),
                                2 * N + (32 + 32 + 32) * T, 2 * N),
    "k=all halving (SLEB halved)": (dict(candidates=LAYERS, verify_fraction=0.125), (13 + 12 + 6) * T, 0),
    "screen every 2, gradmap (k=1)": (dict(candidates=1, screen_every=2), 2 * N, 2 * N),
    # dense_kl: + the dense reference once, on the windows the first decision can reach (k=4, f=1/8: 2)
    "dense_kl halving": (dict(candidates=4, verify_fraction=0.125, verify_signal="dense_kl"),
                         2 * N + 18 * T + 2 * T, 2 * N),
    # the screen on 2 windows: 2T forward + 2T backward per screen
    "screen on 2 windows": (dict(candidates=4, verify_fraction=0.125, screen_windows=2), 2 * 2 * T + 18 * T, 4 * T),
}


@pytest.mark.parametrize("case", list(CASES))
def test_token_counts_by_formula(case):
    options, fwd, bwd = CASES[case]
    model, calib = make_model(), make_calib()
    sel, cost = counted_select(gradmap_verify(**options), model, calib, PRUNE)
    assert (cost.forward_tokens, cost.backward_tokens) == (fwd, bwd)
    assert sel.cost == {"forward_tokens": fwd, "backward_tokens": bwd}
    split = GradMAPVerify.cost_split(sel)
    grad, ver = split["gradient"], split["verification"]
    screen_tokens = T * options["screen_windows"] if options.get("screen_windows") else N
    assert grad["forward_tokens"] == grad["backward_tokens"] == bwd == grad["passes"] * screen_tokens
    assert ver["forward_tokens"] == fwd - bwd
    assert grad.get("reused", 0) == sum(d.screened_at is not None for d in sel.decisions)
    if options.get("verify_fraction", 1) < 1:  # the record says what each candidate cost (+ dense_kl's reference)
        reference = 2 * T if options.get("verify_signal") == "dense_kl" else 0
        assert sum(sum(d.verify_tokens) for d in sel.decisions) + reference == ver["forward_tokens"]


# ------------------------------------------------------------------------------------------ screen reuse

def test_reused_screen_ranks_remaining_layers_by_the_last_screen():
    model, calib = make_model(), make_calib()
    sel = gradmap_verify(candidates=2, screen_every=2).select(model, calib, PRUNE, Cost())
    d0, d1, d2 = sel.decisions
    assert d0.gradient_scores is not None and d2.gradient_scores is not None  # steps 0 and 2 screen
    assert d1.gradient_scores is None and d1.screened_at == 0 and d1.backward_tokens == 0
    remaining = [i for i in range(1, LAYERS - 1) if i not in d0.removed]
    assert d1.verified == sorted(remaining, key=lambda i: (d0.gradient_scores[i], i))[:2]


def test_rescreen_at_cut():
    """After a decision whose winner was its shortlist's last layer the next one screens anew, otherwise not."""
    seen = set()
    for k in (2, 3):
        for seed in (0, 1):
            model = tiny_random_llama(num_layers=LAYERS, seed=seed)
            sel = gradmap_verify(candidates=k, screen_every=100, rescreen_at_cut=True).select(model, make_calib(),
                                                                                             PRUNE, Cost())
            for prev, d in zip(sel.decisions, sel.decisions[1:]):
                at_cut = prev.removed == prev.verified[-1:]
                assert (d.gradient_scores is not None) == at_cut and (d.screened_at is None) == at_cut
                seen.add(at_cut)
    assert seen == {True, False}  # both branches ran


def test_resume_with_screen_reuse_and_halving():
    model, calib = make_model(), make_calib()
    metric = gradmap_verify(candidates=3, verify_fraction=0.25, screen_every=2)
    full = metric.select(model, calib, PRUNE, Cost())
    prefix = Selection.from_dict(metric.select(model, calib, 1, Cost()).as_dict())  # as read from the cache
    resumed, cost = counted_select(metric, model, calib, PRUNE, resume=prefix)
    assert resumed.removed == full.removed
    assert cost.backward_tokens == N  # step 1 reuses step 0's screen from the record; step 2 screens
    assert [d.screened_at for d in resumed.decisions] == [d.screened_at for d in full.decisions] == [None, 0, None]


# ------------------------------------------------------------------------------------------ the signal

@pytest.mark.parametrize("signal", ["last", "random"])
def test_position_loss_against_full_logits(signal):
    model, calib = make_model(), make_calib()
    pos = loss_positions(signal, SEQ, 5, seed=2)
    assert len(pos) == 5 and pos.unique().numel() == 5 and 0 <= int(pos.min()) and int(pos.max()) <= SEQ - 2
    if signal == "last":
        assert pos.tolist() == list(range(SEQ - 6, SEQ - 1))
    total, count = loss_sum(model, calib.input_ids, 3, pos)
    assert count == WINDOWS * 5
    assert total == pytest.approx(sum(window_ce(model, calib.input_ids, pos)), rel=1e-5)
    # The exact (full) signal is SLEB's perplexity bit for bit.
    total, count = loss_sum(model, calib.input_ids, calib.batch_size)
    assert math.exp(total / count) == methods.baselines.ppl.calibration_perplexity(model, calib)


def test_last_positions_verification_scores():
    model, calib = make_model(), make_calib()
    sel = gradmap_verify(candidates=3, verify_signal="last", verify_positions=4).select(model, calib, 1, Cost())
    d = sel.decisions[0]
    pos = torch.arange(SEQ - 5, SEQ - 1)
    for c in d.verified:
        ref = sum(window_ce(without(model, [c]), calib.input_ids, pos)) / (WINDOWS * 4)
        assert d.scores[c] == pytest.approx(math.exp(ref), rel=1e-5)


def mean_kl(reference: nn.Module, model: nn.Module, ids: torch.Tensor) -> float:
    """Mean over predictions of KL(reference || model), full logits in float64, one window at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in ids:
            log_p = F.log_softmax(reference(input_ids=row[None], use_cache=False).logits[0, :-1].double(), -1)
            log_q = F.log_softmax(model(input_ids=row[None], use_cache=False).logits[0, :-1].double(), -1)
            total += float(F.kl_div(log_q, log_p, log_target=True, reduction="sum"))
            count += log_p.shape[0]
    return total / count


def test_dense_kl_verification_against_independent_computation():
    """Exact (f=1): each candidate's score is the mean KL from the dense model of the model without the layers
    removed so far and the candidate; the lowest is removed."""
    model, calib = make_model(), make_calib()
    sel = gradmap_verify(candidates=3, verify_signal="dense_kl").select(model, calib, 2, Cost())
    removed: list[int] = []
    for d in sel.decisions:
        kl = {c: mean_kl(model, without(model, removed + [c]), calib.input_ids) for c in d.verified}
        assert {c: d.scores[c] for c in d.verified} == pytest.approx(kl, rel=1e-4, abs=1e-9)
        assert d.removed == [min(kl, key=lambda c: (kl[c], c))]
        removed += d.removed
    # the shortlists are the screen's, as with the perplexity signal
    ppl = gradmap_verify(candidates=3).select(model, calib, 1, Cost())
    assert sel.decisions[0].verified == ppl.decisions[0].verified


def test_dense_kl_halving_against_independent_computation():
    model, calib = make_model(), make_calib()
    sel = gradmap_verify(candidates=4, verify_fraction=0.25, verify_signal="dense_kl", verify_seed=5).select(
        model, calib, 1, Cost())
    d, order = sel.decisions[0], window_order(WINDOWS, 5)
    kl = {c: [mean_kl(model, without(model, [c]), calib.input_ids[[w]]) for w in range(WINDOWS)] for c in d.verified}
    mean = lambda c, w: sum(kl[c][i] for i in order[:w]) / w  # noqa: E731  (every window has SEQ - 1 predictions)
    first = sorted(d.verified, key=lambda c: (mean(c, 2), c))[:2]
    assert d.removed == [min(first, key=lambda c: (mean(c, 4), c))]
    for c, tokens in zip(d.verified, d.verify_tokens):
        assert d.scores[c] == pytest.approx(mean(c, tokens // T), rel=1e-4)


def test_screen_windows():
    """The screen on s windows is GradMAP's score on those windows (the first of the halving order); s = every
    window is the default."""
    model, calib = make_model(), make_calib()
    sel = gradmap_verify(candidates=3, screen_windows=3, verify_seed=4).select(model, calib, 1, Cost())
    rows = sorted(window_order(WINDOWS, 4)[:3])
    sub = Calibration(input_ids=calib.input_ids[rows], batch_size=calib.batch_size)
    assert sel.decisions[0].gradient_scores == method("metric/gradmap").score(model, sub, Cost()).tolist()
    every = gradmap_verify(candidates=3, screen_windows=WINDOWS).select(model, calib, PRUNE, Cost())
    default = gradmap_verify(candidates=3).select(model, calib, PRUNE, Cost())
    assert [d.as_dict() | {"seconds": 0, "score_seconds": 0, "verify_seconds": 0} for d in every.decisions] == \
        [d.as_dict() | {"seconds": 0, "score_seconds": 0, "verify_seconds": 0} for d in default.decisions]


# ---------------------------------------------------------------------------------- model, bad values

def test_model_unchanged_with_budget_options():
    model, calib = make_model(), make_calib()
    model.model.norm.train()
    before = snapshot(model)
    gradmap_verify(candidates=3, verify_fraction=0.25, screen_every=2, rescreen_at_cut=True, verify_signal="random",
                  verify_positions=6).select(model, calib, PRUNE, Cost())
    assert_unchanged(before, snapshot(model))


@pytest.mark.parametrize("key,value", [("verify_fraction", 0), ("verify_fraction", 1.5), ("verify_fraction", True),
                                       ("screen_every", 0), ("verify_positions", 0), ("rescreen_at_cut", "yes"),
                                       ("verify_signal", "middle"), ("verify_seed", 1.5), ("screen_windows", -1)])
def test_bad_budget_option_refused(key, value):
    with pytest.raises(ConfigError, match=f"{key}="):
        gradmap_verify(**{key: value})


def test_too_many_positions_refused_before_work():
    model, calib = make_model(), make_calib()
    cost = Cost()
    with pytest.raises(ConfigError, match=f"verify_positions=16.*1..{SEQ - 1}"):
        gradmap_verify(verify_signal="last", verify_positions=16).select(model, calib, 1, cost)
    assert cost.backward_tokens == 0
