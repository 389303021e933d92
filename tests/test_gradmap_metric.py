"""GradMAP gradient metric: every target x reduction against gradients computed independently with autograd,
the iterative / one-shot selection rules, the cost accounting, and the guarantee that the model is left as found.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradmap import surgery
from gradmap.data import Calibration
from gradmap.models import tiny_random_llama
from gradmap.stages import Cost, count_forward_tokens
from tests.model_state import assert_unchanged, snapshot
from tests.tiny_models import method

VOCAB = 256


def make_model(num_layers: int = 5) -> nn.Module:
    return tiny_random_llama(vocab_size=VOCAB, num_layers=num_layers)


def make_calib(rows: int = 4, seq: int = 12, batch_size: int = 4, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(input_ids=torch.randint(0, VOCAB, (rows, seq), generator=g), batch_size=batch_size)


def kept_copy(model: nn.Module, keep: list[int]) -> nn.Module:
    """An independent copy of `model` that runs only the decoder layers `keep` (no gradmap.surgery involved)."""
    ref = copy.deepcopy(model)
    ref.model.layers = nn.ModuleList([ref.model.layers[i] for i in keep])
    ref.config.num_hidden_layers = len(keep)
    return ref


# ---------------------------------------------------------------------------------------------- references

def reference_weight_scores(model: nn.Module, calib: Calibration, reduction: str) -> list[float]:
    """Per-layer gradient reductions from torch.autograd.grad, token-weighted over micro-batches."""
    ref = copy.deepcopy(model)
    layers = list(ref.model.layers)
    totals = torch.zeros(len(layers), dtype=torch.float64)
    for batch in calib.batches():
        loss = ref(input_ids=batch, labels=batch, use_cache=False).loss
        params = [list(layer.parameters()) for layer in layers]
        grads = torch.autograd.grad(loss, [p for ps in params for p in ps])
        it = iter(grads)
        weight = batch.numel() / calib.input_ids.numel()
        for i, ps in enumerate(params):
            g = torch.cat([next(it).double().flatten() for _ in ps])
            w = torch.cat([p.detach().double().flatten() for p in ps])
            value = {"mean_abs": g.abs().sum() / g.numel(),
                     "l2": g.norm(),
                     "rel_l2": g.norm() / w.norm()}[reduction]
            totals[i] += weight * value
    return totals.tolist()


def reference_activation_scores(model: nn.Module, calib: Calibration, reduction: str) -> list[float]:
    """dL/dh of each layer's output via retain_grad, token-weighted over micro-batches."""
    ref = copy.deepcopy(model)
    layers = list(ref.model.layers)
    totals = torch.zeros(len(layers), dtype=torch.float64)
    for batch in calib.batches():
        seen: dict = {}

        def keep_embed(_m, _a, out):
            seen["embed"] = out

        def keep_out(module, _a, out):
            h = out[0] if isinstance(out, tuple) else out
            h.retain_grad()
            seen[layers.index(module)] = h

        handles = [ref.get_input_embeddings().register_forward_hook(keep_embed)]
        handles += [layer.register_forward_hook(keep_out) for layer in layers]
        try:
            ref(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        finally:
            for h in handles:
                h.remove()
        weight = batch.numel() / calib.input_ids.numel()
        for i in range(len(layers)):
            g = seen[i].grad.double()
            inp = (seen["embed"] if i == 0 else seen[i - 1]).detach().double()
            update = seen[i].detach().double() - inp
            value = {"mean_abs": g.abs().mean(),
                     "l2": g.norm(dim=-1).mean(),
                     "first_order": (g * update).sum(-1).abs().mean()}[reduction]
            totals[i] += weight * value
    return totals.tolist()


def reference(model, calib, target, reduction):
    fn = reference_weight_scores if target == "weights" else reference_activation_scores
    return fn(model, calib, reduction)


CASES = [("weights", "mean_abs"), ("weights", "l2"), ("weights", "rel_l2"),
         ("activations", "mean_abs"), ("activations", "l2"), ("activations", "first_order")]


# ---------------------------------------------------------------------------------------------- formulas

@pytest.mark.parametrize("target,reduction", CASES)
def test_scores_equal_independent_autograd_one_micro_batch(target, reduction):
    model = make_model()
    calib = make_calib(batch_size=4)  # one micro-batch
    assert calib.num_batches == 1
    scores = method("metric/gradmap", target=target, reduction=reduction).score(model, calib, Cost())
    expected = reference(model, calib, target, reduction)
    assert scores.shape == (5,)
    assert all(v > 0 for v in expected)
    torch.testing.assert_close(scores.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    # The five layers are not all scored alike (the test would be vacuous otherwise).
    assert max(expected) / min(expected) > 1.01


@pytest.mark.parametrize("target,reduction", CASES)
def test_micro_batches_give_the_full_calibration_set_scores(target, reduction):
    # Micro-batches of 2, 2 and 1 rows (unequal weights) must give the scores of one batch of all 5 rows: the
    # metric is the gradient of the loss over the whole calibration set; the batch size is a memory knob.
    model = make_model()
    calib = make_calib(rows=5, batch_size=2)
    assert calib.num_batches == 3
    scores = method("metric/gradmap", target=target, reduction=reduction).score(model, calib, Cost())
    whole = reference(model, make_calib(rows=5, batch_size=5), target, reduction)
    torch.testing.assert_close(scores.double(), torch.tensor(whole, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("reduction", ["mean_abs", "l2", "rel_l2"])
def test_per_batch_option_averages_micro_batch_reductions(reduction):
    model = make_model()
    calib = make_calib(rows=5, batch_size=2)
    scores = method("metric/gradmap", target="weights", reduction=reduction, grad_accumulation="per_batch").score(
        model, calib, Cost())
    expected = reference(model, calib, "weights", reduction)  # token-weighted mean of per-micro-batch reductions
    torch.testing.assert_close(scores.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    # It measures something else than the full-set gradient (norms of an average != average of norms).
    whole = reference(model, make_calib(rows=5, batch_size=5), "weights", reduction)
    assert not torch.allclose(torch.tensor(whole, dtype=torch.float64), scores.double(), rtol=1e-6, atol=0)


def uneven_model(seed: int = 2) -> nn.Module:
    """Six layers whose residual writers are scaled by random strengths, so layer scores are not simply ordered by
    depth and a metric that measures gradient noise picks differently with other micro-batch sizes (seed 2: the
    per-micro-batch l2 average does, see below)."""
    model = tiny_random_llama(vocab_size=VOCAB, num_layers=6, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            strength = float(torch.rand((), generator=g)) * 2 + 0.2
            layer.mlp.down_proj.weight.mul_(strength)
            layer.self_attn.o_proj.weight.mul_(strength)
    return model


@pytest.mark.parametrize("target,reduction", CASES)
@pytest.mark.parametrize("iterative", [True, False])
def test_selection_does_not_depend_on_the_micro_batch_size(target, reduction, iterative):
    model = uneven_model()
    removed = [method("metric/gradmap", target=target, reduction=reduction, iterative=iterative).select(
        model, make_calib(rows=4, batch_size=batch_size, seed=2), 3, Cost()).removed for batch_size in (1, 2, 4)]
    assert removed[0] == removed[1] == removed[2], removed


def test_per_batch_selection_changes_with_the_micro_batch_size():
    # Why `full` is the default: on the same model and tokens the per-micro-batch average removes other layers.
    model = uneven_model()
    removed = [sorted(method("metric/gradmap", target="weights", reduction="l2", iterative=False,
                             grad_accumulation="per_batch")
                      .select(model, make_calib(rows=4, batch_size=batch_size, seed=2), 3, Cost()).removed)
               for batch_size in (1, 2, 4)]
    assert removed[0] != removed[2], removed


def test_float32_accumulation_agrees_with_float64():
    model, calib = make_model(), make_calib()
    s64 = method("metric/gradmap", accum_dtype="float64").score(model, calib, Cost())
    s32 = method("metric/gradmap", accum_dtype="float32").score(model, calib, Cost())
    torch.testing.assert_close(s32, s64, rtol=1e-4, atol=0)


@pytest.mark.parametrize("target,reduction", [("weights", "l2"), ("activations", "first_order")])
def test_gradient_checkpointing_gives_the_same_scores(target, reduction):
    model, calib = make_model(), make_calib(rows=4, batch_size=2)
    plain = method("metric/gradmap", target=target, reduction=reduction).score(model, calib, Cost())
    before = snapshot(model)
    ckpt = method("metric/gradmap", target=target, reduction=reduction, gradient_checkpointing=True).score(
        model, calib, Cost())
    assert_unchanged(before, snapshot(model))
    assert not getattr(model, "is_gradient_checkpointing", False)
    torch.testing.assert_close(ckpt, plain, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------- selection

@pytest.mark.parametrize("target,reduction", [("weights", "mean_abs"), ("activations", "l2")])
def test_iterative_selection_removes_argmin_and_rescores_the_smaller_model(target, reduction):
    model, calib = make_model(num_layers=6), make_calib()
    sel = method("metric/gradmap", target=target, reduction=reduction, iterative=True).select(model, calib, 3, Cost())

    assert len(sel.decisions) == 3
    assert sel.removed == [i for d in sel.decisions for i in d.removed]
    assert len(set(sel.removed)) == 3
    removed_so_far: list[int] = []
    for step, decision in enumerate(sel.decisions):
        assert decision.step == step
        assert [i for i, s in enumerate(decision.scores) if s is None] == sorted(removed_so_far)
        keep = [i for i in range(6) if i not in removed_so_far]
        expected = reference(kept_copy(model, keep), calib, target, reduction)
        got = [decision.scores[i] for i in keep]
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-6, atol=0)
        argmin = keep[min(range(len(keep)), key=lambda j: expected[j])]
        assert decision.removed == [argmin]
        removed_so_far.append(argmin)
    # Rescoring matters: some later score differs from the first pass's score of the same layer.
    first, last = sel.decisions[0].scores, sel.decisions[-1].scores
    assert any(abs(last[i] - first[i]) > 1e-6 * abs(first[i]) for i in range(6) if last[i] is not None)
    assert surgery.num_layers(model) == 6  # select never prunes the model itself


def test_one_shot_removes_the_n_lowest_of_one_scoring_pass():
    model, calib = make_model(num_layers=6), make_calib()
    sel = method("metric/gradmap", target="weights", reduction="l2", iterative=False).select(model, calib, 3, Cost())
    assert len(sel.decisions) == 1
    scores = sel.decisions[0].scores
    expected = reference(model, calib, "weights", "l2")
    torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    lowest3 = sorted(range(6), key=lambda i: expected[i])[:3]
    assert sel.removed == lowest3 == sel.decisions[0].removed
    assert max(expected[i] for i in lowest3) < min(expected[i] for i in range(6) if i not in lowest3)


def test_protected_layers_are_never_removed():
    model, calib = make_model(num_layers=6), make_calib()
    sel = method("metric/gradmap", protect_first=1, protect_last=2).select(model, calib, 3, Cost())
    assert sorted(sel.removed) == [1, 2, 3]
    with pytest.raises(ValueError, match="allowed: 1..3"):
        method("metric/gradmap", protect_first=1, protect_last=2).select(model, calib, 4, Cost())


@pytest.mark.parametrize("iterative,num_prune", [(True, 3), (False, 3)])
@pytest.mark.parametrize("target", ["weights", "activations"])
def test_cost_is_decisions_times_calibration_tokens(iterative, num_prune, target):
    model, calib = make_model(num_layers=6), make_calib(rows=4, seq=12, batch_size=2)
    cost = Cost()
    with count_forward_tokens(model, cost):
        sel = method("metric/gradmap", target=target, reduction="mean_abs", iterative=iterative).select(
            model, calib, num_prune, cost)
    decisions = num_prune if iterative else 1
    assert len(sel.decisions) == decisions
    assert cost.forward_tokens == decisions * 48 == decisions * calib.num_tokens
    assert cost.backward_tokens == decisions * calib.num_tokens
    assert cost.train_tokens == 0
    for d in sel.decisions:
        assert d.forward_tokens == d.backward_tokens == calib.num_tokens
    assert sel.cost == {"forward_tokens": cost.forward_tokens, "backward_tokens": cost.backward_tokens}
    assert not model._forward_pre_hooks_with_kwargs and not model._forward_pre_hooks  # counting hook removed


# ---------------------------------------------------------------------------------------------- model left as found

@pytest.mark.parametrize("target,reduction", [("weights", "rel_l2"), ("activations", "first_order")])
@pytest.mark.parametrize("iterative", [True, False])
def test_metric_leaves_the_model_exactly_as_found(target, reduction, iterative):
    model, calib = make_model(num_layers=5), make_calib(rows=4, batch_size=2)
    layers = model.model.layers
    # Unusual starting state the metric must not "clean up".
    g = torch.Generator().manual_seed(3)
    for p in (layers[0].self_attn.q_proj.weight, layers[3].mlp.down_proj.weight, model.lm_head.weight):
        p.grad = torch.randn(p.shape, generator=g)
    layers[2].mlp.up_proj.weight.requires_grad_(False)
    layers[3].mlp.down_proj.weight.requires_grad_(False)  # frozen *and* carrying a gradient
    model.get_input_embeddings().weight.requires_grad_(False)
    model.train()
    layers[1].eval()
    calls = {"fwd": 0}
    layers[4].register_forward_hook(lambda *_: calls.__setitem__("fwd", calls["fwd"] + 1))
    layers[0].mlp.gate_proj.weight.register_hook(lambda grad: grad)
    layers[0].mlp.gate_proj.weight.register_post_accumulate_grad_hook(lambda p: None)
    before = snapshot(model)
    ids = make_calib(rows=2, seed=9).input_ids
    with torch.no_grad():
        out_before = model(input_ids=ids, use_cache=False).logits

    metric = method("metric/gradmap", target=target, reduction=reduction, iterative=iterative)
    sel = metric.select(model, calib, 2, Cost())

    assert len(sel.removed) == 2
    assert calls["fwd"] > 0  # the user's hook stayed active during scoring
    assert_unchanged(before, snapshot(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, out_before)
    # A frozen layer weight still contributes to its layer's score when requires_grad is restored afterwards:
    # scores equal those of the unfrozen model (the metric takes gradients of all layer weights).
    fresh = make_model(num_layers=5)
    expected = method("metric/gradmap", target=target, reduction=reduction, iterative=iterative).select(
        fresh, calib, 2, Cost())
    assert sel.decisions[0].scores == pytest.approx(expected.decisions[0].scores, rel=1e-9)


# ---------------------------------------------------------------------------------------------- options

def test_invalid_options_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"target='grads'.*weights.*activations"):
        method("metric/gradmap", target="grads")
    with pytest.raises(ValueError, match=r"first_order.*mean_abs.*l2.*rel_l2"):
        method("metric/gradmap", target="weights", reduction="first_order")
    with pytest.raises(ValueError, match=r"rel_l2.*mean_abs.*l2.*first_order"):
        method("metric/gradmap", target="activations", reduction="rel_l2")
    with pytest.raises(ValueError, match=r"float16.*float32.*float64"):
        method("metric/gradmap", accum_dtype="float16")
    model, calib = make_model(num_layers=4), make_calib()
    with pytest.raises(ValueError, match=r"allowed: 1..3"):
        method("metric/gradmap").select(model, calib, 4, Cost())
