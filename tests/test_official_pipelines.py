"""Baselines as their official pipelines run them (issue 15): SLEB scores only the blocks it may remove (the cost of
official `sleb.py`) and selects what it selected when it also scored the protected ones; Taylor and PPL as
shortened-llm's `src/block_prune.py` prunes (first 4 and last 2 blocks kept); the main tables use those rows."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import hydra.utils
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from gradmap.cache import CACHE_VERSION, model_key, selection_key, stable_hash, without_memory_knobs
from gradmap.data import Calibration
from gradmap.models import tiny_random_llama
from gradmap.stages import Cost, count_forward_tokens
from gradmap.targets import KEY_TARGETS
from tests.tiny_models import method

ROOT = Path(__file__).resolve().parents[1]


def make_calib(seed: int = 0, batch_size: int = 2) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(input_ids=torch.randint(0, 256, (4, 16), generator=g), batch_size=batch_size)


def counted(metric, model, calib, n):
    """Select with the runner's token hook active, and count full-model forward calls too."""
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    cost = Cost()
    try:
        with count_forward_tokens(model, cost):
            selection = metric.select(model, calib, n, cost)
    finally:
        handle.remove()
    return selection, cost, len(calls)


def official_sleb_order(model: nn.Module, ids: torch.Tensor, num_remove: int, early: int, latter: int) -> tuple:
    """The official search loop of `sleb.py` (jiwonsong-dev/SLEB), on model copies: alive_list, j in
    range(early_barrier, len(alive) - latter_barrier), strict `<` (ties: the first), one loss per candidate."""
    alive, removal, scored = list(range(len(model.model.layers))), [], 0
    for _ in range(num_remove):
        best, best_j = math.inf, -1
        for j in range(early, len(alive) - latter):
            ref = copy.deepcopy(model)
            keep = [i for i in alive if i != alive[j]]
            ref.model.layers = nn.ModuleList([ref.model.layers[i] for i in keep])
            ref.config.num_hidden_layers = len(keep)
            with torch.no_grad():
                loss = float(ref(input_ids=ids, labels=ids, use_cache=False).loss)
            scored += 1
            if loss < best:
                best, best_j = loss, j
        removal.append(alive.pop(best_j))
    return removal, scored


# ------------------------------------------------------------------------------------------------------- SLEB

@pytest.mark.parametrize("protect", [(1, 1), (2, 1), (0, 0)])
def test_sleb_scores_only_removable_blocks(protect):
    layers, prune = 8, 3
    first, last = protect
    model, calib = tiny_random_llama(num_layers=layers, seed=0), make_calib()
    sel, cost, calls = counted(method("metric/sleb", protect_first=first, protect_last=last), model, calib, prune)
    candidates = [layers - first - last - step for step in range(prune)]  # present minus protected, per decision
    assert calls == sum(candidates) * calib.num_batches
    assert cost.forward_tokens == sum(candidates) * calib.num_tokens and cost.backward_tokens == 0
    protected = set(range(first)) | set(range(layers - last, layers))
    removed: list[int] = []
    for d, expected in zip(sel.decisions, candidates):
        assert d.forward_tokens == expected * calib.num_tokens  # the decision's own record says the same
        scored = [i for i, s in enumerate(d.scores) if s is not None]
        assert scored == [i for i in range(layers) if i not in protected and i not in removed]
        removed += d.removed
    assert not protected & set(sel.removed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sleb_selects_what_it_selected_before(seed):
    """Before the fix SLEB also scored its protected blocks (the PPL loop, iterative, same protection): the removal
    order and every score of a removable block are the same floats; only the protected blocks' scores are gone."""
    model, calib = tiny_random_llama(num_layers=8, seed=seed), make_calib(seed)
    new, new_cost, _ = counted(method("metric/sleb"), model, calib, 4)
    old, old_cost, _ = counted(method("metric/ppl", iterative=True, protect_first=1, protect_last=1), model, calib, 4)
    assert new.removed == old.removed
    for n, o in zip(new.decisions, old.decisions):
        assert n.scores == [s if 0 < i < 7 else None for i, s in enumerate(o.scores)]
    assert old_cost.forward_tokens - new_cost.forward_tokens == 2 * 4 * calib.num_tokens  # 2 blocks x 4 decisions


@pytest.mark.parametrize("protect", [(1, 1), (2, 2)])
def test_sleb_matches_the_official_search_loop(protect):
    model, calib = tiny_random_llama(num_layers=7, seed=3), make_calib(3, batch_size=4)  # one batch: one loss
    order, scored = official_sleb_order(model, calib.input_ids, 3, *protect)
    sel, cost, _ = counted(method("metric/sleb", protect_first=protect[0], protect_last=protect[1]), model, calib, 3)
    assert sel.removed == order
    assert cost.forward_tokens == scored * calib.num_tokens


def test_sleb_cached_selections_from_before_the_fix_are_not_reused(tmp_path):
    """The removals are the same, but a cached entry's token counts would be the old ones: SLEB's cache key carries
    its scoring revision; every other metric's key is unchanged."""
    from tests.test_runner import make_cfg

    for metric, revision in (("sleb", 1), ("gradmap", 0), ("ppl", 0)):
        cfg = make_cfg(tmp_path, f"metric={metric}")
        # the key as it was computed before: no window_bos key, no memory-only metric keys (issues 20, 17), the
        # class path from before the methods moved (issue 19)
        metric_node = without_memory_knobs(OmegaConf.to_container(cfg.metric, resolve=True))
        metric_node["_target_"] = KEY_TARGETS[metric_node["_target_"]]
        parts = {"model": model_key(cfg, False), "metric": metric_node,
                 "calibration": OmegaConf.to_container(cfg.calibration, resolve=True),
                 "seed": cfg.seed, "dtype": cfg.get("dtype"), "v": CACHE_VERSION}
        old_key = stable_hash(parts)
        assert (selection_key(cfg, False) == old_key) == (revision == 0), metric
        if revision:
            assert selection_key(cfg, False) == stable_hash({**parts, "scoring_revision": revision})


# ------------------------------------------------------------------------------------- Taylor+ and PPL+

def official_block_prune(order: list[int], num_layers: int, n: int) -> list[int]:
    """shortened-llm `src/block_prune.py` without --no_plus_heuristic: drop blocks 0-3, L-2, L-1 from the
    unimportance order, then prune the first n."""
    keep = [0, 1, 2, 3, num_layers - 2, num_layers - 1]
    return [i for i in order if i not in keep][:n]


@pytest.mark.parametrize("name", ["taylor_plus", "ppl_plus"])
def test_plus_variants_prune_as_the_official_block_prune(name, monkeypatch):
    """Scores that make the protected blocks the least important: the plus variants still keep them and prune what
    block_prune.py prunes from the same order; the plain criteria (the ablation rows) take them."""
    layers, n = 10, 3
    model, calib = tiny_random_llama(num_layers=layers, seed=0), make_calib()
    fake = torch.tensor([0.1, 0.2, 0.3, 0.4, 5.0, 2.0, 3.0, 1.0, 0.05, 0.06], dtype=torch.float64)
    plus = hydra.utils.instantiate(OmegaConf.load(ROOT / "conf" / "metric" / f"{name}.yaml"))
    plain = hydra.utils.instantiate(OmegaConf.load(ROOT / "conf" / "metric" / f"{name.split('_')[0]}.yaml"))
    assert (plus.protect_first, plus.protect_last) == (4, 2) and (plain.protect_first, plain.protect_last) == (0, 0)
    monkeypatch.setattr(type(plus), "score", lambda self, m, c, cost: fake.clone())
    order = sorted(range(layers), key=lambda i: (float(fake[i]), i))  # the official unimportance order
    assert plus.select(model, calib, n, Cost()).removed == official_block_prune(order, layers, n) == [7, 5, 6]
    assert plain.select(model, calib, n, Cost()).removed == order[:n] == [8, 9, 0]


def test_ppl_plus_is_ppl_with_the_official_protection():
    ppl = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "metric" / "ppl.yaml"))
    plus = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "metric" / "ppl_plus.yaml"))
    assert {**ppl, "protect_first": 4, "protect_last": 2} == plus
    taylor = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "metric" / "taylor.yaml"))
    taylor_plus = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "metric" / "taylor_plus.yaml"))
    assert {**taylor, "protect_first": 4, "protect_last": 2} == taylor_plus


@pytest.mark.parametrize("name", ["paper_main", "paper_accuracy"])
def test_main_tables_use_the_official_taylor_and_ppl_rows(name):
    params = OmegaConf.load(ROOT / "conf" / "experiment" / f"{name}.yaml").hydra.sweeper.params
    metrics = [m.strip() for m in str(params.metric).split(",")]
    assert {"taylor_plus", "ppl_plus", "sleb", "gradmap", "gradmap_verify", "bi", "streamline", "angular"} \
        <= set(metrics)
    assert "ppl" not in metrics and "taylor" in metrics  # plain Taylor: the ablation row
