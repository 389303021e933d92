"""Compensations: the contract every `conf/compensation/**/*.yaml` must keep, and each baseline's formula on a small
case. Dense references are computed here independently of the code under test (layer hooks inside `dense_view`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra.utils
import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from gradmap import surgery
from gradmap.capture import collect_layer_io
from gradmap.compensation import IncompatibleCompensationError
from gradmap.data import Calibration
from gradmap.models import tiny_random_llama
from gradmap.stages import Cost
from methods.baselines.prune_and_comp import PruneAndComp
from methods.baselines.streamline_comp import StreamlineTraining
from tests.tiny_models import method

COMP_DIR = Path(__file__).resolve().parents[1] / "conf" / "compensation"
COMP_YAMLS = sorted(COMP_DIR.glob("**/*.yaml"))
REMOVE = [2, 3]


def make_calib(seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randint(0, 256, (8, 16), generator=g), batch_size=4)


def outputs(model, calib, position):
    """Output of decoder layer `position` per calibration batch (float64)."""
    return [collect_layer_io(model, b, [position])[position][1].double() for b in calib.batches()]


def rel_error(pruned, dense):
    return sum(float((p - d).pow(2).sum()) for p, d in zip(pruned, dense)) / sum(float(d.pow(2).sum()) for d in dense)


def mean_norm(states):
    return torch.cat([h.flatten(0, -2).norm(dim=-1) for h in states]).mean().item()


def n_params(model):
    return sum(p.numel() for p in model.parameters())  # parameters() counts a tied matrix once


# ---------------------------------------------------------------------------------------------------- contract

def test_every_expected_config_exists():
    names = {p.stem for p in COMP_YAMLS}
    assert {"none", "projection", "replaceme", "prune_and_comp", "streamline_layer", "streamline_ffn"} <= names


@pytest.mark.parametrize("yaml_path", COMP_YAMLS, ids=lambda p: str(p.relative_to(COMP_DIR)))
def test_contract(yaml_path):
    text = yaml_path.read_text()
    assert text.startswith("#") and "python run.py compensation=" in text, "header comment with a command"
    comp = hydra.utils.instantiate(OmegaConf.load(yaml_path))
    model = tiny_random_llama(num_layers=6)
    calib = make_calib()
    comp.check_compatible(model, [])  # as the runner does, before selection
    removed = surgery.remove_layers(model, REMOVE)
    with surgery.dense_view(model, removed):
        dense = outputs(model, calib, 5)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    params_before = n_params(model)
    pruned_before = outputs(model, calib, 3)
    error_before = rel_error(pruned_before, dense)

    cost = Cost()
    report = comp.apply(model, removed, calib, cost)
    json.dumps(report)  # goes into record.json
    pruned = outputs(model, calib, 3)

    assert surgery.num_layers(model) == 6 - len(REMOVE) == model.config.num_hidden_layers
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    if yaml_path.stem == "none":
        surgery.assert_same_weights(before_state, model.state_dict())
        return
    if isinstance(comp, PruneAndComp):
        # A magnitude compensation lowers the MSE only where the missing layers' writes are aligned with the stream
        # (cos(h_p, h_d) > (s+1)/(2s)), as in trained LLMs; on a random model they are not, so check its own
        # objective: the magnitude gap at the final output shrinks.
        assert abs(mean_norm(pruned) - mean_norm(dense)) < abs(mean_norm(pruned_before) - mean_norm(dense))
    else:
        assert rel_error(pruned, dense) < error_before
    extra = n_params(model) - params_before
    assert extra == 0 or (report.get("untied_embeddings") and report.get("extra_parameters") == extra)
    if isinstance(comp, StreamlineTraining):  # a compensation that trains books its training separately
        assert report["train_seconds"] > 0 and cost.train_tokens > 0 and report["final_train_loss"] >= 0


# ---------------------------------------------------------------------------------------------------- formulas

def test_replaceme_map_is_least_squares():
    model = tiny_random_llama(num_layers=6)
    calib = make_calib()
    removed = surgery.remove_layers(model, REMOVE)
    layer = surgery.get_decoder_layers(model)[1]  # original layer 1, right before the gap
    with surgery.dense_view(model, removed):
        target = torch.cat([h.flatten(0, -2) for h in outputs(model, calib, 3)])  # dense state after the gap
    ys, hs = [], []
    handle = layer.mlp.down_proj.register_forward_hook(lambda _m, _a, out: ys.append(out.detach().double()))
    try:
        hs = torch.cat([h.flatten(0, -2) for h in outputs(model, calib, 1)])
    finally:
        handle.remove()
    y = torch.cat([t.flatten(0, -2) for t in ys])
    t = target - (hs - y)  # what the MLP should have written: dense state after the gap minus the residual
    expected = torch.linalg.lstsq(y, t).solution
    w0 = layer.mlp.down_proj.weight.detach().double().clone()

    report = method("compensation/replaceme").apply(model, removed, calib, Cost())
    assert [s["original_layer"] for s in report["sites"]] == [1] and report["uncompensated_gaps"] == []
    torch.testing.assert_close(layer.mlp.down_proj.weight.double(), expected.T @ w0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("guard", ["none", "final_error"])
def test_replaceme_has_no_guard_by_default(monkeypatch, guard):
    """Official ReplaceMe/lstsq.py folds every estimated map unchecked: a fold that raises the final error is kept.
    The guard (GradMAP projection's) is only an option. The harmful fit is forced: T = 8 I."""
    assert method("compensation/replaceme").guard == "none"
    model = tiny_random_llama(num_layers=6)
    removed = surgery.remove_layers(model, REMOVE)
    monkeypatch.setattr("methods.gradmap.projection.fit_projection",
                        lambda yty, ytt, alpha: 8.0 * torch.eye(yty.shape[0], dtype=torch.float64))
    comp = method("compensation/replaceme") if guard == "none" else method("compensation/replaceme", guard=guard)
    report = comp.apply(model, removed, make_calib(), Cost())
    assert [s["original_layer"] for s in report["sites"]] == [1] and report["guard"] == guard
    if guard == "none":
        assert report["sites"][0]["kept"] and report["sites_undone"] == []
        assert report["final_rel_error_after"] > report["final_rel_error_before"]
    else:
        assert report["sites_undone"] == [1]
        assert report["final_rel_error_after"] == pytest.approx(report["final_rel_error_before"], rel=1e-9)


def test_replaceme_refuses_underdetermined_least_squares():
    model = tiny_random_llama(num_layers=6)
    removed = surgery.remove_layers(model, REMOVE)
    with pytest.raises(ValueError, match="hidden_size"):
        method("compensation/replaceme").apply(model, removed, Calibration(torch.randint(0, 256, (1, 8)), 1), Cost())


def test_prune_and_comp_scale_is_the_norm_ratio_and_folds_exactly():
    # Tiny eps: the random model's hidden states are so small (mean square ~5e-4) that the default 1e-6 would show.
    model = tiny_random_llama(num_layers=6, rms_norm_eps=1e-12)
    calib = make_calib()
    removed = surgery.remove_layers(model, REMOVE)
    with surgery.dense_view(model, removed):
        dense = outputs(model, calib, 3)
    at_gap = outputs(model, calib, 1)
    s = mean_norm(dense) / mean_norm(at_gap)

    comp = method("compensation/prune_and_comp", iterative=False, ratio="token_l2")
    report = comp.apply(model, removed, calib, Cost())
    (site,) = report["sites"]
    assert site["gap"] == [2, 3] and site["kept_position_before"] == 1
    assert site["scale"] == pytest.approx(s, rel=1e-6)
    # The fold is "hidden state at the gap times s" (exact up to RMSNorm's epsilon) ...
    for new, old in zip(outputs(model, calib, 1), at_gap):
        torch.testing.assert_close(new, s * old, rtol=1e-5, atol=1e-8)
    # ... so the magnitude there now matches the dense model's.
    assert mean_norm(outputs(model, calib, 1)) == pytest.approx(mean_norm(dense), rel=1e-4)


def test_prune_and_comp_unties_tied_embeddings_and_reports_it():
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    head = model.lm_head.weight.detach().clone()
    removed = surgery.remove_layers(model, [1])
    params = n_params(model)
    calib = Calibration(torch.randint(0, 64, (4, 8)), 2)
    report = method("compensation/prune_and_comp").apply(model, removed, calib, Cost())
    assert report["untied_embeddings"] and report["extra_parameters"] == 64 * 16 == n_params(model) - params
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    torch.testing.assert_close(model.lm_head.weight, head)  # the LM head is not scaled
    torch.testing.assert_close(model.model.embed_tokens.weight, report["sites"][0]["scale"] * head)


@pytest.mark.parametrize("part", ["layer", "ffn"])
def test_streamline_training_lowers_its_loss(part):
    model = tiny_random_llama(num_layers=6)
    removed = surgery.remove_layers(model, [0, 3])  # a gap at the start: trained from the layer after it
    cost = Cost()
    report = method(f"compensation/streamline_{part}", epochs=5).apply(model, removed, make_calib(), cost)
    sites = report["sites"]
    assert [(s["original_layer"], s["target_dense_layer"], s["side"]) for s in sites] == [(1, 1, "after"),
                                                                                        (2, 3, "before")]
    assert all(s["final_loss"] < s["initial_loss"] for s in sites)
    assert cost.train_tokens == 2 * 5 * 8 * 16  # trained layers x epochs x calibration tokens


def official_streamline_lambda(step: float, warmup: float, horizon: float, lr: float, min_lr: float) -> float:
    """LLM_Streamline/scheduler.py's warmup + cosine lambda (num_cycles 0.5), written out for the test."""
    if step < warmup:
        return step / max(1.0, warmup)
    progress = (step - warmup) / max(1.0, horizon - warmup)
    return (min_lr + max(0.0, 0.5 * (1 + math.cos(math.pi * progress))) * (lr - min_lr)) / lr


def test_streamline_lr_schedule_is_the_official_one():
    """train_lightweightnetwork.py: warmup = N * epochs * 0.01 * 0.5 and horizon = N * epochs * 0.5 in micro-batches
    N, but scheduler.step() once per 16 micro-batches (gradient accumulation): replay it per optimizer step."""
    comp = method("compensation/streamline_layer")
    steps, accumulation = 100, 16
    micro_batches = steps * accumulation  # one epoch
    official = [official_streamline_lambda(u, micro_batches * 0.01 * 0.5, micro_batches * 0.5, 2e-4, 5e-5)
                for u in range(steps)]
    ours = [comp._lr_factor(u, steps) for u in range(steps)]
    assert ours == pytest.approx(official, rel=1e-12, abs=1e-12)
    # By hand: warmup over 8 steps from 0, then nearly constant (0.5 (1 + cos(pi * 91/792)) = 0.96778).
    assert ours[0] == 0.0 and ours[4] == pytest.approx(0.5) and ours[8] == pytest.approx(1.0)
    assert ours[99] == pytest.approx((5e-5 + 0.96778 * 1.5e-4) / 2e-4, abs=1e-5)
    assert min(ours[8:]) > 0.97
    # This repo's earlier schedule as an option: 1% warmup, then a full cosine down toward min_lr (0.25 lr).
    old = method("compensation/streamline_layer", warmup_ratio=0.01, decay_horizon=1.0)
    assert old._lr_factor(1, steps) == pytest.approx(1.0)
    assert old._lr_factor(99, steps) == pytest.approx(0.25, abs=1e-3)
    with pytest.raises(ValueError, match="decay_horizon"):
        method("compensation/streamline_layer", decay_horizon=0.5)


# ---------------------------------------------------------------------------------------------------- refusals

def test_impossible_pairings_are_refused():
    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                   num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16))
    with pytest.raises(IncompatibleCompensationError, match="mlp"):
        method("compensation/streamline_ffn").check_compatible(opt, [])
    with pytest.raises(IncompatibleCompensationError, match="residual writers"):
        method("compensation/prune_and_comp").check_compatible(opt, [])
    method("compensation/streamline_layer").check_compatible(opt, [])  # a whole layer can always be trained
