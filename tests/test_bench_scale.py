"""The GPU check script (experiments/bench_scale.py) at a tiny shape on the CPU: it builds a model of a named
architecture from its config with random weights, saves it with the offline tokenizer, runs the real CLI for the
metrics and prints their time, peak memory and token ratios (issue 17). Needs the offline tokenizer (smollm2_135m)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_bench_scale_runs_the_cli_for_each_metric_at_a_tiny_shape(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-m", "experiments.bench_scale", "--arch", "tiny", "--device", "cpu",
                          "--dtype", "float32", "--seq-len", "32", "--num-samples", "2", "--batch-size", "2",
                          "--num-prune", "2", "--eval-tokens", "256", "--metrics", "bi", "gradmap", "gradmap_verify",
                          "sleb", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "report")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| gradmap |" in out.stdout and "gradmap/bi peak" in out.stdout and "sleb/gradmap time" in out.stdout
    result = json.loads((tmp_path / "report" / "results.json").read_text())
    assert result["model"]["num_hidden_layers"] == 8 and result["model"]["model_type"] == "llama"
    rows = {r["name"]: r for r in result["rows"]}
    assert all(r["status"] == "done" and len(r["removed"]) == 2 for r in rows.values())
    n = 2 * 32  # calibration tokens
    assert (rows["gradmap"]["forward_tokens"], rows["gradmap"]["backward_tokens"]) == (n, n)
    assert rows["bi"]["backward_tokens"] == 0 and rows["sleb"]["forward_tokens"] > rows["gradmap"]["forward_tokens"]
    assert (tmp_path / "report" / "results.md").read_text().startswith("```\npython -m experiments.bench_scale")
