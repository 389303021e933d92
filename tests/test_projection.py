"""GradMAP projection compensation: the closed-form fit, the exact fold, and the end-to-end repair of a pruned
model, checked against hidden states computed independently (a deep copy of the dense model and forward hooks)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from gradmap import surgery
from gradmap.compensation import IncompatibleCompensationError
from gradmap.data import Calibration
from gradmap.models import tiny_random_llama
from gradmap.stages import Cost
from methods.gradmap.projection import (
    choose_sites,
    fit_projection,
    fold_projection,
    shift_value,
)
from tests.tiny_models import method

VOCAB = 128


def projection(**options):
    """conf/compensation/projection.yaml's object, with `options` changed."""
    return method("compensation/projection", **options)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- fit

def test_alpha_zero_is_ordinary_least_squares():
    y, t = rand(200, 8, seed=1), rand(200, 8, seed=2)
    a = fit_projection(y.T @ y, y.T @ t, alpha=0.0)
    expected = torch.linalg.lstsq(y, t).solution
    assert a.dtype == torch.float64
    torch.testing.assert_close(a, expected, rtol=1e-9, atol=1e-10)
    # Optimality: the residual is orthogonal to the columns of Y.
    torch.testing.assert_close(y.T @ (y @ a - t), torch.zeros(8, 8, dtype=torch.float64), rtol=0, atol=1e-9)


def test_float32_inputs_are_solved_in_float64():
    y, t = rand(100, 4, seed=3).float(), rand(100, 4, seed=4).float()
    a = fit_projection(y.T @ y, y.T @ t, alpha=0.0)
    assert a.dtype == torch.float64
    torch.testing.assert_close(a, torch.linalg.lstsq(y.double(), t.double()).solution, rtol=1e-4, atol=1e-5)


def test_large_alpha_gives_the_identity():
    y, t = rand(100, 6, seed=5), rand(100, 6, seed=6)
    eye = torch.eye(6, dtype=torch.float64)
    far = fit_projection(y.T @ y, y.T @ t, alpha=1e9)
    torch.testing.assert_close(far, eye, rtol=0, atol=1e-7)
    # Monotone in alpha: stronger ridge, closer to I.
    dists = [torch.linalg.matrix_norm(fit_projection(y.T @ y, y.T @ t, alpha) - eye).item()
             for alpha in (0.0, 0.1, 1.0, 10.0, 100.0)]
    assert dists == sorted(dists, reverse=True)
    assert dists[0] > 0.5


@pytest.mark.parametrize("alpha", [0.0, 1e-3, 0.5, 10.0, 1e6])
def test_nothing_shifted_gives_the_identity_for_any_alpha(alpha):
    y = rand(50, 5, seed=7)
    a = fit_projection(y.T @ y, y.T @ y, alpha)
    torch.testing.assert_close(a, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-10)


def test_ridge_solution_beats_nearby_matrices_on_its_objective():
    y, t = rand(80, 4, seed=8), rand(80, 4, seed=9)
    alpha = 0.3
    lam = alpha * (y * y).sum() / 4  # alpha is relative to tr(Y^T Y) / d
    eye = torch.eye(4, dtype=torch.float64)

    def objective(a):
        return float(((y @ a - t) ** 2).sum() + lam * ((a - eye) ** 2).sum())

    a = fit_projection(y.T @ y, y.T @ t, alpha)
    best = objective(a)
    for seed in range(10):
        assert objective(a + 1e-3 * rand(4, 4, seed=100 + seed)) > best


# ---------------------------------------------------------------------------------------------- fold

@pytest.mark.parametrize("bias", [True, False])
def test_fold_into_linear_equals_applying_the_matrix_to_its_outputs(bias):
    torch.manual_seed(0)
    linear = nn.Linear(12, 6, bias=bias)
    if bias:
        nn.init.normal_(linear.bias)
    x = torch.randn(3, 7, 12)
    a = rand(6, 6, seed=11)
    with torch.no_grad():
        expected = (linear(x).double() @ a).float()
    fold_projection(linear, a)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), expected, rtol=1e-5, atol=1e-5)
    assert linear.weight.shape == (6, 12) and linear.weight.dtype == torch.float32


def test_fold_into_gpt2_conv1d_equals_applying_the_matrix():
    torch.manual_seed(0)
    conv = Conv1D(6, 12)  # nf=6 outputs, nx=12 inputs, weight stored [12, 6]
    nn.init.normal_(conv.bias)
    x = torch.randn(2, 5, 12)
    a = rand(6, 6, seed=12)
    with torch.no_grad():
        expected = (conv(x).double() @ a).float()
    fold_projection(conv, a)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


def test_fold_with_identity_changes_nothing():
    torch.manual_seed(0)
    linear = nn.Linear(4, 4)
    w, b = linear.weight.detach().clone(), linear.bias.detach().clone()
    fold_projection(linear, torch.eye(4, dtype=torch.float64))
    assert torch.equal(linear.weight, w) and torch.equal(linear.bias, b)


# ---------------------------------------------------------------------------------------------- end to end

def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        return tiny_random_llama(vocab_size=VOCAB, num_layers=6)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                                          bos_token_id=1, eos_token_id=2)).eval()
    if arch == "opt":
        return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=6, ffn_dim=64,
                                        num_attention_heads=4, word_embed_proj_dim=32,
                                        max_position_embeddings=64)).eval()
    if arch == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=6,
                                                num_attention_heads=4, intermediate_size=64,
                                                max_position_embeddings=64)).eval()
    raise AssertionError(arch)


LAYER_PATH = {"llama": "model.layers", "gpt2": "transformer.h", "opt": "model.decoder.layers",
              "gpt_neox": "gpt_neox.layers"}
OUT_PROJ = {"llama": "mlp.down_proj", "gpt2": "mlp.c_proj", "opt": "fc2", "gpt_neox": "mlp.dense_4h_to_h"}


def make_calib(seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(input_ids=torch.randint(0, VOCAB, (4, 16), generator=g), batch_size=2)


@torch.no_grad()
def layer_outputs(model: nn.Module, layers, calib: Calibration) -> list[dict[int, torch.Tensor]]:
    """Per batch: {layer position: output hidden state}, from our own forward hooks."""
    result = []
    for batch in calib.batches():
        seen: dict[int, torch.Tensor] = {}
        handles = [layer.register_forward_hook(
            lambda _m, _a, out, pos=pos: seen.__setitem__(pos, (out[0] if isinstance(out, tuple) else out).double()))
            for pos, layer in enumerate(layers)]
        try:
            model(input_ids=batch, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        result.append(seen)
    return result


def rel_sq_error(pruned: list[torch.Tensor], dense: list[torch.Tensor]) -> float:
    num = sum(float((p - d).pow(2).sum()) for p, d in zip(pruned, dense))
    den = sum(float(d.pow(2).sum()) for d in dense)
    return num / den


def independent_shifts(dense_out, pruned_out, kept, n, measure):
    """The documented drift of each kept layer vs the dense state at the same point of the computation."""
    shifts = []
    for j in range(len(kept)):
        aligned = kept[j + 1] - 1 if j + 1 < len(kept) else n - 1
        hp = torch.cat([b[j].flatten(0, -2) for b in pruned_out])
        hd = torch.cat([b[aligned].flatten(0, -2) for b in dense_out])
        if measure == "mean":
            shifts.append(float((hp - hd).mean(0).norm() / hd.norm(dim=-1).mean()))
        else:
            shifts.append(float(((hp - hd).pow(2).sum() / hd.pow(2).sum()) ** 0.5))
    return shifts


@pytest.mark.parametrize("arch,drop", [("llama", [1, 4]), ("llama", [0, 1]), ("gpt2", [2, 3]), ("opt", [1, 5]),
                                       ("gpt_neox", [3])])
def test_projection_lowers_the_final_layer_error(arch, drop):
    model = build(arch)
    dense_copy = copy.deepcopy(model)
    calib = make_calib()
    n = surgery.num_layers(model)
    dense_layers = surgery.get_decoder_layers(dense_copy)
    dense_out = layer_outputs(dense_copy, list(dense_layers), calib)

    removed = surgery.remove_layers(model, drop)
    kept = [i for i in range(n) if i not in drop]
    layers = surgery.get_decoder_layers(model)
    # The dense reference through dense_view is the deep-copied dense model, exactly.
    with surgery.dense_view(model, removed):
        via_view = layer_outputs(model, list(surgery.get_decoder_layers(model)), calib)
    for a, b in zip(via_view, dense_out):
        assert torch.equal(a[n - 1], b[n - 1])
    before = rel_sq_error([b[len(kept) - 1] for b in layer_outputs(model, list(layers), calib)],
                          [b[n - 1] for b in dense_out])
    names_shapes = [(k, v.shape) for k, v in model.named_parameters()]
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    report = projection(sites="largest").apply(model, removed, calib, Cost())

    pruned_after = layer_outputs(model, list(surgery.get_decoder_layers(model)), calib)
    after = rel_sq_error([b[len(kept) - 1] for b in pruned_after], [b[n - 1] for b in dense_out])
    assert report["final_rel_error_before"] == pytest.approx(before, rel=1e-4)
    assert report["final_rel_error_after"] == pytest.approx(after, rel=1e-4)
    assert after < before
    # No extra parameters, same layers; only the chosen site's MLP output projection changed.
    assert [(k, v.shape) for k, v in model.named_parameters()] == names_shapes
    assert surgery.num_layers(model) == len(kept)
    (site,) = report["sites"]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, state_before[k])}
    prefix = f"{LAYER_PATH[arch]}.{site['kept_position']}.{OUT_PROJ[arch]}"
    assert f"{prefix}.weight" in changed
    assert changed <= {f"{prefix}.weight", f"{prefix}.bias"}, changed
    assert site["original_layer"] == kept[site["kept_position"]]


@pytest.mark.parametrize("guard", ["final_error", "none"])
def test_guard_undoes_a_fold_that_raises_the_final_error(monkeypatch, guard):
    """A harmful fit (here forced: A = 8 I at every site) is undone bit-exactly under the guard and kept without it."""
    model = build("llama")
    calib = make_calib()
    removed = surgery.remove_layers(model, [1, 4])
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr("methods.gradmap.projection.fit_projection",
                        lambda yty, ytt, alpha: 8.0 * torch.eye(yty.shape[0], dtype=torch.float64))
    report = projection(sites="before_gap", guard=guard).apply(model, removed, calib, Cost())
    assert [s["kept_position"] for s in report["sites"]] == [0, 2]
    if guard == "final_error":
        assert [s["kept"] for s in report["sites"]] == [False, False]
        assert all(s["final_rel_error_with_fold"] > report["final_rel_error_before"] for s in report["sites"])
        assert report["sites_undone"] == [0, 3]
        surgery.assert_same_weights(state_before, model.state_dict())
        assert report["final_rel_error_after"] == pytest.approx(report["final_rel_error_before"], rel=1e-9)
    else:
        assert report["sites_undone"] == []
        assert report["final_rel_error_after"] > report["final_rel_error_before"]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_guarded_projection_never_raises_the_final_error(seed, alpha):
    model = build("llama")
    calib = make_calib(seed)
    removed = surgery.remove_layers(model, [[1, 2, 4], [0, 3], [2, 5]][seed])
    report = projection(sites="before_gap", alpha=alpha).apply(model, removed, calib, Cost())
    assert report["final_rel_error_after"] <= report["final_rel_error_before"] * (1 + 1e-9)
    kept_errors = [s["final_rel_error_with_fold"] for s in report["sites"] if s["kept"]]
    assert kept_errors == sorted(kept_errors, reverse=True)  # each kept fold lowered it further


def test_guard_costs_no_forward_pass_when_every_fold_is_kept():
    from gradmap.stages import count_forward_tokens

    results = {}
    for guard in ("none", "final_error"):
        model = build("llama")
        removed = surgery.remove_layers(model, [1, 4])
        cost = Cost()
        with count_forward_tokens(model, cost):
            report = projection(sites="before_gap", guard=guard).apply(model, removed, make_calib(), cost)
        results[guard] = (cost.forward_tokens, model.state_dict(), report)
    assert all(s["kept"] for s in results["final_error"][2]["sites"])
    assert results["final_error"][0] == results["none"][0]
    surgery.assert_same_weights(results["none"][1], results["final_error"][1])


def test_largest_site_is_the_argmax_of_the_reported_shifts():
    for measure in ("mean", "rms"):
        model = build("llama")
        calib = make_calib(seed=1)
        dense = copy.deepcopy(model)
        dense_out = layer_outputs(dense, list(dense.model.layers), calib)
        drop = [2, 3]
        removed = surgery.remove_layers(model, drop)
        kept = [0, 1, 4, 5]
        pruned_out = layer_outputs(model, list(model.model.layers), calib)
        report = projection(sites="largest", shift=measure).apply(model, removed, calib, Cost())
        shifts = report["shift_per_kept_layer"]
        assert list(shifts) == [str(k) for k in kept]
        expected = independent_shifts(dense_out, pruned_out, kept, 6, measure)
        assert list(shifts.values()) == pytest.approx(expected, rel=1e-5)
        (site,) = report["sites"]
        best = max(range(len(kept)), key=lambda j: expected[j])
        assert site["kept_position"] == best and site["original_layer"] == kept[best]
        assert site["shift"] == pytest.approx(max(expected), rel=1e-5)


@pytest.mark.parametrize("drop,expected_sites", [([1, 4], [0, 3]), ([2, 5], [1, 4]), ([0, 1], [])])
def test_before_gap_picks_exactly_the_kept_layers_before_gaps(drop, expected_sites):
    model = build("llama")
    calib = make_calib()
    removed = surgery.remove_layers(model, drop)
    kept = [i for i in range(6) if i not in drop]
    # Kept layers whose successor in the dense model was removed (a trailing removal counts as a gap).
    independent = [k for k in kept if k + 1 in drop]
    assert independent == expected_sites
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    report = projection(sites="before_gap").apply(model, removed, calib, Cost())
    assert [s["original_layer"] for s in report["sites"]] == expected_sites
    changed = sorted(k for k, v in model.state_dict().items() if not torch.equal(v, state_before[k]))
    assert changed == [f"model.layers.{kept.index(k)}.mlp.down_proj.weight" for k in expected_sites]
    for s in report["sites"]:
        later = [k for k in kept if k > s["original_layer"]]
        assert s["aligned_dense_layer"] == (later[0] - 1 if later else 5)
        assert s["rel_error_after"] < s["rel_error_before"]


def test_topk_picks_the_k_largest_shifts_in_depth_order():
    model = build("llama")
    removed = surgery.remove_layers(model, [1, 3])
    report = projection(sites="topk", top_k=2).apply(model, removed, make_calib(), Cost())
    shifts = list(report["shift_per_kept_layer"].values())
    top2 = sorted(sorted(range(len(shifts)), key=lambda j: -shifts[j])[:2])
    assert [s["kept_position"] for s in report["sites"]] == top2


def test_nothing_removed_is_a_no_op():
    model = build("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = projection().apply(model, {}, make_calib(), Cost())
    assert report["sites"] == []
    surgery.assert_same_weights(state, model.state_dict())
    assert surgery.num_layers(model) == 6


def test_compensation_leaves_no_hooks_and_keeps_the_layer_structure():
    model = build("llama")
    removed = surgery.remove_layers(model, [2])
    order = [id(x) for x in model.model.layers]
    projection(sites="topk", top_k=3).apply(model, removed, make_calib(), Cost())
    assert [id(x) for x in model.model.layers] == order
    assert model.config.num_hidden_layers == 5
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(5))
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not m._forward_hooks_with_kwargs


# ---------------------------------------------------------------------------------------------- options

def test_invalid_options_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"sites='everywhere'.*largest.*topk.*before_gap"):
        projection(sites="everywhere")
    with pytest.raises(ValueError, match=r"shift='max'.*mean.*rms"):
        projection(shift="max")
    with pytest.raises(ValueError, match="alpha"):
        projection(alpha=-1.0)
    with pytest.raises(ValueError, match=r"largest.*topk.*before_gap"):
        choose_sites("nope", [0.1], [0], [0])
    with pytest.raises(ValueError, match=r"mean.*rms"):
        shift_value("nope", {"n": 1})


def test_gemma3_post_mlp_norm_is_refused():
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"] * 2)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    removed = surgery.remove_layers(model, [1])
    with pytest.raises(IncompatibleCompensationError, match="post_feedforward_layernorm"):
        projection(post_norm="refuse").apply(model, removed, make_calib(), Cost())
    with surgery.dense_view(model, removed):
        surgery.assert_same_weights(state, model.state_dict())
