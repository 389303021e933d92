"""Benchmark: peak memory and time of one GradMAP scoring pass vs plain training steps.

GradMAP reduces gradients to per-layer numbers as they are produced, so its peak should be close to a forward +
backward that stores no parameter gradients, and below a training step that keeps the full gradient set. Each
mode runs in a fresh process (CPU: peak RSS sampled; CUDA: max allocated), after one warm-up pass.

    python -m experiments.bench_memory                       # SmolLM2-135M offline, 8 x 128 tokens
    python -m experiments.bench_memory --model tiny_random   # seconds, for a smoke check
    python -m experiments.bench_memory --device cuda --model llama3_8b   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODES = ("forward", "step_keep_grads", "step_drop_grads", "gradmap_weights", "gradmap_activations")


def _measure(mode: str, model_name: str, device: str, tokens: tuple[int, int]) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    from gradmap.gradmap_metric import GradMAPMetric
    from gradmap.metric import Calibration, Cost
    from gradmap.models import load_model
    from gradmap.memory import PeakRSS, rss_bytes

    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model_name}"])
    model, _ = load_model(cfg.model)
    if not cfg.model.get("device_map"):
        model.to(device)
    ids = torch.randint(0, model.config.vocab_size, tokens, device=device)
    calib = Calibration(ids, batch_size=tokens[0])

    def once() -> None:
        if mode == "forward":
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
        elif mode.startswith("step"):
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        else:
            GradMAPMetric(target=mode.split("_")[1], reduction="l2" if "weights" in mode else "first_order",
                          iterative=False).score(model, calib, Cost())

    if mode == "step_drop_grads":  # the reference: every gradient freed the moment it is complete
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
    once()  # warm-up: allocator pools, kernels
    model.zero_grad(set_to_none=True)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        once()
        if cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else rss.peak
    return {"mode": mode, "seconds": seconds, "peak_over_loaded_bytes": peak - base}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--_mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._mode:
        print(json.dumps(_measure(args._mode, args.model, args.device, (args.batch, args.seq_len))))
        return
    rows = {}
    # glibc keeps freed large blocks in its heap by default, so RSS would lag behind what is live; a fixed mmap
    # threshold returns every large block to the OS on free, making peak RSS track live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for mode in MODES:
        out = subprocess.run([sys.executable, "-m", "experiments.bench_memory", "--model", args.model, "--device",
                              args.device, "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--_mode", mode],
                             capture_output=True, text=True, check=True, env=env)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    ref = rows["step_drop_grads"]
    print(f"model={args.model} device={args.device} tokens={args.batch}x{args.seq_len}")
    print(f"{'mode':<22}{'peak MiB':>10}{'vs step w/o grads':>20}{'seconds':>10}{'vs step':>10}")
    for mode, r in rows.items():
        print(f"{mode:<22}{r['peak_over_loaded_bytes'] / 2**20:>10.0f}"
              f"{r['peak_over_loaded_bytes'] / max(ref['peak_over_loaded_bytes'], 1):>20.2f}"
              f"{r['seconds']:>10.2f}{r['seconds'] / ref['seconds']:>10.2f}")


if __name__ == "__main__":
    main()
