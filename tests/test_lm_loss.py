"""The memory-lean backward (issue 17): the chunked next-token loss equals the model's own loss and gradients, and
GradMAP's / Taylor's / gradmap_verify's defaults (checkpointing + chunked loss) give the scores of the plain backward.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradmap.data import Calibration
from gradmap.lm_loss import backward_lm_loss, chunkable, chunked_loss
from gradmap.models import tiny_random_llama
from gradmap.stages import Cost, count_forward_tokens
from tests.model_state import assert_unchanged, snapshot
from tests.tiny_models import method

VOCAB = 256


def tiny_gemma3(softcap: float | None = None) -> nn.Module:
    """A tiny random Gemma-3 (sliding + global attention, a norm after the MLP; soft-capped logits if asked)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                           max_position_embeddings=64, final_logit_softcapping=softcap)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).eval()


MODELS = {"llama": lambda: tiny_random_llama(vocab_size=VOCAB, num_layers=4),
          "gemma3": tiny_gemma3, "gemma3_softcap": lambda: tiny_gemma3(softcap=3.0)}


def ids(rows: int = 3, seq: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_loss_and_gradients_equal_the_models_own(name, chunk):
    model = MODELS[name]()
    assert chunkable(model)
    batch = ids()
    params = list(model.parameters())
    ref = model(input_ids=batch, labels=batch, use_cache=False).loss
    ref_grads = torch.autograd.grad(ref, params)
    got = chunked_loss(model, batch, chunk)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_backward_books_forward_and_backward_tokens_once():
    model, batch = MODELS["llama"](), ids()
    for chunk in (0, 5):
        cost = Cost()
        with count_forward_tokens(model, cost):  # the runner's hook on the whole model
            backward_lm_loss(model, batch, cost, chunk)
        assert (cost.forward_tokens, cost.backward_tokens) == (batch.numel(), batch.numel())


def test_unknown_family_falls_back_to_the_models_own_loss():
    model = MODELS["llama"]()
    model.config.model_type = "some_new_family"
    assert not chunkable(model)
    cost = Cost()
    with count_forward_tokens(model, cost):
        backward_lm_loss(model, ids(), cost, 4)
    assert cost.forward_tokens == ids().numel()


LEAN = {"gradient_checkpointing": True, "loss_chunk_tokens": 5}
PLAIN = {"gradient_checkpointing": False, "loss_chunk_tokens": 0}
METRICS = {
    "gradmap_first_order": lambda **kw: method("metric/gradmap", **kw),
    "gradmap_l2": lambda **kw: method("metric/gradmap", reduction="l2", **kw),
    "gradmap_weights": lambda **kw: method("metric/gradmap", target="weights", reduction="l2", **kw),
    "taylor": lambda **kw: method("metric/taylor", **kw),
}


@pytest.mark.parametrize("name", ["llama", "gemma3"])
@pytest.mark.parametrize("metric", METRICS)
def test_lean_backward_gives_the_plain_backwards_scores(name, metric):
    model = MODELS[name]()
    calib = Calibration(ids(rows=4, seq=12), batch_size=2)
    before = snapshot(model)
    plain = METRICS[metric](**PLAIN).score(model, calib, Cost())
    lean = METRICS[metric](**LEAN).score(model, calib, Cost())
    assert_unchanged(before, snapshot(model))
    assert not getattr(model, "is_gradient_checkpointing", False)
    assert all(not m.training for m in model.modules())
    assert torch.equal(torch.argsort(lean), torch.argsort(plain))
    torch.testing.assert_close(lean, plain, rtol=1e-4, atol=1e-9)


def test_gradmap_verify_selection_unchanged_by_the_lean_backward():
    model = tiny_random_llama(vocab_size=VOCAB, num_layers=6)  # 4 prunable layers: k=2 screens
    calib = Calibration(ids(rows=4, seq=12), batch_size=2)
    plain = method("metric/gradmap_verify", candidates=2, **PLAIN).select(model, calib, 2, Cost())
    lean = method("metric/gradmap_verify", candidates=2, **LEAN).select(model, calib, 2, Cost())
    assert lean.removed == plain.removed
    for a, b in zip(lean.decisions, plain.decisions):
        torch.testing.assert_close(torch.tensor([x for x in a.gradient_scores if x is not None]),
                                   torch.tensor([x for x in b.gradient_scores if x is not None]), rtol=1e-4, atol=0)


def test_checkpointing_keeps_dropout_off():
    """Checkpointing sets only the decoder layers' own training flags, so attention dropout stays off."""
    model = tiny_random_llama(vocab_size=VOCAB, num_layers=3, attention_dropout=0.5)
    calib = Calibration(ids(rows=2, seq=10), batch_size=2)
    a = method("metric/gradmap", **LEAN).score(model, calib, Cost())
    b = method("metric/gradmap", **LEAN).score(model, calib, Cost())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, method("metric/gradmap", **PLAIN).score(model, calib, Cost()), rtol=1e-4, atol=1e-9)


def test_loss_chunk_tokens_is_checked():
    from gradmap.errors import ConfigError

    with pytest.raises(ConfigError, match="loss_chunk_tokens"):
        method("metric/gradmap", loss_chunk_tokens=-1)
