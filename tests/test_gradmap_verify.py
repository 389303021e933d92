"""GradMAP screening with exact verification (gradmap_verify): its two limits (k=1 is GradMAP, k >= prunable layers is
SLEB), each decision against an independent computation, the token cost of intermediate k, the cost split in the
record, cache reuse, and the guarantee that the model is left as found.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from gradmap import surgery
from gradmap.cache import SelectionCache
from gradmap.data import Calibration
from gradmap.models import tiny_random_llama
from gradmap.selection import Selection, SelectionKind
from gradmap.stages import Cost, count_forward_tokens
from methods.gradmap.verify import GradMAPVerify
from tests.model_state import assert_unchanged, snapshot
from tests.tiny_models import method

ROOT = Path(__file__).resolve().parents[1]
LAYERS, PRUNE = 8, 3


def gradmap_verify(**options):
    """conf/metric/gradmap_verify.yaml's object, with `options` changed."""
    return method("metric/gradmap_verify", **options)


def make_model() -> nn.Module:
    return tiny_random_llama(num_layers=LAYERS, seed=0)


def make_calib(batch_size: int = 2) -> Calibration:
    g = torch.Generator().manual_seed(0)
    return Calibration(input_ids=torch.randint(0, 256, (4, 16), generator=g), batch_size=batch_size)


def counted_select(metric, model, calib, n, **kw):
    cost = Cost()
    with count_forward_tokens(model, cost):
        selection = metric.select(model, calib, n, cost, **kw)
    return selection, cost


def independent_ppl(model: nn.Module, ids: torch.Tensor, drop: list[int]) -> float:
    """Calibration perplexity of a copy of `model` without the original layers `drop` (one batch, no surgery)."""
    ref = copy.deepcopy(model)
    keep = [i for i in range(LAYERS) if i not in drop]
    ref.model.layers = nn.ModuleList([ref.model.layers[i] for i in keep])
    ref.config.num_hidden_layers = len(keep)
    with torch.no_grad():
        return math.exp(float(ref(input_ids=ids, labels=ids, use_cache=False).loss))


# --------------------------------------------------------------------------------------------------- limits

@pytest.mark.parametrize("protect", [(1, 1), (0, 0)])
def test_one_candidate_is_gradmap(protect):
    model, calib = make_model(), make_calib()
    first, last = protect
    gradmap = method("metric/gradmap", target="activations", reduction="first_order", iterative=True,
                            protect_first=first, protect_last=last).select(model, calib, PRUNE, Cost())
    verify, cost = counted_select(gradmap_verify(candidates=1, protect_first=first, protect_last=last),
                                  model, calib, PRUNE)
    assert verify.removed == gradmap.removed
    for d, g in zip(verify.decisions, gradmap.decisions):
        assert d.scores == g.scores and d.gradient_scores == g.scores  # GradMAP's record, bit for bit
        assert d.verified == [] and d.verify_forward_tokens == 0 and d.verify_seconds == 0.0
    # Only the gradient passes: no verification was run.
    assert cost.forward_tokens == cost.backward_tokens == PRUNE * calib.num_tokens


@pytest.mark.parametrize("protect", [(1, 1), (0, 0)])
def test_all_candidates_is_sleb(protect):
    model, calib = make_model(), make_calib()
    first, last = protect
    sleb, _ = counted_select(method("metric/sleb", protect_first=first, protect_last=last), model, calib, PRUNE)
    verify, cost = counted_select(gradmap_verify(candidates=LAYERS, protect_first=first, protect_last=last),
                                  model, calib, PRUNE)
    assert verify.removed == sleb.removed
    prunable = set(range(first, LAYERS - last))
    for d, s in zip(verify.decisions, sleb.decisions):
        # The verified perplexities are SLEB's scores (same computation, same floats, the prunable layers only).
        assert d.scores == s.scores
        present = surgery.kept_indices(LAYERS, sleb.removed[:d.step])
        assert [i for i, v in enumerate(d.scores) if v is not None] == [i for i in present if i in prunable]
        assert d.gradient_scores is None  # every prunable layer is verified: the screen is skipped
        assert d.forward_tokens == s.forward_tokens  # and the same cost, decision by decision
    assert cost.backward_tokens == 0
    assert cost.forward_tokens == sum(len(prunable) - step for step in range(PRUNE)) * calib.num_tokens


def test_the_limits_differ_here():
    """Otherwise the two tests above would not tell GradMAP and SLEB apart on this model."""
    model, calib = make_model(), make_calib()
    gradmap = gradmap_verify(candidates=1).select(model, calib, PRUNE, Cost()).removed
    sleb = method("metric/sleb").select(model, calib, PRUNE, Cost()).removed
    middle = gradmap_verify(candidates=2).select(model, calib, PRUNE, Cost()).removed
    assert len({tuple(gradmap), tuple(sleb), tuple(middle)}) == 3


# -------------------------------------------------------------------------------------- intermediate k

def test_intermediate_k_decisions_against_independent_computation():
    model, calib = make_model(), make_calib(batch_size=4)  # one micro-batch: the independent ppl is one loss
    k = 3
    sel = gradmap_verify(candidates=k).select(model, calib, PRUNE, Cost())
    removed: list[int] = []
    for d in sel.decisions:
        # The screen is GradMAP's score of the current model.
        with surgery.layers_removed(model, sorted(removed)):
            expected = method("metric/gradmap").score(model, calib, Cost())
        kept = surgery.kept_indices(LAYERS, removed)
        assert [d.gradient_scores[i] for i in kept] == expected.tolist()
        assert all(d.gradient_scores[i] is None for i in removed)
        # The candidates: the k lowest screening scores among prunable layers (1..L-2), lowest first.
        prunable = [i for i in kept if 1 <= i <= LAYERS - 2]
        assert d.verified == sorted(prunable, key=lambda i: (d.gradient_scores[i], i))[:k]
        # Their scores are the calibration perplexities without them; nothing else is scored.
        for i in range(LAYERS):
            if i in d.verified:
                assert d.scores[i] == pytest.approx(independent_ppl(model, calib.input_ids, removed + [i]),
                                                    rel=1e-5)
            else:
                assert d.scores[i] is None
        assert d.removed == [min(d.verified, key=lambda i: (d.scores[i], i))]
        removed += d.removed
    assert removed == sel.removed


@pytest.mark.parametrize("k", [2, 3, 5])
def test_intermediate_k_forward_tokens(k):
    model, calib = make_model(), make_calib()
    n = calib.num_tokens
    sel, cost = counted_select(gradmap_verify(candidates=k), model, calib, PRUNE)
    expected_fwd = expected_bwd = 0
    for step in range(PRUNE):
        prunable = (LAYERS - 2) - step
        if prunable > k:  # one forward+backward screen, then k verification forwards
            expected_fwd += n + k * n
            expected_bwd += n
        else:  # all prunable layers verified: no screen
            expected_fwd += prunable * n
    assert (cost.forward_tokens, cost.backward_tokens) == (expected_fwd, expected_bwd)
    # The decisions carry the same totals, and the split adds up.
    assert sel.cost == {"forward_tokens": expected_fwd, "backward_tokens": expected_bwd}
    split = GradMAPVerify.cost_split(sel)
    grad, ver = split["gradient"], split["verification"]
    assert grad["forward_tokens"] + ver["forward_tokens"] == expected_fwd
    assert grad["backward_tokens"] == expected_bwd and ver["backward_tokens"] == 0
    assert grad["forward_tokens"] == grad["passes"] * n and ver["forward_tokens"] == ver["passes"] * n
    assert ver["passes"] == sum(min(k, LAYERS - 2 - s) for s in range(PRUNE))
    assert grad["seconds"] > 0 and ver["seconds"] > 0
    assert sum(d.score_seconds for d in sel.decisions) == pytest.approx(grad["seconds"] + ver["seconds"])
    # Against SLEB, which measures every present prunable layer at every decision (8 layers, 2 protected: 6+5+4 =
    # 15 passes): k=2 costs 3+3+3+... = 11 passes, k=3 as much as SLEB (4+4+4 forward + 3 backward), k=5 more.
    _, sleb = counted_select(method("metric/sleb"), model, calib, PRUNE)
    assert sleb.forward_tokens == sum(LAYERS - 2 - s for s in range(PRUNE)) * n
    total = cost.forward_tokens + cost.backward_tokens
    assert {2: total < sleb.forward_tokens, 3: total == sleb.forward_tokens, 5: total > sleb.forward_tokens}[k]


# ------------------------------------------------------------------------------------------- the model

@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_unchanged_after_select(checkpointing):
    model, calib = make_model(), make_calib()
    # A non-default state, so restoring a blanket default (all trainable, all eval) would be caught.
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.norm.train()
    model.model.layers[2].mlp.down_proj.weight.grad = torch.ones_like(model.model.layers[2].mlp.down_proj.weight)
    before = snapshot(model)
    gradmap_verify(candidates=2, gradient_checkpointing=checkpointing).select(model, calib, PRUNE, Cost())
    assert_unchanged(before, snapshot(model))


# --------------------------------------------------------------------------------- config, record, cache

def test_yaml_values_follow_gradmap_and_sleb():
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "metric" / "gradmap_verify.yaml"))
    assert cfg.pop("_target_") == "methods.gradmap.verify.GradMAPVerify"
    # The screening keys are GradMAP's, with gradmap.yaml's values (protection aside: SLEB's, documented).
    gradmap = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "metric" / "gradmap.yaml"))
    for key in ("target", "reduction", "accum_dtype", "grad_accumulation", "gradient_checkpointing"):
        assert cfg[key] == gradmap[key]
    sleb = OmegaConf.load(ROOT / "conf" / "metric" / "sleb.yaml")
    assert (cfg["protect_first"], cfg["protect_last"]) == (sleb.protect_first, sleb.protect_last)


def test_invalid_candidates_refused():
    with pytest.raises(ValueError, match="candidates=0"):
        gradmap_verify(candidates=0)


def test_selection_round_trips_and_old_entries_load():
    model, calib = make_model(), make_calib()
    sel = gradmap_verify(candidates=2).select(model, calib, PRUNE, Cost())
    data = json.loads(json.dumps(sel.as_dict()))
    assert Selection.from_dict(data) == sel
    # Other metrics' records are unchanged: the verification fields are left out at their defaults.
    plain = method("metric/sleb").select(model, calib, 1, Cost()).as_dict()["decisions"][0]
    assert set(plain) == {"step", "scores", "removed", "seconds", "score_seconds", "forward_tokens",
                          "backward_tokens"}
    assert Selection.from_dict({"removal_order": [3], "decisions": [plain]}).decisions[0].verified == []


def test_prefix_reuse_resumes_and_truncates(tmp_path):
    model, calib = make_model(), make_calib()
    metric = gradmap_verify(candidates=2)
    assert metric.selection_kind is SelectionKind.GREEDY
    full = metric.select(model, calib, PRUNE, Cost())
    cache = SelectionCache(tmp_path)
    cache.store("k", 1, metric.select(model, calib, 1, Cost()), {})
    cached = cache.reusable("k", PRUNE, metric.selection_kind)
    assert cached.removed == full.removed[:1]  # shorter: continued from there
    resumed, cost = counted_select(metric, model, calib, PRUNE, resume=cached)
    assert resumed.removed == full.removed
    assert cost.backward_tokens == 2 * calib.num_tokens  # only the two new decisions were screened
    cache.store("k", PRUNE, resumed, {})
    shorter = cache.reusable("k", 2, metric.selection_kind)
    assert shorter.removed == full.removed[:2] and len(shorter.decisions) == 2  # the first 2 of the longer one


def test_runner_records_the_cost_split(tmp_path):
    from gradmap.jobs import run
    from tests.test_runner import CHOICES, make_cfg

    out = tmp_path / "job"
    rec = run(make_cfg(tmp_path, "metric=gradmap_verify", "metric.candidates=2", "compensation=none"), out,
              {**CHOICES, "metric": "gradmap_verify", "compensation": "none"})
    saved = json.loads((out / "record.json").read_text())
    assert saved["status"] == "done" and rec["status"] == "done"
    split = saved["original_scoring"]["split"]
    tokens = saved["calibration"]["tokens"]
    # tiny_random: 6 layers, 2 removed, 4 prunable: screen + 2 verified at both decisions.
    assert split["gradient"] | {"seconds": 0} == {"passes": 2, "seconds": 0, "forward_tokens": 2 * tokens,
                                                  "backward_tokens": 2 * tokens}
    assert split["verification"]["passes"] == 4 and split["verification"]["forward_tokens"] == 4 * tokens
    assert saved["timings"]["cost"]["score"] == {"forward_tokens": 6 * tokens, "backward_tokens": 2 * tokens,
                                                 "train_tokens": 0}
    assert saved["original_scoring"]["forward_tokens"] == 6 * tokens
