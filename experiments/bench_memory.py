"""Benchmark: peak memory and time of one scoring pass of the gradient metrics vs a forward-only metric (BI).

GradMAP's score needs, per layer, dL/dh and the layer's update reduced to a few numbers; by default it recomputes
each layer in the backward (`metric.gradient_checkpointing=true`) and applies the head + cross-entropy over chunks of
positions (`metric.loss_chunk_tokens`, gradmap/lm_loss.py), so its peak should be close to a forward's. The
`_plain` rows are the same metrics with both knobs off (this repository's behaviour before issue 17). Each mode runs
in a fresh process (CPU: peak RSS over the loaded model; CUDA: max allocated over the loaded model), after one
warm-up pass (time: the median of `--repeat` passes); metrics are built from their YAML (conf/metric), so the
defaults measured are the shipped ones.

    python -m experiments.bench_memory                       # SmolLM2-135M offline, 8 x 128 tokens
    python -m experiments.bench_memory --model tiny_random   # seconds, for a smoke check
    python -m experiments.bench_memory --device cuda --model llama3_8b --batch 4 --seq-len 2048   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# mode -> metric overrides (None: a plain training step that frees each gradient at once, for reference)
MODES: dict[str, list[str] | None] = {
    "bi": ["metric=bi"],
    "gradmap": ["metric=gradmap"],
    "gradmap_plain": ["metric=gradmap", "metric.gradient_checkpointing=false", "metric.loss_chunk_tokens=0"],
    "gradmap_ckpt_only": ["metric=gradmap", "metric.loss_chunk_tokens=0"],
    "gradmap_chunk_only": ["metric=gradmap", "metric.gradient_checkpointing=false"],
    "gradmap_weights": ["metric=gradmap", "metric.target=weights", "metric.reduction=l2"],
    "taylor": ["metric=taylor"],
    "taylor_plain": ["metric=taylor", "metric.loss_chunk_tokens=0"],
    "step_drop_grads": None,
}
REFERENCE = "bi"


def _measure(mode: str, model_name: str, device: str, tokens: tuple[int, int], extra: list[str],
             repeat: int) -> dict:
    from pathlib import Path

    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from gradmap.data import Calibration
    from gradmap.memory import PeakRSS, rss_bytes
    from gradmap.models import load_model
    from gradmap.stages import Cost

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model_name}", *(MODES[mode] or []), *extra])
    model, _ = load_model(cfg.model)
    if not cfg.model.get("device_map"):
        model.to(device)
    ids = torch.randint(0, model.config.vocab_size, tokens, device=device)
    calib = Calibration(ids, batch_size=tokens[0])
    metric = instantiate(cfg.metric) if MODES[mode] else None

    def once() -> None:
        if metric is not None:
            metric.score(model, calib, Cost())
        else:
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    if metric is None:  # the reference: every gradient freed the moment it is complete
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
    once()  # warm-up: allocator pools, kernels
    model.zero_grad(set_to_none=True)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    times = []
    with PeakRSS() as rss:
        for _ in range(repeat):
            t0 = time.perf_counter()
            once()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]  # the median pass
    peak = torch.cuda.max_memory_allocated() if cuda else rss.peak
    return {"mode": mode, "seconds": seconds, "peak_over_loaded_bytes": peak - base, "loaded_bytes": base}


def table(rows: dict[str, dict], header: str) -> str:
    ref = rows[REFERENCE]
    lines = [header, f"{'mode':<18}{'peak MiB over model':>20}{'peak / bi':>11}{'seconds':>10}{'time / bi':>11}"]
    for mode, r in rows.items():
        lines.append(f"{mode:<18}{r['peak_over_loaded_bytes'] / 2**20:>20.0f}"
                     f"{r['peak_over_loaded_bytes'] / max(ref['peak_over_loaded_bytes'], 1):>11.2f}"
                     f"{r['seconds']:>10.2f}{r['seconds'] / ref['seconds']:>11.2f}")
    if "gradmap" in rows and "gradmap_plain" in rows:
        g, p = rows["gradmap"], rows["gradmap_plain"]
        bi = ref["peak_over_loaded_bytes"]
        lines.append(f"GradMAP scoring peak / BI peak: {p['peak_over_loaded_bytes'] / bi:.2f}"
                     f" before (no checkpointing, full logits) -> {g['peak_over_loaded_bytes'] / bi:.2f}"
                     f" now; time {g['seconds'] / p['seconds']:.2f}x before's")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every mode (e.g. dtype)")
    p.add_argument("--repeat", type=int, default=3, help="timed passes after the warm-up (the median is reported)")
    p.add_argument("--_mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._mode:
        print(json.dumps(_measure(args._mode, args.model, args.device, (args.batch, args.seq_len), args.override,
                                  args.repeat)))
        return
    modes = [REFERENCE] + [m for m in args.modes if m != REFERENCE]
    rows = {}
    # glibc keeps freed large blocks in its heap by default, so RSS would lag behind what is live; a fixed mmap
    # threshold returns every large block to the OS on free, making peak RSS track live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for mode in modes:
        out = subprocess.run([sys.executable, "-m", "experiments.bench_memory", "--model", args.model, "--device",
                              args.device, "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--_mode", mode,
                              "--repeat", str(args.repeat),
                              "--override", *args.override],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            sys.exit(f"bench_memory: mode {mode} failed:\n{out.stderr[-2000:]}")
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(table(rows, f"model={args.model} device={args.device} tokens={args.batch}x{args.seq_len}"))


if __name__ == "__main__":
    main()
