"""Baseline metrics: the contract every `conf/metric/**/*.yaml` must keep, and each formula on a hand-made case."""

from __future__ import annotations

import copy
import inspect
import math
from pathlib import Path

import hydra.utils
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from baselines.angular import AngularSpan
from baselines.bi import BlockInfluence
from baselines.ppl import PerplexityDrop
from baselines.random_metric import RandomMetric
from baselines.sleb import SLEB
from baselines.streamline import StreamlineSpan
from baselines.taylor import BlockTaylor
from gradmap import surgery
from gradmap.metric import Calibration, Cost, count_forward_tokens
from gradmap.models import tiny_random_llama
from tests.model_state import assert_unchanged, snapshot

METRIC_DIR = Path(__file__).resolve().parents[1] / "conf" / "metric"
METRIC_YAMLS = sorted(METRIC_DIR.glob("**/*.yaml"))


def make_calib(batch_size: int = 2, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(input_ids=torch.randint(0, 256, (4, 16), generator=g), batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------- contract

def comparable(selection) -> dict:
    out = selection.as_dict()
    for d in out["decisions"]:
        d.pop("seconds")
        d.pop("score_seconds")
    return out


@pytest.mark.parametrize("path", METRIC_YAMLS, ids=lambda p: str(p.relative_to(METRIC_DIR)))
def test_metric_config_contract(path: Path):
    check_contract(OmegaConf.load(path))


# The memory-saving path switches model-wide settings on and off, so it gets the same contract.
@pytest.mark.parametrize("path", [p for p in METRIC_YAMLS if "gradient_checkpointing" in OmegaConf.load(p)],
                         ids=lambda p: str(p.relative_to(METRIC_DIR)))
def test_metric_config_contract_gradient_checkpointing(path: Path):
    cfg = OmegaConf.load(path)
    cfg.gradient_checkpointing = True
    check_contract(cfg)


def check_contract(cfg) -> None:
    num_prune = 2
    protected = int(cfg.get("protect_first", 0)) + int(cfg.get("protect_last", 0))
    # Taylor+ protects 6 layers, so the model must be deep enough to leave num_prune candidates.
    model = tiny_random_llama(num_layers=max(6, protected + num_prune + 1))
    # A non-default state, so that restoring a blanket default (all trainable, all eval) would be caught.
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.norm.train()
    calib = make_calib()
    before = snapshot(model)

    runs = []
    for _ in range(2):
        metric = hydra.utils.instantiate(cfg)
        cost = Cost()
        with count_forward_tokens(model, cost):
            runs.append(metric.select(model, calib, num_prune, cost))
        assert_unchanged(before, snapshot(model))
        assert cost.forward_tokens >= 0 and cost.backward_tokens >= 0
    selection = runs[0]
    assert comparable(runs[0]) == comparable(runs[1]), "not deterministic"

    n = len(before["layers"])
    removed = selection.removed
    assert len(removed) == num_prune and len(set(removed)) == num_prune
    assert all(metric.protect_first <= i < n - metric.protect_last for i in removed)
    assert [i for d in selection.decisions for i in d.removed] == removed
    gone: set[int] = set()
    for d in selection.decisions:
        assert len(d.scores) == n
        assert all(d.scores[i] is None for i in gone), "a removed layer was scored"
        present = [s for s in d.scores if s is not None]
        assert present and all(math.isfinite(s) for s in present)
        gone.update(d.removed)


@pytest.mark.parametrize("path", METRIC_YAMLS, ids=lambda p: str(p.relative_to(METRIC_DIR)))
def test_metric_config_lists_every_argument(path: Path):
    cfg = OmegaConf.load(path)
    target = hydra.utils.get_class(cfg._target_)
    args = set(inspect.signature(target.__init__).parameters) - {"self"}
    assert set(cfg) - {"_target_"} == args


# ------------------------------------------------------------------------------------------ hand-made layers

class Fn(nn.Module):
    """A stand-in decoder layer with a known output: hidden -> fn(hidden)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, hidden_states, **_):
        return self.fn(hidden_states)


def rot(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) per pair of coordinates: exactly orthogonal to x, same norm."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rot_last(x: torch.Tensor) -> torch.Tensor:
    """Rotate only the last position of each sequence."""
    return torch.cat((x[:, :-1], rot(x[:, -1:])), dim=1)


def scale(a: float):
    return lambda x: a * x


def hand_model(*fns) -> nn.Module:
    model = tiny_random_llama(num_layers=len(fns))
    model.model.layers = nn.ModuleList(Fn(f) for f in fns)
    return model


def test_block_influence_known_layers():
    model = hand_model(scale(2.0), scale(-1.0), rot, scale(1.0))
    calib = make_calib()
    cosine = BlockInfluence().score(model, calib, Cost())
    assert cosine.tolist() == pytest.approx([0.0, 2.0, 1.0, 0.0], abs=1e-6)  # 1 - cos: same dir, opposite, orthogonal
    ang = BlockInfluence(distance="angular").score(model, calib, Cost())
    assert ang.tolist() == pytest.approx([0.0, 1.0, 0.5, 0.0], abs=1e-6)  # arccos(cos)/pi
    # Removing the lowest BI: the two layers that do not change the direction.
    assert sorted(BlockInfluence().select(model, calib, 2, Cost()).removed) == [0, 3]


def test_block_influence_token_positions():
    model = hand_model(rot_last, scale(1.0))
    calib = make_calib()
    assert BlockInfluence(tokens="all").score(model, calib, Cost())[0] == pytest.approx(1 / 16, abs=1e-6)
    assert BlockInfluence(tokens="last").score(model, calib, Cost())[0] == pytest.approx(1.0, abs=1e-6)


SPAN_LAYERS = (rot, scale(3.0), rot, scale(2.0), scale(0.5), rot)  # only layers 3..4 map x -> x


@pytest.mark.parametrize("cls,far", [(StreamlineSpan, 1.0), (AngularSpan, 0.5)])
def test_span_picks_most_similar(cls, far):
    model = hand_model(*SPAN_LAYERS)
    sel = cls().select(model, make_calib(), 2, Cost())
    assert sel.removed == [3, 4]
    (decision,) = sel.decisions
    assert decision.scores[:5] == pytest.approx([far, far, far, 0.0, far], abs=1e-6)
    assert decision.scores[5] is None  # a span of 2 cannot start at the last layer


def test_span_respects_protection():
    model = hand_model(*SPAN_LAYERS)
    sel = StreamlineSpan(protect_last=2).select(model, make_calib(), 2, Cost())
    assert sel.decisions[0].scores[3:] == [None, None, None]
    assert sel.removed in ([0, 1], [1, 2], [2, 3])  # all allowed spans are orthogonal: a tie up to rounding


def test_angular_uses_last_token_by_default():
    model = hand_model(scale(1.0), rot_last, scale(1.0))
    last = AngularSpan().select(model, make_calib(), 1, Cost()).decisions[0].scores
    assert last == pytest.approx([0.0, 0.5, 0.0], abs=1e-6)
    every = AngularSpan(tokens="all").select(model, make_calib(), 1, Cost()).decisions[0].scores
    assert every == pytest.approx([0.0, 0.5 / 16, 0.0], abs=1e-6)


# ---------------------------------------------------------------------------------------- gradients / ppl

@pytest.mark.parametrize("batch_size", [2, 4])  # 2: accumulated over micro-batches; 4: the single-batch path
def test_block_taylor_matches_autograd(batch_size):
    model = tiny_random_llama(num_layers=4)
    calib = make_calib(batch_size)
    cost = Cost()
    scores = BlockTaylor(accum_dtype="float64").score(model, calib, cost)
    assert cost.backward_tokens == calib.num_tokens

    ids = calib.input_ids  # equal-length rows: the full-batch mean loss is one forward over all of them
    layers = list(model.model.layers)
    params = [list(layer.parameters()) for layer in layers]
    grads = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, [p for ps in params for p in ps])
    it = iter(grads)
    expected = [sum(float((p.detach().double() * next(it).double()).abs().sum()) for p in ps) for ps in params]
    assert scores.tolist() == pytest.approx(expected, rel=1e-4)


def manual_ppl(model: nn.Module, ids: torch.Tensor, drop: list[int]) -> float:
    pruned = copy.deepcopy(model)
    surgery.remove_layers(pruned, drop)
    with torch.no_grad():
        return math.exp(float(pruned(input_ids=ids, labels=ids).loss))


def test_perplexity_drop_matches_manual_removal():
    model = tiny_random_llama(num_layers=4)
    calib = make_calib()
    scores = PerplexityDrop().score(model, calib, Cost())
    expected = [manual_ppl(model, calib.input_ids, [i]) for i in range(4)]
    assert scores.tolist() == pytest.approx(expected, rel=1e-5)


def test_sleb_rescores_after_each_removal():
    model = tiny_random_llama(num_layers=4)
    calib = make_calib()
    first, second = SLEB().select(model, calib, 2, Cost()).decisions
    ids = calib.input_ids
    assert first.scores == pytest.approx([manual_ppl(model, ids, [i]) for i in range(4)], rel=1e-5)
    (r,) = first.removed
    assert first.scores[r] == min(first.scores)
    assert second.scores[r] is None
    for j in (j for j in range(4) if j != r):
        assert second.scores[j] == pytest.approx(manual_ppl(model, ids, sorted([r, j])), rel=1e-5)


def test_random_is_seeded():
    model = tiny_random_llama(num_layers=6)
    calib = make_calib()
    a = RandomMetric(seed=1).score(model, calib, Cost())
    assert torch.equal(a, RandomMetric(seed=1).score(model, calib, Cost()))
    assert not torch.equal(a, RandomMetric(seed=2).score(model, calib, Cost()))
    sel = RandomMetric(seed=1).select(model, calib, 2, Cost())
    assert sorted(sel.removed) == sorted(torch.argsort(a)[:2].tolist())
