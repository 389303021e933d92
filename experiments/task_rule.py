"""Does a zero-shot task separate anything on this model? The dense model's accuracy on a task's validation part,
with lm-eval's standard error, against the rule written before any result (gradmap/tasks/wiki_cloze_validation.yaml):
acc - chance >= MARGIN and acc - chance >= SE_MULTIPLE * stderr.

    python -m experiments.task_rule                                   # SmolLM2-135M, wiki_cloze_validation, all items
    python -m experiments.task_rule model=gemma3_270m eval.lm_eval.limit=500 --chance 0 --out reports/task_rule

Arguments other than --chance/--out are Hydra overrides of conf/config.yaml with eval=validation; the evaluation is
lm-eval's through `gradmap.evaluation.evaluate` (no perplexity: held-out texts are dropped). Prints one line and,
with --out, writes `<model>_<task>.json` (accuracy, standard error, chance, margin, verdict, the command).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gradmap.evaluation import Evaluation, evaluate
from gradmap.files import atomic_write_json
from gradmap.models import load_model

CONF = Path(__file__).resolve().parents[1] / "conf"
MARGIN = 0.15  # points above chance (fraction)
SE_MULTIPLE = 3.0


def verdict(acc: float, stderr: float, chance: float) -> bool:
    return acc - chance >= MARGIN and acc - chance >= SE_MULTIPLE * stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chance", type=float, default=0.0, help="chance accuracy of the task (0 for an open cloze)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON result")
    args, overrides = parser.parse_known_args(argv)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["eval=validation", "eval.lm_eval.limit=null", "tuning=true", *overrides])
    ev = OmegaConf.to_container(cfg.eval, resolve=True)
    ev.pop("_target_", None)
    ev["heldout"]["texts"], ev["perplexity"]["seq_lens"] = {}, []
    evaluation = Evaluation(**ev)
    if any(Path(str(spec.file or spec.data)).name.startswith("test")
           for task, spec in evaluation.lm_eval.local_tasks.items() if task in evaluation.lm_eval.tasks):
        print("[task_rule] refused: the rule is measured on validation items only", file=sys.stderr)
        return 2
    model, tokenizer = load_model(cfg.model)
    t0 = time.perf_counter()
    results = evaluate(model, tokenizer, evaluation)["lm_eval"]
    seconds = time.perf_counter() - t0
    code = 0
    for task in evaluation.lm_eval.tasks:
        acc, se = results[task]["acc"], results[task]["acc_stderr"]
        ok = verdict(acc, se, args.chance)
        n = results["n-samples"][task]["effective"]
        print(f"[task_rule] {cfg.model.get('asset') or cfg.model.get('name')} {task}: acc {acc:.4f} ± {se:.4f} "
              f"(n={n}), chance {args.chance:.2f}: {acc - args.chance:+.4f} = {(acc - args.chance) / se:.1f} SE "
              f"-> {'MEETS' if ok else 'FAILS'} the rule (>= {MARGIN:.2f} above chance and >= {SE_MULTIPLE:g} SE)")
        if args.out:
            name = f"{cfg.model.get('asset') or 'model'}_{task}.json"
            atomic_write_json(args.out / name, {
                "task": task, "acc": acc, "acc_stderr": se, "n": n, "chance": args.chance, "margin": MARGIN,
                "se_multiple": SE_MULTIPLE, "meets_rule": ok, "seconds": seconds,
                "lm_eval": results["config"], "versions": results["versions"],
                "command": "python -m experiments.task_rule " + " ".join(argv if argv is not None else sys.argv[1:])})
        code = code or (0 if ok else 1)
    return code


if __name__ == "__main__":
    sys.exit(main())
