"""Integration tests on the real offline SmolLM2-135M (needs `python -m gradmap.assets`, which `make test` runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2():
    from gradmap.models import OfflineModel

    torch.set_num_threads(2)
    model, tok = OfflineModel(asset="smollm2_135m", dtype="float32", device_map=None, window_bos=None).load()
    yield model, tok
    torch.set_num_threads(1)


def test_pruned_smollm2_saves_and_reloads_with_plain_transformers(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradmap import surgery
    from gradmap.checkpoint import save_pruned

    model, tok = smollm2
    removed = surgery.remove_layers(model, [12, 20, 25])
    try:
        prompt = tok("The history of the city begins", return_tensors="pt")
        expected = model.generate(**prompt, max_new_tokens=12, do_sample=False)
        save_pruned(model, tok, tmp_path / "pruned", {"removed_layers": [12, 20, 25]})
    finally:
        surgery.restore_layers(model, removed)
    assert not (tmp_path / "pruned" / "config.json").read_text().count("quantization_config")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "pruned")
    assert reloaded.config.num_hidden_layers == 27
    got = reloaded.generate(**tok2("The history of the city begins", return_tensors="pt"), max_new_tokens=12,
                            do_sample=False)
    assert torch.equal(got, expected)  # same tokens, with the KV cache, from the plain checkpoint
    text = tok2.decode(got[0][prompt["input_ids"].shape[1]:])
    assert len(text.strip()) > 0
    assert json.loads((tmp_path / "pruned" / "pruning_info.json").read_text())["removed_layers"] == [12, 20, 25]


def test_run_py_on_smollm2_small_budget(tmp_path):
    """The real entry point, end to end, with a small calibration/eval budget (lm-eval on 5 items of social_iqa and of
    the wiki cloze)."""
    from gradmap.assets import cache_root

    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "run"
    # cache_dir moves the asset cache too: a fresh selection/dense cache that links the built assets.
    (tmp_path / "cache").mkdir()
    for name in ("smollm2_135m", "wiki", "news", "social_iqa", "wiki_cloze"):
        (tmp_path / "cache" / name).symlink_to(cache_root() / name)
    cmd = [sys.executable, "run.py", "num_prune=2", "calibration.num_samples=2", "calibration.seq_len=32",
           "eval.heldout.max_tokens=1024", "eval.lm_eval.limit=5", "eval.cache_dense=false",
           f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={out}", f"save_dir={tmp_path / 'saved'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((out / "record.json").read_text())
    assert rec["status"] == "done" and rec["num_layers"] == 30 and len(rec["removed_layers"]) == 2
    pruned = rec["results"]["pruned"]
    assert 0.0 <= pruned["lm_eval"]["social_iqa_bigbench"]["acc"] <= 1.0
    assert pruned["lm_eval"]["versions"]["social_iqa_bigbench"] is not None
    cloze = pruned["lm_eval"]["wiki_cloze_test"]
    assert 0.0 <= cloze["acc"] <= 1.0 and cloze["acc_stderr"] >= 0.0  # every row carries its standard error
    assert rec["results"]["dense"]["lm_eval"]["n-samples"]["wiki_cloze_test"]["effective"] == 5
    dense_ppl = rec["results"]["dense"]["perplexity"]["wiki_test"]["seq_lens"]["128"]["ppl"]
    assert dense_ppl < pruned["perplexity"]["wiki_test"]["seq_lens"]["128"]["ppl"] * 1.5
    assert rec["compensation"]["final_rel_error_after"] < rec["compensation"]["final_rel_error_before"]
    assert "removed" in proc.stdout and "pruning time" in proc.stdout
    assert (tmp_path / "saved" / "pruning_info.json").exists()
    assert list((out / "wandb").glob("offline-run-*")), "W&B offline run not written"
