"""How stable is each metric's removed set across calibration seeds, at 1k / 4k / 16k calibration tokens?

A layer-pruning comparison is only as good as its calibration budget: if three seeds remove three different sets,
one seed's table row says little. This script computes (or reads from the selection cache, shared with `run.py`,
so paper sweeps reuse these selections and vice versa) the selection of every metric for every budget and seed,
and reports per metric and budget: the mean pairwise Jaccard similarity of the removed sets across seeds, how many
distinct sets there were, the layers every seed removed, and the mean scoring time. Nothing is evaluated, so no
held-out text is read.

    python -m experiments.calibration_budget                      # SmolLM2, 25%, 3 seeds, 8/32/128 x 128 tokens
    python -m experiments.calibration_budget --metrics bi taylor --samples 8 32 --seeds 0 1
    python -m experiments.calibration_budget --out reports/calibration_budget

Metrics are `label=choice[,override...]` (e.g. `gradmap-oneshot=gradmap,metric.iterative=false`) or a plain
Hydra choice; `--limit label=N` caps a metric's budget at N samples (SLEB and the PPL criterion cost ~30
forwards per decision, so by default they run at the smallest budget only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir

from experiments.stability import stability
from gradmap.models import load_model
from gradmap.runner import select_layers
from gradmap.validation import resolve, validate

CONF = Path(__file__).resolve().parents[1] / "conf"
DEFAULT_METRICS = ["bi", "taylor", "streamline", "angular", "gradmap",
                   "gradmap-iterative=gradmap,metric.iterative=true", "ppl", "sleb"]
DEFAULT_LIMITS = ["gradmap-iterative=32", "ppl=8", "sleb=8"]  # iterative methods: what fits in minutes on 2 cores


def parse_metric(spec: str) -> tuple[str, list[str]]:
    label, _, rest = spec.partition("=")
    if not rest:
        return label, [f"metric={label}"]
    choice, *overrides = rest.split(",")
    return label, [f"metric={choice}", *overrides]


def selection_for(overrides: list[str], model, tokenizer) -> tuple[list[int], float, bool]:
    """(removed layers, scoring seconds when it was computed, from cache?) for one composed config, validated and
    selected through `gradmap.runner.select_layers` (the selection cache and stages that `run.py` uses)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    checked = validate(resolve(cfg), evaluate=False)  # nothing is evaluated: no held-out text is read
    got, recorder = select_layers(checked, model, tokenizer, {"model": cfg.model.get("asset"),
                                                               "metric": overrides[0]})
    hit = got.source == "cache"
    fresh = recorder.seconds.get("score", 0.0) + recorder.seconds.get("select", 0.0)
    return sorted(got.selection.removed), got.selection.seconds if hit else fresh, hit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.calibration_budget",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--metrics", nargs="+", default=DEFAULT_METRICS)
    parser.add_argument("--samples", nargs="+", type=int, default=[8, 32, 128], help="windows of --seq-len tokens")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--limit", nargs="*", default=DEFAULT_LIMITS, help="label=N: at most N samples for a metric")
    parser.add_argument("--prune-ratio", type=float, default=0.25)
    parser.add_argument("--out", default="reports/calibration_budget")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every selection")
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error(f"--seeds {args.seeds}: stability needs at least 2 seeds")
    limits = {k: int(v) for k, v in (item.split("=", 1) for item in args.limit)}

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        base = compose("config", overrides=[f"model={args.model}", *args.override])
    model, tokenizer = load_model(base.model)
    rows = []
    for spec in args.metrics:
        label, metric_overrides = parse_metric(spec)
        for samples in args.samples:
            if samples > limits.get(label, samples):
                continue
            sets, seconds, cached = [], [], 0
            for seed in args.seeds:
                overrides = [*metric_overrides, f"model={args.model}", f"seed={seed}",
                             f"calibration.num_samples={samples}", f"calibration.seq_len={args.seq_len}",
                             f"prune_ratio={args.prune_ratio}", *args.override]
                removed, secs, hit = selection_for(overrides, model, tokenizer)
                sets.append(set(removed))
                seconds.append(secs)
                cached += hit
                print(f"[budget] {label:<16} {samples * args.seq_len:>6} tokens seed {seed}: {removed} "
                      f"({secs:.1f} s{', cached' if hit else ''})", flush=True)
            rows.append({"metric": label, "tokens": samples * args.seq_len, "samples": samples, "seeds": len(sets),
                         "layers_removed": len(sets[0]),
                         **stability(sets), "mean_scoring_seconds": sum(seconds) / len(seconds),
                         "removed_sets": " | ".join(str(sorted(s)) for s in sets)})
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "results.csv", index=False)
    header = (f"# Stability of the removed set across calibration seeds\n\n- Model: {args.model}, prune ratio "
              f"{args.prune_ratio}\n"
              f"- Calibration: windows of {args.seq_len} tokens from the calib split; seeds {args.seeds}\n"
              "- mean_jaccard: mean over seed pairs of |A & B| / |A | B| (1 = every seed removes the same layers)\n"
              f"- Command: python -m experiments.calibration_budget {' '.join(argv or sys.argv[1:])}\n\n")
    (out / "results.md").write_text(header + table.to_markdown(index=False, floatfmt=".2f") + "\n")
    plot(table, out / "stability_vs_budget.png")
    print(table.drop(columns=["removed_sets"]).to_string(index=False))
    return 0


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    groups = list(table.groupby("metric"))
    markers = "osD^vP*Xh<>"
    for i, (metric, g) in enumerate(groups):
        shift = 2 ** (0.08 * (i - (len(groups) - 1) / 2))  # metrics at the same value stay visible side by side
        ax.plot(g["tokens"] * shift, g["mean_jaccard"], marker=markers[i % len(markers)], label=metric)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(table["tokens"].unique()), [f"{t:,}" for t in sorted(table["tokens"].unique())])
    ax.set_xlabel("calibration tokens (points of one budget spread sideways)")
    ax.set_ylabel("mean pairwise Jaccard of removed sets")
    ax.set_ylim(0, 1.05)
    ax.set_title("Stability of the removed set across calibration seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
