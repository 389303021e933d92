"""The BOS token at the start of every window (gradmap/windows.py): decided by the model family or
`model.window_bos`, the same draws and stream tokens as without it, and never counted as a prediction."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from gradmap.data import sample_windows
from gradmap.errors import ConfigError
from gradmap.evaluation import perplexity
from gradmap.models import ByteTokenizer, tiny_random_llama
from gradmap.windows import cut_windows, decide_window_bos
from tests.tiny_models import WORDS, bos_tokenizer, tiny_gemma3

ROOT = Path(__file__).resolve().parents[1]


def _text(seed: int, n: int = 400) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_the_family_decides_and_the_key_overrides():
    tok = bos_tokenizer()
    gemma, llama = tiny_gemma3().config, tiny_random_llama().config
    auto = decide_window_bos(None, gemma, tok)
    assert auto.bos and auto.token == tok.bos_token_id == 2 and auto.tokenizer_adds_bos is False
    assert "gemma3_text" in auto.decided_by
    assert decide_window_bos(False, gemma, tok).token is None  # overridden off
    assert decide_window_bos(None, llama, tok).token is None  # Llama keeps the one-stream protocol
    assert decide_window_bos(True, llama, tok).token == 2  # overridden on
    assert decide_window_bos(None, llama, ByteTokenizer()).bos is False
    with pytest.raises(ConfigError, match="model.window_bos=True: windows should start with a BOS token"):
        decide_window_bos(True, llama.__class__(bos_token_id=None), ByteTokenizer())
    with pytest.raises(ConfigError, match="model.window_bos"):
        decide_window_bos("yes", llama, tok)


def test_calibration_windows_start_with_bos_and_keep_the_same_draws():
    tok = bos_tokenizer()
    texts = [_text(i) for i in range(5)]
    plain = sample_windows(texts, tok, num_samples=6, seq_len=16, seed=3)
    with_bos = sample_windows(texts, tok, num_samples=6, seq_len=16, seed=3, bos_id=2)
    assert with_bos.shape == plain.shape == (6, 16)
    assert (with_bos[:, 0] == 2).all() and not (plain == 2).any()  # the stream itself has no BOS
    assert torch.equal(with_bos[:, 1:], plain[:, :-1])  # same document and offset, one stream token fewer
    assert torch.equal(sample_windows(texts, tok, 6, 16, 3, bos_id=None), plain)  # no BOS: unchanged


def test_cut_windows_with_and_without_bos():
    ids = torch.arange(10, 60)  # 50 stream tokens
    assert torch.equal(cut_windows(ids, 8), ids[:48].view(6, 8))  # the GPTQ recipe, tail dropped
    w = cut_windows(ids, 8, bos_id=2)
    assert w.shape == (7, 8) and (w[:, 0] == 2).all()
    assert torch.equal(w[:, 1:].flatten(), ids[:49])  # consecutive, every stream token once
    assert cut_windows(ids, 8, bos_id=2, max_windows=3).shape == (3, 8)


def test_perplexity_with_bos_predicts_the_stream_tokens_and_never_the_bos():
    tok = bos_tokenizer()
    model = tiny_gemma3()
    ids = torch.tensor(tok(_text(7, 200), add_special_tokens=False)["input_ids"])
    seq = 16
    out = perplexity(model, ids, seq, batch_size=3, progress=False, bos_id=2)
    n = ids.numel() // (seq - 1)
    assert out["windows"] == n and out["tokens"] == n * (seq - 1) and out["bos"] is True
    # By hand: window i = [BOS] + 15 stream tokens; the labels are exactly those 15 stream tokens.
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            body = ids[i * (seq - 1):(i + 1) * (seq - 1)]
            logits = model(input_ids=torch.cat([torch.tensor([2]), body])[None]).logits[0]
            total += F.cross_entropy(logits[:-1], body, reduction="sum").item()
            count += body.numel()
    assert count == out["tokens"] and 2 not in ids.tolist()
    assert out["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    plain = perplexity(model, ids, seq, batch_size=3, progress=False)
    assert plain["bos"] is False and plain["tokens"] == (ids.numel() // seq) * (seq - 1)
    assert plain["ppl"] != pytest.approx(out["ppl"], rel=1e-6)  # the BOS changes what the model sees


def test_a_record_from_before_window_bos_reads_as_what_its_code_did():
    """No window had a BOS before the key existed: that is `null` for SmolLM2 (same job today, not rerun) and an
    explicit `false` for Gemma (today's `null` would add the BOS, another job)."""
    from gradmap.record import RunRecord

    def old(model_class, asset):
        return {"schema_version": 1, "model_class": model_class,
                "config": {"model": {"_target_": "gradmap.models.OfflineModel", "asset": asset}}}

    assert RunRecord.from_dict(old("LlamaForCausalLM", "smollm2_135m")).config["model"]["window_bos"] is None
    assert RunRecord.from_dict(old("Gemma3ForCausalLM", "gemma3_270m")).config["model"]["window_bos"] is False
    assert RunRecord.from_dict(old(None, "gemma3_270m")).config["model"]["window_bos"] is False  # failed early


def test_keys_added_later_default_to_the_shipped_defaults():
    """A finished record without a key added later reads it as today's default, which lives in the YAML of the
    class (the code holds no second copy)."""
    from gradmap.record import ADDED_COMPENSATION_KEYS, ADDED_METRIC_KEYS

    for group, added in (("compensation", ADDED_COMPENSATION_KEYS), ("metric", ADDED_METRIC_KEYS)):
        yamls = {OmegaConf.load(p)["_target_"]: OmegaConf.load(p) for p in (ROOT / "conf" / group).glob("*.yaml")}
        for target, keys in added.items():
            assert {k: yamls[target][k] for k in keys} == keys, target
