"""GPU check at the scale users run: an N-B-shaped model of a named architecture, built from its config with random
weights (no download), saved with the offline tokenizer, then pruned by the real CLI (`run.py`) with gradmap, bi,
sleb and gradmap_verify; prints each scoring stage's time, peak memory and tokens, and their ratios, as a table.

Random weights make the scores meaningless but the cost real: time, memory and tokens depend on the shapes only.

    python -m experiments.bench_scale --arch llama2_7b --device cuda        # on a GPU (7B bf16: ~14 GB on disk)
    python -m experiments.bench_scale --arch tiny --device cpu --seq-len 64 --num-samples 4 --batch-size 2 \
        --num-prune 2                                       # seconds on a CPU (tests/test_bench_scale.py)

On a GPU machine without network access, to which only a small folder can be copied (README, "GPU check"), the
folder needs: this project's code (gradmap/, methods/, experiments/, conf/, run.py), hydra-core, omegaconf and
antlr4 as pure-Python package folders, the `wiki` asset folder of the cache (calibration text) and the offline
tokenizer's files (tokenizer.json, tokenizer_config.json of `smollm2_135m`); PYTHONPATH and GRADMAP_CACHE point
there, and `--tokenizer` names the tokenizer folder. PyTorch, transformers and accelerate must be installed there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Published shapes (the models' config.json on the hub); `vocab_size` grows to the offline tokenizer's if smaller,
# so that every token id it produces is valid.
ARCHS: dict[str, tuple[str, dict]] = {
    "llama2_7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "llama2_13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                                 max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "llama3_8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                max_position_embeddings=8192, rms_norm_eps=1e-5)),
    "mistral_7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                   max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None)),
    "qwen2_5_7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 max_position_embeddings=32768, rms_norm_eps=1e-6)),
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096)),
}
# name -> (metric group option, extra overrides)
METRICS = {
    "bi": ("bi", []),
    "gradmap": ("gradmap", []),
    "gradmap_plain": ("gradmap", ["metric.gradient_checkpointing=false", "metric.loss_chunk_tokens=0"]),
    # one knob at a time: where the plain backward's memory goes (activation graph vs full-vocabulary logits)
    "gradmap_ckpt_only": ("gradmap", ["metric.loss_chunk_tokens=0"]),
    "gradmap_chunk_only": ("gradmap", ["metric.gradient_checkpointing=false"]),
    "gradmap_verify": ("gradmap_verify", []),
    "sleb": ("sleb", []),
}


def default_tokenizer() -> Path:
    from gradmap.assets.store import asset_dir

    return asset_dir("smollm2_135m")


def build(arch: str, folder: Path, tokenizer_dir: Path, device: str, dtype: str) -> dict:
    """Build the architecture with random weights on `device` in `dtype` and save it (with the tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_type, shape = ARCHS[arch]
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    shape = {**shape, "vocab_size": max(shape["vocab_size"], len(tokenizer))}
    config = AutoConfig.for_model(model_type, **shape, tie_word_embeddings=False,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    del model
    info = {"arch": arch, "model_type": model_type, "parameters": params, "dtype": dtype, **shape,
            "build_seconds": time.perf_counter() - t0}
    (folder / "bench_scale.json").write_text(json.dumps(info, indent=1))
    return info


def run_metric(name: str, folder: Path, runs: Path, args: argparse.Namespace) -> dict:
    metric, extra = METRICS[name]
    out = runs / name
    cmd = [sys.executable, str(ROOT / "run.py"), "model=llama2_7b", f"model.pretrained={folder}",
           f"model.dtype={args.dtype}", f"device={args.device}", f"metric={metric}", *extra, "compensation=none",
           "logger=none", "eval=validation", "tuning=true", "eval.lm_eval.tasks=[]",
           f"eval.heldout.max_tokens={args.eval_tokens}",
           f"calibration.seq_len={args.seq_len}", f"calibration.num_samples={args.num_samples}",
           f"calibration.batch_size={args.batch_size}", f"num_prune={args.num_prune}", "cache_selection=false",
           f"hydra.run.dir={out}", *([] if args.device.startswith("cuda") else ["model.device_map=null"]),
           *args.override]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    wall = time.perf_counter() - t0
    rec = json.loads((out / "record.json").read_text()) if (out / "record.json").exists() else {}
    if proc.returncode != 0 or rec.get("status") != "done":
        return {"name": name, "status": "failed", "wall": wall,
                "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    t = rec["timings"]
    mem = t["peak_memory"].get("score", {})
    peak = mem.get("cuda_max_allocated_bytes", mem.get("cpu_rss_bytes", 0))
    return {"name": name, "status": "done", "wall": wall, "score_seconds": t["seconds"].get("score", 0.0),
            "peak_bytes": peak, "forward_tokens": rec["original_scoring"]["forward_tokens"],
            "backward_tokens": rec["original_scoring"]["backward_tokens"], "removed": rec["removed_layers"]}


def table(rows: list[dict], info: dict, args: argparse.Namespace) -> str:
    by = {r["name"]: r for r in rows if r["status"] == "done"}
    gib = 2 ** 30
    unit = "CUDA max allocated" if args.device.startswith("cuda") else "CPU peak RSS (process)"
    lines = [f"{info['arch']}-shaped {info['model_type']} ({info['parameters'] / 1e9:.2f}B parameters, {info['dtype']},"
             f" random weights), {args.device}; calibration {args.num_samples} x {args.seq_len} tokens, micro-batch "
             f"{args.batch_size}; {args.num_prune} of {info['num_hidden_layers']} layers removed",
             "", f"| metric | scoring time (s) | peak memory, scoring ({unit}, GiB) | peak / BI's "
                 "| tokens (fwd + bwd) |",
             "|---|---:|---:|---:|---:|"]
    bi = by.get("bi")
    for r in rows:
        if r["status"] != "done":
            lines.append(f"| {r['name']} | failed: {r['error']} | | | |")
            continue
        ratio = f"{r['peak_bytes'] / bi['peak_bytes']:.2f}" if bi else "-"
        lines.append(f"| {r['name']} | {r['score_seconds']:.2f} | {r['peak_bytes'] / gib:.2f} | {ratio} | "
                     f"{r['forward_tokens']:,} + {r['backward_tokens']:,} |")
    ratios = []
    pairs = (("gradmap", "bi", "peak"), ("gradmap_plain", "gradmap", "peak"), ("gradmap", "gradmap_plain", "time"),
             ("sleb", "gradmap", "time"), ("gradmap_verify", "gradmap", "time"), ("sleb", "gradmap_verify", "time"))
    for a, b, what in pairs:
        if a in by and b in by:
            key = "peak_bytes" if what == "peak" else "score_seconds"
            ratios.append(f"{a}/{b} {what} {by[a][key] / max(by[b][key], 1e-12):.2f}")
    lines += ["", "ratios: " + "; ".join(ratios)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llama2_7b", choices=list(ARCHS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-prune", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=4096, help="validation tokens evaluated per run (kept small)")
    p.add_argument("--metrics", nargs="+", default=["bi", "gradmap", "gradmap_plain", "gradmap_verify", "sleb"],
                   choices=list(METRICS))
    p.add_argument("--tokenizer", type=Path, default=None, help="offline tokenizer folder (default: smollm2_135m)")
    p.add_argument("--work", type=Path, default=Path("outputs/bench_scale"), help="model and run folders")
    p.add_argument("--out", type=Path, default=None, help="also write results.json and results.md here")
    p.add_argument("--override", nargs="*", default=[], help="extra overrides for every run")
    args = p.parse_args(argv)
    folder = args.work / f"model_{args.arch}_{args.dtype}"
    if (folder / "bench_scale.json").exists():
        info = json.loads((folder / "bench_scale.json").read_text())
    else:
        folder.mkdir(parents=True, exist_ok=True)
        info = build(args.arch, folder, args.tokenizer or default_tokenizer(), args.device, args.dtype)
    print(f"[bench_scale] model {folder}: {info['parameters'] / 1e9:.2f}B parameters", flush=True)
    runs = args.work / f"runs_{time.strftime('%Y%m%d-%H%M%S')}"
    rows = []
    for name in args.metrics:
        row = run_metric(name, folder.resolve(), runs.resolve(), args)
        print(f"[bench_scale] {name}: {row['status']} in {row['wall']:.0f}s", flush=True)
        rows.append(row)
    text = table(rows, info, args)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) for k, v in vars(args).items()}
        (args.out / "results.json").write_text(json.dumps({"model": info, "args": settings, "rows": rows}, indent=1))
        command = f"python -m experiments.bench_scale {' '.join(argv or sys.argv[1:])}"
        (args.out / "results.md").write_text(f"```\n{command}\n```\n\n{text}\n")
    return 0 if all(r["status"] == "done" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
