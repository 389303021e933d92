"""Prune&Comp: the official iterative procedure (score, remove one layer, fold the magnitude compensation, rescore)
and its options (one-shot ablation, token-L2 ratio), on the tiny random Llama."""

from __future__ import annotations

import math
from pathlib import Path

import hydra.utils
import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from gradmap import surgery
from gradmap.capture import collect_layer_io
from gradmap.data import Calibration
from gradmap.metric import LayerMetric
from gradmap.models import tiny_random_llama
from gradmap.selection import Selection
from gradmap.stages import Cost
from methods.baselines.prune_and_comp import (
    RESIDUAL_WRITERS,
    channel_magnitude_ratio,
    magnitude_ratio,
    scale_prefix,
)
from tests.tiny_models import method

YAML = Path(__file__).resolve().parents[1] / "conf" / "compensation" / "prune_and_comp.yaml"


def prune_and_comp(**options):
    """conf/compensation/prune_and_comp.yaml's object, with `options` changed."""
    return method("compensation/prune_and_comp", **options)


def make_calib(seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randint(0, 256, (8, 16), generator=g), batch_size=4)


def io_states(model, calib, position):
    """(inputs, outputs) of decoder layer `position` per calibration batch."""
    seen = [collect_layer_io(model, b, [position])[position] for b in calib.batches()]
    return [i for i, _ in seen], [o for _, o in seen]


def full_scores(metric, model, calib, kept, original_count):
    """`metric.score` of the model as it is, indexed by original layer (None = removed)."""
    scores = metric.score(model, calib, Cost()).double()
    full = [None] * original_count
    for pos, orig in enumerate(kept):
        full[orig] = float(scores[pos])
    return full


class Scripted(LayerMetric):
    """Removes the original layers in `order`, recognising them by identity in whatever model it scores; counts calls
    and the layer count it saw."""

    def __init__(self, model, order):
        super().__init__(iterative=False, protect_first=0, protect_last=0)
        self.ids = {id(layer): i for i, layer in enumerate(surgery.get_decoder_layers(model))}
        self.order, self.seen = list(order), []

    def score(self, model, calib, cost):
        layers = [self.ids[id(layer)] for layer in surgery.get_decoder_layers(model)]
        self.seen.append(len(layers))
        target = self.order[len(self.seen) - 1]
        return torch.tensor([0.0 if orig == target else 1.0 + orig for orig in layers])


# ---------------------------------------------------------------------------------------------------- (1) ratio

def test_channel_ratio_is_the_per_sequence_per_channel_mean_abs_ratio():
    dense = torch.tensor([[[2.0, -4.0], [4.0, 0.0]],      # sequence 0: mean_t |y| per channel = (3, 2)
                          [[1.0, 1.0], [-3.0, 3.0]]])     # sequence 1: (2, 2)
    pruned = torch.tensor([[[1.0, 1.0], [-1.0, 1.0]],     # (1, 1)
                           [[2.0, -1.0], [2.0, 1.0]]])    # (2, 1)
    # ratios per (sequence, channel): (3, 2) and (1, 2); their mean is 2.
    s, dense_mag, pruned_mag = channel_magnitude_ratio([dense], [pruned])
    assert (s, dense_mag, pruned_mag) == (2.0, 2.25, 1.25)
    # Batching does not matter (one sequence per batch, as the official loader has) ...
    assert channel_magnitude_ratio([dense[:1], dense[1:]], [pruned[:1], pruned[1:]])[0] == 2.0
    # ... and it is neither the ratio of channel means pooled over all tokens (11/6) nor of mean token norms.
    pooled = (dense.abs().mean(dim=(0, 1)) / pruned.abs().mean(dim=(0, 1))).mean().item()
    token_l2 = magnitude_ratio([dense], [pruned])[0]
    assert pooled == pytest.approx(11 / 6) and token_l2 == pytest.approx(
        (math.sqrt(20) + 4 + math.sqrt(2) + math.sqrt(18)) / (2 * math.sqrt(2) + 2 * math.sqrt(5)))
    assert abs(pooled - 2.0) > 0.1 and abs(token_l2 - 2.0) > 0.05


# ----------------------------------------------------------------------------- (2) rescoring after compensation

def test_each_decision_rescores_the_compensated_model():
    calib, metric = make_calib(), method("metric/bi")  # the official CosSim(BI) pairing
    model = tiny_random_llama(num_layers=6)
    selection, report = prune_and_comp().prune_iteratively(model, metric, calib, 2, Cost())
    first, second = selection.removed
    site0, site1 = report["sites"]
    assert report["procedure"] == "iterative" and len(selection.decisions) == 2

    ref = tiny_random_llama(num_layers=6)
    assert selection.decisions[0].scores == full_scores(metric, ref, calib, list(range(6)), 6)
    # Step 1's scale: the removed layer's output over its input, on the model as it was (here the dense one).
    ins, outs = io_states(ref, calib, first)
    assert site0["scale"] == pytest.approx(channel_magnitude_ratio(outs, ins)[0], rel=1e-12)

    kept = [i for i in range(6) if i != first]
    surgery.remove_layers(ref, [first])
    uncompensated = full_scores(metric, ref, calib, kept, 6)
    scale_prefix(ref, first - 1, site0["scale"])
    compensated = full_scores(metric, ref, calib, kept, 6)
    # The second decision scored the compensated model, not the merely pruned one.
    assert selection.decisions[1].scores == compensated
    after = [i for i in kept if i > first]
    assert after and all(abs(uncompensated[i] - compensated[i]) > 1e-6 for i in after)
    assert selection.decisions[1].removed == [min(kept, key=lambda i: (compensated[i], i))] == [second]

    # Step 2's reference is that compensated model, not the original dense one.
    pos = kept.index(second)
    ins, outs = io_states(ref, calib, pos)
    assert site1["scale"] == pytest.approx(channel_magnitude_ratio(outs, ins)[0], rel=1e-12)
    dense_ins, dense_outs = io_states(tiny_random_llama(num_layers=6), calib, second)
    assert abs(site1["scale"] - channel_magnitude_ratio(dense_outs, dense_ins)[0]) > 1e-6


# ------------------------------------------------------------------------- (3) original indices and final model

def test_original_indices_and_final_model_are_remove_layers_plus_the_folds():
    calib = make_calib()
    model = tiny_random_llama(num_layers=6)
    metric = Scripted(model, [3, 1, 5])
    selection, report = prune_and_comp().prune_iteratively(model, metric, calib, 3, Cost())

    assert metric.seen == [6, 5, 4]  # one scoring pass per decision, each on the pruned model
    assert selection.removed == [3, 1, 5] and [d.removed for d in selection.decisions] == [[3], [1], [5]]
    assert [d.step for d in selection.decisions] == [0, 1, 2]
    assert [[i for i, s in enumerate(d.scores) if s is None] for d in selection.decisions] == [[], [3], [1, 3]]
    sites = report["sites"]
    assert [(s["original_layer"], s["position"], s["original_layer_before"]) for s in sites] == [
        (3, 3, 2), (1, 1, 0), (5, 3, 4)]

    # The same model by hand: remove the three layers at once, then multiply the embedding by every scale and each
    # kept layer's residual writers by the scales of the removals after it.
    ref = tiny_random_llama(num_layers=6)
    surgery.remove_layers(ref, [1, 3, 5])
    with torch.no_grad():
        ref.get_input_embeddings().weight.mul_(math.prod(s["scale"] for s in sites))
        for layer, orig in zip(surgery.get_decoder_layers(ref), [0, 2, 4]):
            factor = math.prod(s["scale"] for s in sites if s["original_layer"] > orig)
            for path in RESIDUAL_WRITERS:
                layer.get_submodule(path).weight.mul_(factor)
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0, msg=key)
    assert model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in surgery.get_decoder_layers(model)] == [0, 1, 2]


def test_resume_replays_cached_decisions_without_rescoring():
    calib = make_calib()
    full_model = tiny_random_llama(num_layers=6)
    full, _ = prune_and_comp().prune_iteratively(full_model, Scripted(full_model, [3, 1, 5]), calib, 3, Cost())
    model = tiny_random_llama(num_layers=6)
    metric = Scripted(model, [5])  # only the third decision is scored
    cached = Selection(removed=full.removed[:2], decisions=full.decisions[:2])
    selection, report = prune_and_comp().prune_iteratively(model, metric, calib, 3, Cost(), resume=cached)
    assert metric.seen == [4] and selection.removed == [3, 1, 5]
    assert [s["replayed"] for s in report["sites"]] == [True, True, False]
    surgery.assert_same_weights(full_model.state_dict(), model.state_dict())


def test_tied_embeddings_are_untied_once():
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    head = model.lm_head.weight.detach().clone()
    selection, report = prune_and_comp().prune_iteratively(model, Scripted(model, [2, 0]), Calibration(
        torch.randint(0, 64, (4, 8)), 2), 2, Cost())
    assert report["untied_embeddings"] and report["extra_parameters"] == 64 * 16
    torch.testing.assert_close(model.lm_head.weight, head)  # the LM head is not scaled
    scale = report["sites"][0]["scale"] * report["sites"][1]["scale"]
    torch.testing.assert_close(model.model.embed_tokens.weight, scale * head)


def test_span_metrics_remove_one_block_and_compensate_it_once():
    calib = make_calib()
    model = tiny_random_llama(num_layers=6)
    selection, report = prune_and_comp().prune_iteratively(model, method("metric/angular"), calib, 2, Cost())
    (decision,) = selection.decisions
    (site,) = report["sites"]
    a, b = sorted(selection.removed)
    assert b == a + 1 and site["gap"] == [a, b] and report["procedure"] == "span"
    assert surgery.num_layers(model) == 4


# ------------------------------------------------------------------------------------- (4) one-shot ablation

def test_iterative_false_reproduces_the_one_shot_path():
    comp = prune_and_comp(iterative=False, ratio="token_l2")
    assert comp.interleaved is False and prune_and_comp().interleaved is True
    calib, remove = make_calib(), [1, 2, 4]  # two gaps: the second is measured after the first is compensated
    model = tiny_random_llama(num_layers=6)
    report = comp.apply(model, surgery.remove_layers(model, remove), calib, Cost())
    assert report["procedure"] == "one_shot" and "note" not in report

    # The one-shot path written out: dense outputs after each gap first, then per gap in depth order the ratio of
    # mean token norms (dense after the gap / pruned at the gap) folded before the gap.
    ref = tiny_random_llama(num_layers=6)
    removed = surgery.remove_layers(ref, remove)
    with surgery.dense_view(ref, removed):
        dense = {b: io_states(ref, calib, b)[1] for b in (2, 4)}

    def norm(states):
        return torch.cat([h.double().flatten(0, -2).norm(dim=-1) for h in states]).mean().item()

    scales = []
    for b, upto in ((2, 0), (4, 1)):  # kept [0, 3, 5]: gap [1, 2] after position 0, gap [4] after position 1
        s = norm(dense[b]) / norm(io_states(ref, calib, upto)[1])
        scale_prefix(ref, upto, s)
        scales.append(s)
    assert [site["scale"] for site in report["sites"]] == pytest.approx(scales, rel=1e-12)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-6, atol=0)

    # The default ratio on the same one-shot path: the per-channel mean |x| ratio of the same states.
    model = tiny_random_llama(num_layers=6)
    report = prune_and_comp(iterative=False).apply(model, surgery.remove_layers(model, [3]), calib, Cost())
    ref = tiny_random_llama(num_layers=6)
    ins, outs = io_states(ref, calib, 3)
    assert report["sites"][0]["scale"] == pytest.approx(channel_magnitude_ratio(outs, ins)[0], rel=1e-12)


def test_apply_with_the_iterative_default_says_it_ran_one_shot():
    model = tiny_random_llama(num_layers=6)
    report = prune_and_comp().apply(model, surgery.remove_layers(model, [2]), make_calib(), Cost())
    assert report["procedure"] == "one_shot" and "prune_iteratively" in report["note"]


def test_yaml_defaults_are_official():
    cfg = OmegaConf.load(YAML)
    args = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "_target_"}
    assert args == {"iterative": True, "ratio": "channel_mean_abs"}
    comp = hydra.utils.instantiate(cfg)
    assert comp.interleaved and comp.ratio == "channel_mean_abs"
    with pytest.raises(ValueError, match="channel_mean_abs, token_l2"):
        prune_and_comp(ratio="l2")
