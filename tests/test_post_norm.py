"""Projection where a norm follows the MLP (gradmap/post_norm.py) and Prune&Comp's fold on sandwich layers, on a
tiny random Gemma-3 (post_feedforward_layernorm after down_proj) built from a config."""

from __future__ import annotations

import pytest
import torch

from gradmap import surgery
from gradmap.capture import layer_outputs
from gradmap.compensation import IncompatibleCompensationError
from gradmap.data import Calibration
from gradmap.models import tiny_random_llama
from gradmap.post_norm import direction_error, fit_channel_scale, fit_direction, gain_offset, post_mlp_norm, scale_error
from gradmap.stages import Cost
from methods.baselines.prune_and_comp import is_sandwich, scale_prefix
from tests.tiny_models import method, tiny_gemma3

MODES = ("norm_scale", "direction_approx", "direction_approx_norm_scale")


def _calib(seed: int = 0, vocab: int = 64) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(input_ids=torch.randint(4, vocab, (12, 16), generator=g), batch_size=4)


def test_gain_offset_reads_gemma_and_llama_norms():
    gemma, llama = tiny_gemma3(), tiny_random_llama()
    assert gain_offset(post_mlp_norm(gemma.model.layers[0])) == 1.0  # Gemma: x_hat * (1 + w)
    assert gain_offset(llama.model.layers[0].input_layernorm) == 0.0  # Llama: x_hat * w
    assert post_mlp_norm(llama.model.layers[0]) is None


def test_channel_scale_and_direction_fits_are_the_least_squares_solutions():
    g = torch.Generator().manual_seed(1)
    y, t = torch.randn(200, 6, generator=g, dtype=torch.float64), torch.randn(200, 6, generator=g, dtype=torch.float64)
    s = fit_channel_scale((y * y).sum(0), (y * t).sum(0), alpha=0.0)
    assert torch.allclose(s, torch.stack([torch.linalg.lstsq(y[:, [c]], t[:, [c]]).solution[0, 0] for c in range(6)]))
    tt = float((t * t).sum())
    assert scale_error((y * y).sum(0), (y * t).sum(0), tt, s) == pytest.approx(float((y * s - t).pow(2).sum()))
    # Direction: column c solves min ||g_c Zn a - T_c||^2 (alpha -> 0), and the predicted error is the fit's own.
    zn = torch.randn(200, 6, generator=g, dtype=torch.float64)
    gain = torch.rand(6, generator=g, dtype=torch.float64) + .5
    a = fit_direction(zn.T @ zn, zn.T @ t, gain, alpha=1e-12)
    ref = torch.stack([torch.linalg.lstsq(gain[c] * zn, t[:, c:c + 1]).solution[:, 0] for c in range(6)], dim=1)
    assert torch.allclose(a, ref, atol=1e-8)
    assert direction_error(zn.T @ zn, zn.T @ t, tt, gain, a) == pytest.approx(float((gain * (zn @ a) - t).pow(2).sum()))
    # A huge ridge keeps the identity (no change).
    assert torch.allclose(fit_direction(zn.T @ zn, zn.T @ t, gain, alpha=1e12), torch.eye(6, dtype=torch.float64),
                          atol=1e-6)


def test_projection_refuses_a_post_mlp_norm_unless_told_how_to_fold():
    model = tiny_gemma3()
    with pytest.raises(IncompatibleCompensationError, match="compensation.post_norm"):
        method("compensation/projection", post_norm="refuse").check_compatible(model, [])
    with pytest.raises(IncompatibleCompensationError, match="compensation.post_norm"):
        # official ReplaceMe has no such case: refused by default
        method("compensation/replaceme").check_compatible(model, [])
    for mode in MODES:
        method("compensation/projection", post_norm=mode).check_compatible(model, [])
    # The default chosen on validation (README).
    assert method("compensation/projection").post_norm == "direction_approx"


@pytest.mark.parametrize("mode", MODES)
def test_post_norm_fold_lowers_the_site_error_and_saves_a_standard_checkpoint(mode, tmp_path):
    from transformers import AutoModelForCausalLM

    from gradmap.checkpoint import save_pruned

    model, calib = tiny_gemma3(num_layers=6), _calib()
    removed = surgery.remove_layers(model, [2, 3])
    comp = method("compensation/projection", post_norm=mode, guard="none", alpha=0.1)
    report = comp.apply(model, removed, calib, Cost())
    (site,) = report["sites"]
    assert site["post_norm"] == mode and site["original_layer"] == 1
    assert site["rel_error_after"] < site["rel_error_before"]  # lowers the calibration error at its site
    split = site["rel_error_magnitude_part"] + site["rel_error_direction_part"]
    assert split == pytest.approx(site["rel_error_at_fit"])
    assert site["rel_error_floor_before_norm"] <= site["rel_error_at_fit"]
    if mode == "direction_approx":  # a map before the norm (the gain unchanged) cannot go below the floor
        assert site["rel_error_after"] >= site["rel_error_floor_before_norm"] - 1e-9
    if mode == "norm_scale":  # exact: what the fit predicts is what the model does
        assert site["rel_error_after"] == pytest.approx(site["scale_predicted_rel_error"], rel=1e-6)
    assert report["post_norm"] == mode
    # A standard checkpoint: no new modules, and plain from_pretrained gives the in-memory model's outputs.
    names = {n for n, _ in model.named_parameters()}
    assert names == {n for n, _ in tiny_gemma3(num_layers=4).named_parameters()}
    del removed
    save_pruned(model, None, tmp_path / "pruned", {"removed_layers": [2, 3]})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    ids = _calib(seed=5).input_ids
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_post_norm_setting_leaves_models_without_the_norm_bit_identical():
    runs = []
    for mode in ("refuse", "direction_approx_norm_scale"):
        model, calib = tiny_random_llama(), _calib(vocab=256)
        removed = surgery.remove_layers(model, [2, 3])
        report = method("compensation/projection", post_norm=mode).apply(model, removed, calib, Cost())
        runs.append((model.state_dict(), report))
    (a, ra), (b, rb) = runs
    assert all(torch.equal(a[k], b[k]) for k in a) and ra == rb and "post_norm" not in ra


def test_prune_and_comp_scale_is_exact_on_sandwich_layers():
    model, calib = tiny_gemma3(num_layers=4).double(), _calib()
    # A negligible epsilon: the fold is exact up to the norms' epsilon (and float32: Gemma's norm computes in it).
    for module in model.modules():
        if hasattr(module, "eps"):
            module.eps = 1e-14
    assert is_sandwich(model.model.layers[0])
    method("compensation/prune_and_comp").check_compatible(model, [])
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    ids = calib.input_ids[:4]
    with torch.no_grad():
        before = layer_outputs(model, ids, [1, 3])
        logits = model(input_ids=ids).logits
    scale_prefix(model, 1, 2.5)
    with torch.no_grad():
        after = layer_outputs(model, ids, [1, 3])
    assert torch.allclose(after[1], 2.5 * before[1], rtol=1e-5, atol=1e-5)  # the stream up to layer 1 times s
    scale_prefix(model, 1, 1 / 2.5)  # undone
    scale_prefix(model, 3, 2.5)  # the whole stream times s: the final norm undoes it
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_replaceme_and_prune_and_comp_run_on_a_post_norm_model():
    """The same mechanism serves ReplaceMe (its map, folded as post_norm says) and Prune&Comp (its scale, in the
    gains of the norms after attention and MLP, exactly the fitted scale)."""
    model, calib = tiny_gemma3(num_layers=6), _calib()
    removed = surgery.remove_layers(model, [2, 3])
    report = method("compensation/replaceme", alpha=0.1, post_norm="norm_scale").apply(model, removed, calib, Cost())
    assert report["method"] == "ReplaceMe lstsq" and report["sites"][0]["post_norm"] == "norm_scale"
    assert report["final_rel_error_after"] < report["final_rel_error_before"]
    model = tiny_gemma3(num_layers=6)
    norms_before = model.model.layers[1].post_feedforward_layernorm.weight.detach().clone()
    removed = surgery.remove_layers(model, [2, 3])
    report = method("compensation/prune_and_comp", iterative=False).apply(model, removed, calib, Cost())
    (site,) = report["sites"]
    assert site["scale"] != 1.0 and report["untied_embeddings"]
    g = site["scale"] * (1 + norms_before)  # Gemma's gain is 1 + weight
    assert torch.allclose(1 + model.model.layers[1].post_feedforward_layernorm.weight, g, rtol=1e-5, atol=1e-6)


def test_sphere_floor_is_the_least_error_of_any_unit_rms_output():
    from gradmap.post_norm import sphere_floor

    g = torch.Generator().manual_seed(3)
    d = 5
    gain = torch.randn(d, generator=g, dtype=torch.float64)  # signs and sizes vary, as Gemma's do
    t = torch.randn(4, d, generator=g, dtype=torch.float64) * 3
    floor = sphere_floor(gain, t)
    u = torch.randn(20000, d, generator=g, dtype=torch.float64)
    u = u * (d / u.pow(2).sum(-1, keepdim=True)).sqrt()  # random points with rms 1
    sampled = ((gain * u)[None] - t[:, None]).pow(2).sum(-1).min(1).values
    assert (floor <= sampled + 1e-9).all() and torch.allclose(floor, sampled, rtol=0.05)
    uniform = sphere_floor(torch.ones(d, dtype=torch.float64), t)  # uniform gain: only the magnitude is lost
    assert torch.allclose(uniform, (t.norm(dim=-1) - d ** 0.5) ** 2)
