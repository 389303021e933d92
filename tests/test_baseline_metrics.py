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

from gradmap import surgery
from gradmap.capture import collect_layer_io
from gradmap.data import Calibration
from gradmap.models import tiny_random_llama
from gradmap.stages import Cost, count_forward_tokens
from tests.model_state import assert_unchanged, snapshot
from tests.tiny_models import method

METRIC_DIR = Path(__file__).resolve().parents[1] / "conf" / "metric"
METRIC_YAMLS = sorted(METRIC_DIR.glob("**/*.yaml"))


def make_calib(batch_size: int = 2, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(input_ids=torch.randint(0, 256, (4, 16), generator=g), batch_size=batch_size)


def hf_hidden_states(model: nn.Module, calib: Calibration) -> list[torch.Tensor]:
    """HF `output_hidden_states` over the whole calibration set, as the official codes read them: entry i enters
    layer i, the last entry is the last layer's output after the final norm. [N tokens, d] each, float64."""
    with torch.no_grad():
        hs = model(input_ids=calib.input_ids, output_hidden_states=True).hidden_states
    return [h.double().flatten(0, -2) for h in hs]


def mean_cos_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean())


def with_random_final_norm(model: nn.Module) -> nn.Module:
    """A final-norm scale that is not all ones, so that the norm changes the last state's direction (a unit RMSNorm
    only rescales each token, which no cosine can see)."""
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.rand(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
                                      * 2 + 0.1)
    return model


# ---------------------------------------------------------------------------------------------------- contract

def comparable(selection) -> dict:
    out = selection.as_dict()
    for d in out["decisions"]:
        for key in [k for k in d if k.endswith("seconds")]:  # wall times (seconds, score_seconds, verify_seconds)
            d.pop(key)
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
    cosine = method("metric/bi").score(model, calib, Cost())
    assert cosine.tolist() == pytest.approx([0.0, 2.0, 1.0, 0.0], abs=1e-6)  # 1 - cos: same dir, opposite, orthogonal
    ang = method("metric/bi", distance="angular").score(model, calib, Cost())
    assert ang.tolist() == pytest.approx([0.0, 1.0, 0.5, 0.0], abs=1e-6)  # arccos(cos)/pi
    # Removing the lowest BI: the two layers that do not change the direction.
    assert sorted(method("metric/bi").select(model, calib, 2, Cost()).removed) == [0, 3]


def test_block_influence_token_positions():
    model = hand_model(rot_last, scale(1.0))
    calib = make_calib()
    assert method("metric/bi", tokens="all").score(model, calib, Cost())[0] == pytest.approx(1 / 16, abs=1e-6)
    assert method("metric/bi", tokens="last").score(model, calib, Cost())[0] == pytest.approx(1.0, abs=1e-6)


def test_block_influence_last_state_is_final_normed_by_default():
    """Reference ShortGPT code: BI_i from HF hidden_states[i], [i+1], so the last layer's output is final-normed."""
    model = with_random_final_norm(tiny_random_llama(num_layers=4))
    calib = make_calib()
    hs = hf_hidden_states(model, calib)
    bi = method("metric/bi").score(model, calib, Cost())
    assert bi.tolist() == pytest.approx([mean_cos_distance(hs[i], hs[i + 1]) for i in range(4)], rel=1e-5)
    # The last entry by hand: input of the last layer vs final_norm(its raw output).
    (inp, out), = collect_layer_io(model, calib.input_ids, [3]).values()
    with torch.no_grad():
        normed = model.model.norm(out)
    assert bi[3] == pytest.approx(mean_cos_distance(inp.double().flatten(0, -2), normed.double().flatten(0, -2)),
                                  rel=1e-5)
    raw = method("metric/bi", last_state="raw").score(model, calib, Cost())
    assert raw[:3].tolist() == pytest.approx(bi[:3].tolist(), rel=1e-9)  # only the last layer's BI differs
    assert raw[3] == pytest.approx(mean_cos_distance(inp.double().flatten(0, -2), out.double().flatten(0, -2)),
                                   rel=1e-5)
    assert abs(raw[3] - bi[3]) > 1e-3  # the case does tell the two apart


SPAN_LAYERS = (rot, scale(3.0), rot, scale(2.0), scale(0.5), rot)  # only layers 3..4 map x -> x


# StreamlineSpan's default (official) criterion also takes in the layer before the span: tested separately below.
@pytest.mark.parametrize("make,far", [(lambda: method("metric/streamline", criterion="span_only"), 1.0),
                                      (lambda: method("metric/angular"), 0.5)],
                         ids=["streamline_span_only", "angular"])
def test_span_picks_most_similar(make, far):
    model = hand_model(*SPAN_LAYERS)
    sel = make().select(model, make_calib(), 2, Cost())
    assert sel.removed == [3, 4]
    (decision,) = sel.decisions
    assert decision.scores[:5] == pytest.approx([far, far, far, 0.0, far], abs=1e-6)
    assert decision.scores[5] is None  # a span of 2 cannot start at the last layer


def test_span_respects_protection():
    model = hand_model(*SPAN_LAYERS)
    sel = method("metric/streamline", criterion="span_only", protect_last=2).select(model, make_calib(), 2, Cost())
    assert sel.decisions[0].scores[3:] == [None, None, None]
    assert sel.removed in ([0, 1], [1, 2], [2, 3])  # all allowed spans are orthogonal: a tie up to rounding


def neg_rot(x: torch.Tensor) -> torch.Tensor:
    return -rot(x)  # the inverse of rot: rot then neg_rot is the identity


def test_streamline_official_criterion_includes_the_kept_layer():
    # h0 = x, h1 = rot x, h2 = x, h3 = -x, h4 = -x (final norm of scale ones: same direction).
    model = hand_model(rot, neg_rot, scale(-1.0), scale(1.0))
    official = method("metric/streamline").select(model, make_calib(), 1, Cost())
    (decision,) = official.decisions
    # Span s = b+1 scored by 1 - cos(h_b, h_{b+2}); no span may start at layer 0 (no kept layer before it).
    assert decision.scores[0] is None
    assert decision.scores[1:] == pytest.approx([0.0, 1.0, 2.0], abs=1e-6)
    assert official.removed == [1]  # layers 0..1 together do nothing: drop layer 1, layer 0 is then retrained
    # The earlier reading compares each span's own input and output: layer 3 alone does nothing.
    span_only = method("metric/streamline", criterion="span_only").select(model, make_calib(), 1, Cost())
    assert span_only.decisions[0].scores == pytest.approx([1.0, 1.0, 2.0, 0.0], abs=1e-6)
    assert span_only.removed == [3]


def test_streamline_official_matches_hf_hidden_states():
    """Official get_cosine.py with layer_intervals = n + 1: cos(hidden_states[b], hidden_states[b+n+1]) for
    b = 0..L-n-1, HF's last entry final-normed; the span b+1..b+n of the best b is removed."""
    num_layers, n = 6, 2
    model = with_random_final_norm(tiny_random_llama(num_layers=num_layers))
    calib = make_calib()
    hs = hf_hidden_states(model, calib)
    expected = [mean_cos_distance(hs[b], hs[b + n + 1]) for b in range(num_layers - n)]
    sel = method("metric/streamline").select(model, calib, n, Cost())
    (decision,) = sel.decisions
    assert decision.scores[0] is None and decision.scores[num_layers - n + 1:] == [None] * (n - 1)
    assert decision.scores[1:num_layers - n + 1] == pytest.approx(expected, rel=1e-5)
    b = min(range(len(expected)), key=expected.__getitem__)
    assert sel.removed == list(range(b + 1, b + n + 1))
    # The span ending at the last layer was compared after the final norm, not with the raw output.
    (out,) = [o for _, o in collect_layer_io(model, calib.input_ids, [num_layers - 1]).values()]
    raw = mean_cos_distance(hs[num_layers - n - 1], out.double().flatten(0, -2))
    assert abs(decision.scores[num_layers - n] - raw) > 1e-3


def test_streamline_official_refuses_a_span_that_cannot_fit():
    model = hand_model(*SPAN_LAYERS)
    with pytest.raises(ValueError, match="layer 0"):
        metric = method("metric/streamline", protect_last=1)
        metric.select(model, make_calib(), 5, Cost())  # only 1..5 minus the last: 4 layers


def test_angular_uses_last_token_by_default():
    model = hand_model(scale(1.0), rot_last, scale(1.0))
    last = method("metric/angular").select(model, make_calib(), 1, Cost()).decisions[0].scores
    assert last == pytest.approx([0.0, 0.5, 0.0], abs=1e-6)
    every = method("metric/angular", tokens="all").select(model, make_calib(), 1, Cost()).decisions[0].scores
    assert every == pytest.approx([0.0, 0.5 / 16, 0.0], abs=1e-6)


# ---------------------------------------------------------------------------------------- gradients / ppl

@pytest.mark.parametrize("batch_size", [2, 4])  # 2: accumulated over micro-batches; 4: the single-batch path
def test_block_taylor_matches_autograd(batch_size):
    model = tiny_random_llama(num_layers=4)
    calib = make_calib(batch_size)
    cost = Cost()
    scores = method("metric/taylor", accum_dtype="float64").score(model, calib, cost)
    assert cost.backward_tokens == calib.num_tokens

    ids = calib.input_ids  # equal-length rows: the full-batch mean loss is one forward over all of them
    layers = list(model.model.layers)
    params = [list(layer.parameters()) for layer in layers]
    grads = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, [p for ps in params for p in ps])
    it = iter(grads)
    expected = [sum(float((p.detach().double() * next(it).double()).abs().sum()) for p in ps) for ps in params]
    assert scores.tolist() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("batch_size", [2, 4])
def test_block_taylor_leaves_biases_out_by_default(batch_size):
    """Official anal_block_sensitivity_taylor.py scores parameters whose name contains "weight": no biases."""
    model = tiny_random_llama(num_layers=4, attention_bias=True, mlp_bias=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # HF initialises biases to zero, where |b * dL/db| would be 0 anyway
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    calib = make_calib(batch_size)
    ids = calib.input_ids
    named = [list(layer.named_parameters()) for layer in model.model.layers]
    assert all(any(name.endswith("bias") for name, _ in ps) for ps in named)
    grads = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, [p for ps in named for _, p in ps])
    it = iter(grads)
    terms = [[(name, float((p.detach().double() * next(it).double()).abs().sum())) for name, p in ps] for ps in named]

    weights = method("metric/taylor", accum_dtype="float64").score(model, calib, Cost())
    assert weights.tolist() == pytest.approx([sum(t for name, t in ts if "weight" in name) for ts in terms], rel=1e-4)
    every = method("metric/taylor", accum_dtype="float64", parameters="all").score(model, calib, Cost())
    assert every.tolist() == pytest.approx([sum(t for _, t in ts) for ts in terms], rel=1e-4)
    assert all(e > w * (1 + 1e-3) for e, w in zip(every.tolist(), weights.tolist()))  # the biases did count there


def manual_ppl(model: nn.Module, ids: torch.Tensor, drop: list[int]) -> float:
    pruned = copy.deepcopy(model)
    surgery.remove_layers(pruned, drop)
    with torch.no_grad():
        return math.exp(float(pruned(input_ids=ids, labels=ids).loss))


def test_perplexity_drop_matches_manual_removal():
    model = tiny_random_llama(num_layers=4)
    calib = make_calib()
    scores = method("metric/ppl").score(model, calib, Cost())
    expected = [manual_ppl(model, calib.input_ids, [i]) for i in range(4)]
    assert scores.tolist() == pytest.approx(expected, rel=1e-5)


def test_sleb_rescores_after_each_removal():
    model = tiny_random_llama(num_layers=4)
    calib = make_calib()
    first, second = method("metric/sleb", protect_first=0, protect_last=0).select(model, calib, 2, Cost()).decisions
    ids = calib.input_ids
    assert first.scores == pytest.approx([manual_ppl(model, ids, [i]) for i in range(4)], rel=1e-5)
    (r,) = first.removed
    assert first.scores[r] == min(first.scores)
    assert second.scores[r] is None
    for j in (j for j in range(4) if j != r):
        assert second.scores[j] == pytest.approx(manual_ppl(model, ids, sorted([r, j])), rel=1e-5)


def test_sleb_never_removes_the_first_or_last_block(monkeypatch):
    """Official sleb.py (early_barrier=1, latter_barrier=1) skips the first and the last remaining block, even when
    removing them would hurt least; here forced with a fake calibration perplexity."""
    model = tiny_random_llama(num_layers=6)
    originals = list(model.model.layers)
    cheap = {0: 1.0, 5: 2.0}  # removing block 0 or 5 looks best; any other block i costs 10 + i

    def fake_ppl(m, _calib):
        present = {id(layer) for layer in surgery.get_decoder_layers(m)}
        return sum(cheap.get(i, 10.0 + i) for i, layer in enumerate(originals) if id(layer) not in present)

    monkeypatch.setattr("methods.baselines.ppl.calibration_perplexity", fake_ppl)
    sel = method("metric/sleb").select(model, make_calib(), 3, Cost())
    assert sel.removed == [1, 2, 3]
    for d in sel.decisions:  # blocks 0 and 5 are not even scored (official: the search range skips them)
        assert d.scores[0] is None and d.scores[5] is None
    # Scoring them too (the old loop) shows they were the cheapest removals, and still never removed.
    old = method("metric/ppl", iterative=True, protect_first=1, protect_last=1).select(model, make_calib(), 3, Cost())
    assert old.removed == [1, 2, 3]
    for d in old.decisions:
        present = [s for s in d.scores if s is not None]
        assert sorted(present)[:2] == sorted([d.scores[0], d.scores[5]])
    unprotected = method("metric/sleb", protect_first=0, protect_last=0)
    assert unprotected.select(model, make_calib(), 3, Cost()).removed == [0, 5, 1]


def test_random_is_seeded():
    model = tiny_random_llama(num_layers=6)
    calib = make_calib()
    a = method("metric/random", seed=1).score(model, calib, Cost())
    assert torch.equal(a, method("metric/random", seed=1).score(model, calib, Cost()))
    assert not torch.equal(a, method("metric/random", seed=2).score(model, calib, Cost()))
    sel = method("metric/random", seed=1).select(model, calib, 2, Cost())
    assert sorted(sel.removed) == sorted(torch.argsort(a)[:2].tolist())
