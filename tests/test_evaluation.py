"""Evaluation: perplexity against a hand computation, window handling, lm-eval on a tiny model with a real tokenizer.

The lm-eval test runs the whole `evaluate` path offline on a tiny random Llama, a byte-level BPE tokenizer trained
here on a few sentences (no hub download) and a 6-row local JSONL task built from the shipped template.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from gradmap.data import HeldoutText
from gradmap.evaluation import Evaluation, evaluate, headline, perplexity, retained, run_lm_eval
from gradmap.lm_tasks import materialize_local_task
from gradmap.models import ByteTokenizer, tiny_random_llama

VOCAB = 64
SEQ = 16


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls gain nothing from threads, and thread hand-off dominates their cost on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_random_llama(vocab_size=VOCAB, num_layers=2)


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _window_nll_sum(model, window: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(window[None]).logits[0]
    return F.cross_entropy(logits[:-1].double(), window[1:], reduction="sum").item()


def test_perplexity_of_one_window_is_exp_mean_cross_entropy(model):
    ids = _tokens(SEQ + 5)  # one window plus a tail that must be ignored
    with torch.no_grad():
        logits = model(ids[None, :SEQ]).logits[0]
    mean_ce = F.cross_entropy(logits[:-1], ids[1:SEQ]).item()
    out = perplexity(model, ids, SEQ, progress=False)
    assert out["windows"] == 1 and out["tokens"] == SEQ - 1 and out["seq_len"] == SEQ
    assert out["nll"] == pytest.approx(mean_ce, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(mean_ce), rel=1e-5)


def test_perplexity_windows_tail_batches_and_max_windows(model):
    ids = _tokens(3 * SEQ + 7, seed=1)
    sums = [_window_nll_sum(model, ids[i * SEQ:(i + 1) * SEQ]) for i in range(3)]
    full = perplexity(model, ids, SEQ, batch_size=2, progress=False)  # a full batch and a partial one
    assert (full["windows"], full["tokens"]) == (3, 3 * (SEQ - 1))
    assert full["ppl"] == pytest.approx(math.exp(sum(sums) / (3 * (SEQ - 1))), rel=1e-5)
    assert perplexity(model, ids, SEQ, batch_size=1, progress=False)["ppl"] == pytest.approx(full["ppl"], rel=1e-5)
    capped = perplexity(model, ids, SEQ, batch_size=8, max_windows=2, progress=False)
    assert (capped["windows"], capped["tokens"]) == (2, 2 * (SEQ - 1))
    assert capped["ppl"] == pytest.approx(math.exp(sum(sums[:2]) / (2 * (SEQ - 1))), rel=1e-5)
    assert not model.training


def test_perplexity_rejects_bad_inputs(model):
    with pytest.raises(ValueError, match=r"10 tokens.*seq_len=16"):
        perplexity(model, _tokens(10), SEQ, progress=False)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, _tokens(64).view(4, 16), SEQ, progress=False)
    with pytest.raises(ValueError, match="seq_len=1"):
        perplexity(model, _tokens(64), 1, progress=False)


def test_materialize_local_task_errors(tmp_path):
    with pytest.raises(ValueError, match="social_iqa_bigbench.yaml"):
        materialize_local_task("nope.yaml", tmp_path / "x.jsonl", tmp_path)
    with pytest.raises(FileNotFoundError, match="x.jsonl"):
        materialize_local_task("social_iqa_bigbench.yaml", tmp_path / "x.jsonl", tmp_path)


def test_lm_eval_refuses_a_non_hf_tokenizer(model):
    with pytest.raises(TypeError, match="ByteTokenizer"):
        run_lm_eval(model, ByteTokenizer(VOCAB), ["social_iqa_bigbench"], 4, None, 0, 0)


def test_headline_and_retained():
    def ppl(value):
        return {"wiki_test": {"corpus": "wiki", "split": "test", "seq_lens": {"128": {"ppl": value}}}}

    dense = {"perplexity": ppl(10.0), "lm_eval": {"t": {"acc": 0.8, "acc_norm": 0.0, "acc_stderr": 0.1},
                                                  "versions": {"t": 1.0}}}
    pruned = {"perplexity": ppl(20.0), "lm_eval": {"t": {"acc": 0.4, "acc_norm": 0.5}}}
    assert headline(dense) == {"ppl@128/wiki_test": 10.0, "t/acc": 0.8, "t/acc_norm": 0.0}
    kept = retained(dense, pruned)
    assert kept["ppl@128/wiki_test"] == pytest.approx(50.0) and kept["t/acc"] == pytest.approx(50.0)
    assert math.isnan(kept["t/acc_norm"])  # dense accuracy 0: undefined


def _tiny_hf_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_evaluate_runs_lm_eval_offline_on_a_local_task(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    choices = ["go home", "help the friend", "eat dinner"]
    rows = [{"question": f"Alex finished task {i}. What will Alex want to do next?", "choices": choices,
             "label": i % 3, "idx": i} for i in range(6)]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = _tiny_hf_tokenizer([f"Q: {r['question']}\nA: {c}" for r in rows for c in choices])
    net = tiny_random_llama(vocab_size=len(tokenizer), num_layers=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    cfg = Evaluation(
        heldout={"max_tokens": None, "texts": {}},
        perplexity={"seq_lens": [8], "batch_size": 4, "max_windows": 2},
        lm_eval={"tasks": ["social_iqa_bigbench"], "limit": None, "batch_size": 4, "num_fewshot": 0, "seed": 0,
                 "local_tasks": {"social_iqa_bigbench": {"template": "social_iqa_bigbench.yaml", "data": str(data),
                                                         "asset": None, "file": None}}},
        cache_dense=False)
    heldout = HeldoutText("qa_test", "jsonl", "test",
                          torch.tensor(tokenizer("\n".join(r["question"] for r in rows))["input_ids"]))
    out = evaluate(net, tokenizer, cfg, [heldout])

    assert out["perplexity"]["qa_test"]["seq_lens"]["8"]["windows"] == 2
    assert (out["perplexity"]["qa_test"]["corpus"], out["perplexity"]["qa_test"]["split"]) == ("jsonl", "test")
    task = out["lm_eval"]["social_iqa_bigbench"]
    assert 0.0 <= task["acc"] <= 1.0 and 0.0 <= task["acc_norm"] <= 1.0 and "acc_stderr" in task
    assert out["lm_eval"]["versions"]["social_iqa_bigbench"] == 1.0
    assert out["lm_eval"]["n-samples"]["social_iqa_bigbench"]["effective"] == 6
    assert out["lm_eval"]["config"]["batch_size"] == 4
    json.dumps(out)  # recordable as is
    assert set(headline(out)) == {"ppl@8/qa_test", "social_iqa_bigbench/acc", "social_iqa_bigbench/acc_norm"}
    assert not net.training
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_evaluate_skips_lm_eval_without_tasks(model):
    cfg = Evaluation(heldout={"max_tokens": None, "texts": {}},
                     perplexity={"seq_lens": [SEQ], "batch_size": 4, "max_windows": None},
                     lm_eval={"tasks": [], "limit": None, "batch_size": 4, "num_fewshot": 0, "local_tasks": {},
                              "seed": 0},
                     cache_dense=False)
    out = evaluate(model, ByteTokenizer(VOCAB), cfg, [HeldoutText("t", "jsonl", "validation", _tokens(2 * SEQ))])
    assert out["lm_eval"] == {} and out["perplexity"]["t"]["seq_lens"][str(SEQ)]["windows"] == 2
    with pytest.raises(ValueError, match="no held-out text"):
        evaluate(model, ByteTokenizer(VOCAB), cfg, [])
