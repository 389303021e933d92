"""The last-word cloze task (asset `wiki_cloze`, gradmap/assets/cloze.py): items from a hand-made article, the
asset's files (validation and test articles only, a fixed shuffle), the lm-eval templates run on a tiny model, the
eval configs that carry it, and the tuning guard that keeps its test part out of any choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gradmap.assets.cloze import CONTEXT_WORDS, build_cloze, cloze_items, shuffled
from gradmap.assets.registry import ASSETS, DEFAULT_ASSETS
from gradmap.errors import ConfigError
from gradmap.evaluation import Evaluation, evaluate
from gradmap.lm_tasks import task_name, template_path
from gradmap.models import tiny_random_llama
from gradmap.validation import check_eval
from tests.test_evaluation import _tiny_hf_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LONG = " ".join(f"w{i}" for i in range(100))  # 100 words, none a target (digits)
ARTICLE = {"title": "T", "text": (
    "The old mill stood by the river for many years before the town was built around its "
    "quiet stone walls. It ground wheat for the farmers of the valley until the flood. Short one ends here.\n"
    "Heading\n"
    "It closed in 1901. The owners sold the land, the machines, the stones and the office to the railway in 1902. "
    "They kept the name, the water rights, the books, the accounts and the seals etc. "
    f"{LONG} and then it was finally \"quoted\". {LONG} and so ended the long story of the mill."
)}


def test_items_are_sentence_final_words_with_the_paragraph_before_them():
    items = cloze_items([ARTICLE])
    assert [i["target"] for i in items] == ["walls", "flood", "here", "mill"]
    first, second, third, last = items
    assert first["context"] == ("The old mill stood by the river for many years before the town was built around "
                                "its quiet stone")
    # The paragraph's earlier sentences are context too.
    assert second["context"].startswith("The old mill") and second["context"].endswith("farmers of the valley "
                                                                                      "until the")
    assert third["context"].endswith("until the flood. Short one ends")
    # Numbers ("1901."), abbreviations ("etc."), quoted words and a line without a sentence end give no item; the
    # context is cut from the left to CONTEXT_WORDS words.
    assert len(last["context"].split()) == CONTEXT_WORDS and last["context"].endswith("the long story of the")
    assert [i["idx"] for i in items] == [0, 1, 2, 3] and {i["title"] for i in items} == {"T"}


def test_too_short_a_context_gives_no_item():
    assert cloze_items([{"title": "S", "text": "A cat sat on the mat."}]) == []


def test_build_writes_validation_and_test_only_shuffled_once(tmp_path):
    wiki = tmp_path / "wiki"
    wiki.mkdir()
    for split in ("calib", "validation", "test"):
        text = ARTICLE["text"].replace("mill", f"{split}mill")
        (wiki / f"{split}.jsonl").write_text(json.dumps({"title": split, "text": text}) + "\n")
    counts = build_cloze(wiki, tmp_path / "out")
    assert counts == {"validation": 4, "test": 4}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "test.jsonl", "validation.jsonl"]
    for split in ("validation", "test"):
        rows = [json.loads(line) for line in (tmp_path / "out" / f"{split}.jsonl").read_text().splitlines()]
        assert {r["title"] for r in rows} == {split}
        expected = shuffled(cloze_items([{"title": split, "text": ARTICLE["text"].replace("mill", f"{split}mill")}]))
        assert rows == expected  # the seeded shuffle of the items, in text order before it
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["counts"] == counts
    assert "wiki_cloze" in DEFAULT_ASSETS and ASSETS["wiki_cloze"].sources == ("gensim",)


def test_templates_run_through_lm_eval_with_a_standard_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = [{"idx": i, "title": "T", "context": f"the mill number {i} stood by the", "target": "river"}
            for i in range(6)]
    data = tmp_path / "validation.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = _tiny_hf_tokenizer([f"{r['context']} {r['target']}" for r in rows])
    net = tiny_random_llama(vocab_size=len(tokenizer), num_layers=2)
    for task in ("wiki_cloze_validation", "wiki_cloze_test"):
        assert task_name(template_path(task)) == task
        cfg = Evaluation(heldout={"max_tokens": None, "texts": {}},
                         perplexity={"seq_lens": [], "batch_size": 4, "max_windows": None},
                         lm_eval={"tasks": [task], "limit": None, "batch_size": 4, "num_fewshot": 0, "seed": 0,
                                  "local_tasks": {task: {"template": f"{task}.yaml", "data": str(data),
                                                         "asset": None, "file": None}}},
                         cache_dense=False)
        with torch.no_grad():
            out = evaluate(net, tokenizer, cfg)["lm_eval"]
        assert 0.0 <= out[task]["acc"] <= 1.0 and "acc_stderr" in out[task]
        assert out["n-samples"][task]["effective"] == 6


def test_the_rule_is_written_in_the_validation_template():
    text = template_path("wiki_cloze_validation").read_text()
    assert "RULE" in text and "15 points above chance" in text and "3 of lm-eval's" in text


def compose_eval(name: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"eval={name}"]).eval


@pytest.mark.parametrize("name, task, split", [("offline", "wiki_cloze_test", "test"),
                                               ("validation", "wiki_cloze_validation", "validation")])
def test_eval_configs_carry_the_cloze(name, task, split):
    ev = compose_eval(name)
    assert task in ev.lm_eval.tasks
    spec = ev.lm_eval.local_tasks[task]
    assert (spec.template, spec.asset, spec.file) == (f"{task}.yaml", "wiki_cloze", f"{split}.jsonl")


def test_a_tuning_run_is_refused_the_test_items(tmp_path):
    ev = compose_eval("offline")
    evaluation = Evaluation(heldout={"max_tokens": None, "texts": {}},
                            perplexity={"seq_lens": [], "batch_size": 4, "max_windows": None},
                            lm_eval={**ev.lm_eval, "tasks": ["wiki_cloze_test"], "seed": 0}, cache_dense=False)
    with pytest.raises(ConfigError, match="wiki_cloze_test.*tuning") as err:
        check_eval(evaluation, True, tmp_path)
    assert err.value.key == "eval.lm_eval.tasks"
    with pytest.raises(ConfigError) as err:  # not tuning: passes the guard, stops at the unbuilt asset
        check_eval(evaluation, False, tmp_path)
    assert "tuning=true" not in str(err.value) and "python -m gradmap.assets wiki_cloze" in str(err.value)
