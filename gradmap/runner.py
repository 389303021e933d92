"""One pruning run: load -> calibration data -> score/select -> prune -> compensate -> evaluate -> record.

`run(cfg, out_dir)` is what `run.py` calls for every Hydra job. It writes `record.json` (the source of truth) and
`scores.csv` into `out_dir`, a per-layer score plot, and mirrors the essentials to the configured logger.
"""

from __future__ import annotations

import csv
import io
import math
import random
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gradmap import surgery
from gradmap.cache import SelectionCache, finished_record, read_json_entry, selection_key
from gradmap.compensation import IncompatibleCompensationError
from gradmap.data import load_calibration, load_heldout
from gradmap.evaluation import evaluate, headline, retained
from gradmap.loggers import make_logger
from gradmap.metric import Cost
from gradmap.models import load_model, resolve_device, resolve_dtype
from gradmap.record import StageRecorder, atomic_write_json, atomic_write_text, environment, stable_hash

GROUPS = ("model", "metric", "compensation", "calibration", "eval", "logger")


def num_to_prune(num_layers: int, prune_ratio: float | None, num_prune: int | None) -> int:
    """floor(ratio * L + 0.5), i.e. round half up, unless `num_prune` is given explicitly."""
    if num_prune is not None:
        n = int(num_prune)
    else:
        if prune_ratio is None or not 0.0 < float(prune_ratio) < 1.0:
            raise ValueError(f"prune_ratio={prune_ratio} is not valid; allowed: 0 < prune_ratio < 1 "
                             "(or set num_prune)")
        n = math.floor(float(prune_ratio) * num_layers + 0.5)
    if not 0 < n < num_layers:
        raise ValueError(f"removing {n} of {num_layers} layers is not possible; allowed: 1..{num_layers - 1} "
                         f"(prune_ratio={prune_ratio}, num_prune={num_prune})")
    return n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def dense_cache_key(cfg: DictConfig) -> str:
    """Dense results depend only on the model and the evaluation settings (and the seed used by lm-eval)."""
    return stable_hash({"model": OmegaConf.to_container(cfg.model, resolve=True),
                        "eval": OmegaConf.to_container(cfg.eval, resolve=True),
                        "dtype": cfg.get("dtype"), "seed": cfg.seed, "v": 2})


def cache_root_of(cfg: DictConfig) -> Path:
    from gradmap.assets import cache_root

    return Path(cfg.get("cache_dir") or cache_root())


def scores_csv(decisions: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["decision", "layer", "score", "removed"])
    for d in decisions:
        for layer, score in enumerate(d["scores"]):
            if score is not None:
                writer.writerow([d["step"], layer, repr(score), int(layer in d["removed"])])
    return buf.getvalue()


def plot_scores(decisions: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Per-layer importance, one line per pruning decision; the removed layer of each decision is marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for d in decisions:
        xs = [i for i, s in enumerate(d["scores"]) if s is not None]
        ys = [d["scores"][i] for i in xs]
        line, = ax.plot(xs, ys, marker=".", lw=1, alpha=0.8, label=f"decision {d['step']}")
        for r in d["removed"]:
            ax.scatter([r], [d["scores"][r]], color=line.get_color(), marker="x", s=60, zorder=3)
    ax.set_xlabel("original layer index")
    ax.set_ylabel("importance score (higher = keep)")
    ax.set_title(title)
    if len(decisions) <= 12:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def original_scoring(metric, selection) -> dict[str, Any]:
    """What the selection cost when it was computed (cached decisions keep their own cost); a metric with phases
    (gradmap_verify: gradient screening, then exact verification) adds their split from its `cost_split`."""
    out = {"seconds": selection.seconds, "score_seconds": sum(d.score_seconds for d in selection.decisions),
           **selection.cost}
    split = getattr(metric, "cost_split", None)
    if callable(split):
        out["split"] = split(selection)
    return out


class Run:
    """State of one job, so a failure at any stage still leaves a complete record."""

    def __init__(self, cfg: DictConfig, out_dir: Path, choices: dict[str, str]):
        self.cfg, self.out_dir, self.choices = cfg, Path(out_dir), choices
        self.record: dict[str, Any] = {
            "status": "running",
            "config": OmegaConf.to_container(cfg, resolve=True),
            "choices": choices,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": environment(),
        }
        self.recorder = StageRecorder(resolve_device(cfg.device))

    def save(self) -> None:
        self.record["timings"] = self.recorder.as_dict()
        atomic_write_json(self.out_dir / "record.json", self.record)

    def execute(self) -> dict[str, Any]:
        cfg, rec, stage = self.cfg, self.record, self.recorder.stage
        done = None if cfg.get("force") else finished_record(self.out_dir, rec["config"])
        if done is not None:
            done.setdefault("reruns_skipped", []).append(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            atomic_write_json(self.out_dir / "record.json", done)
            print(f"[gradmap] skipped: {self.out_dir}/record.json is done with the same config (force=true reruns)")
            return done
        logger = make_logger(cfg.logger, cfg, self.out_dir, self.choices)
        self.save()
        try:
            seed_everything(cfg.seed)
            device = resolve_device(cfg.device)
            with stage("load"):
                model_cfg = cfg.model if cfg.get("dtype") is None else OmegaConf.merge(cfg.model, {"dtype": cfg.dtype})
                model, tokenizer = load_model(model_cfg)
                if not model_cfg.get("device_map"):
                    model.to(device)
            num_layers = surgery.num_layers(model)
            n = num_to_prune(num_layers, cfg.get("prune_ratio"), cfg.get("num_prune"))
            rec.update({"model_class": type(model).__name__, "num_layers": num_layers, "num_prune": n,
                        "prune_ratio": cfg.get("prune_ratio"), "effective_prune_ratio": n / num_layers,
                        "dtype": str(resolve_dtype(model_cfg.get("dtype", "float32")))})

            metric = instantiate(cfg.metric)
            compensation = instantiate(cfg.compensation)
            # Refuse an impossible pairing before spending time on scoring.
            compensation.check_compatible(model, [])

            with stage("calibration"):
                calib = load_calibration(cfg.calibration, tokenizer)
                heldout = load_heldout(cfg.eval.heldout, tokenizer, tuning=bool(cfg.get("tuning", False)))
            rec["calibration"] = {"num_samples": int(calib.input_ids.shape[0]), "seq_len": int(calib.input_ids.shape[1]),
                                  "tokens": calib.num_tokens, "split": "calib"}
            rec["heldout"] = {t.name: {"corpus": t.corpus, "split": t.split, "tokens": int(t.token_ids.numel())}
                              for t in heldout}

            rec["results"] = {"dense": self._dense_results(model, tokenizer, heldout)}
            self.save()

            interleaved = getattr(compensation, "interleaved", False)  # e.g. Prune&Comp: prune, compensate, rescore
            if interleaved:
                selection, comp_report = self._prune_interleaved(model, metric, compensation, calib, n)
            else:
                selection = self._select(model, metric, calib, n)
            rec["selection"] = selection.as_dict()
            rec["removed_layers"] = sorted(selection.removed)
            atomic_write_text(self.out_dir / "scores.csv", scores_csv(rec["selection"]["decisions"]))
            plot = plot_scores(rec["selection"]["decisions"], self.out_dir / "scores.png",
                               f"{self.choices.get('metric')} on {self.choices.get('model')}")
            self.save()

            if interleaved:
                rec["compensation"] = comp_report
            else:
                with stage("prune"):
                    removed_modules = surgery.remove_layers(model, selection.removed)
                with stage("compensate", model) as cost:
                    rec["compensation"] = compensation.apply(model, removed_modules, calib, cost)
                del removed_modules  # the dense reference is no longer needed
            self.save()

            with stage("evaluate", model):
                pruned = evaluate(model, tokenizer, cfg.eval, heldout, seed=cfg.seed)
            dense = rec["results"]["dense"]
            rec["results"].update({"pruned": pruned, "retained_pct": retained(dense, pruned),
                                   "headline": {"dense": headline(dense), "pruned": headline(pruned)}})
            if cfg.get("save_dir"):
                info = {"removed_layers": rec["removed_layers"], "original_num_layers": num_layers,
                        "metric": self.choices.get("metric"), "compensation": self.choices.get("compensation"),
                        "compensation_report": rec["compensation"],
                        "config": rec["config"]}
                rec["saved_to"] = str(surgery.save_pruned(model, tokenizer, cfg.save_dir, info))
            t = self.recorder.seconds
            rec["pruning_seconds_original"] = (rec["original_scoring"]["seconds"] + t.get("prune", 0.0)
                                               + t.get("compensate", 0.0))
            rec["status"] = "done"
            rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self.save()
            try:  # the mirror must never turn a finished job into a failed one
                logger.log_run(rec, plot)
            except Exception as err:  # noqa: BLE001
                print(f"[gradmap] warning: logger failed ({type(err).__name__}: {err}); record.json is complete")
            print(summary_table(rec))
            return rec
        except IncompatibleCompensationError as err:
            self._fail(err, traceback_text=None)
            raise
        except BaseException as err:  # KeyboardInterrupt too: the record must say the job did not finish
            self._fail(err, traceback_text=traceback.format_exc())
            raise
        finally:
            logger.finish(rec.get("status", "failed"))

    def _select(self, model, metric, calib, n):
        """Score and choose layers, reusing the selection cache (see gradmap.cache) where it applies."""
        cfg, rec = self.cfg, self.record
        cache = SelectionCache(cache_root_of(cfg)) if cfg.get("cache_selection", True) else None
        key = selection_key(cfg)
        cached, complete = cache.lookup(key, metric, n) if cache else (None, False)
        with self.recorder.stage("score", model) as cost:
            t0 = time.perf_counter()
            if cached is not None and complete and metric.reuse != "scores":
                selection = cached
            else:  # compute, or continue an iterative order / re-pick from cached one-shot scores
                resume = {"resume": cached} if cached is not None else {}  # span metrics take no resume
                selection = metric.select(model, calib, n, cost, **resume)
            total = time.perf_counter() - t0
        new_decisions = len(selection.decisions) - (len(cached.decisions) if cached is not None else 0)
        fresh_score = sum(d.score_seconds for d in selection.decisions[-new_decisions:]) if new_decisions > 0 else 0.0
        # Split the synchronised stage time into scoring passes and the choosing in between.
        self.recorder.seconds["score"] -= total - fresh_score
        self.recorder.add_seconds("select", total - fresh_score)
        source = "computed" if cached is None else ("cache" if new_decisions <= 0 else "cache+extended")
        if cache is not None and source != "cache":
            cache.store(key, n, selection, {"model": self.choices.get("model"), "metric": self.choices.get("metric")})
        rec["selection_source"] = source
        rec["selection_cache_key"] = key
        # What scoring cost when it was actually computed (the basis for speed comparisons across a sweep).
        rec["original_scoring"] = original_scoring(metric, selection)
        return selection

    def _prune_interleaved(self, model, metric, compensation, calib, n):
        """Selection and compensation in one loop (the selection depends on the compensation): cached under a key
        that includes the compensation config; cached decisions are replayed (removal and fold, no rescoring)."""
        cfg, rec = self.cfg, self.record
        cache = SelectionCache(cache_root_of(cfg)) if cfg.get("cache_selection", True) else None
        key = stable_hash({"selection": selection_key(cfg), "v": 1,
                           "compensation": OmegaConf.to_container(cfg.compensation, resolve=True)})
        reuse = SimpleNamespace(reuse=compensation.selection_reuse(metric))
        cached, _ = cache.lookup(key, reuse, n) if cache else (None, False)
        with self.recorder.stage("compensate", model) as cost:
            selection, report = compensation.prune_iteratively(model, metric, calib, n, cost, resume=cached)
        fresh = selection.decisions[len(cached.decisions) if cached is not None else 0:]
        scored = Cost(forward_tokens=sum(d.forward_tokens for d in fresh),
                      backward_tokens=sum(d.backward_tokens for d in fresh))
        self.recorder.seconds["compensate"] -= sum(d.seconds for d in fresh)  # the decisions' own time and tokens
        self.recorder.add_seconds("score", sum(d.score_seconds for d in fresh))
        self.recorder.add_seconds("select", sum(d.seconds - d.score_seconds for d in fresh))
        comp_cost = self.recorder.costs["compensate"]
        comp_cost.forward_tokens -= scored.forward_tokens
        comp_cost.backward_tokens -= scored.backward_tokens
        self.recorder.costs.setdefault("score", Cost()).add(scored)
        source = "computed" if cached is None else ("cache" if not fresh else "cache+extended")
        if cache is not None and source != "cache":
            cache.store(key, n, selection, {"model": self.choices.get("model"), "metric": self.choices.get("metric"),
                                            "compensation": self.choices.get("compensation")})
        rec.update(selection_source=source, selection_cache_key=key,
                   original_scoring=original_scoring(metric, selection))
        return selection, report

    def _fail(self, err: BaseException, traceback_text: str | None) -> None:
        self.record["status"] = "failed"
        self.record["error"] = {"type": type(err).__name__, "message": str(err), "traceback": traceback_text}
        self.save()

    def _dense_results(self, model, tokenizer, heldout) -> dict[str, Any]:
        cfg = self.cfg
        cache_file = cache_root_of(cfg) / "dense_eval" / f"{dense_cache_key(cfg)}.json"
        cached = read_json_entry(cache_file) if cfg.eval.get("cache_dense", True) else None
        if cached is not None and "results" in cached:
            self.record["dense_from_cache"] = str(cache_file)
            return cached["results"]
        with self.recorder.stage("evaluate_dense", model):
            results = evaluate(model, tokenizer, cfg.eval, heldout, seed=cfg.seed)
        self.record["dense_from_cache"] = None
        if cfg.eval.get("cache_dense", True):
            atomic_write_json(cache_file, {"key": dense_cache_key(cfg), "results": results,
                                           "model": OmegaConf.to_container(cfg.model, resolve=True)})
        return results


def summary_table(rec: dict[str, Any]) -> str:
    t = rec["timings"]
    lines = [
        "",
        "=" * 72,
        f"gradmap | model={rec['choices'].get('model')} metric={rec['choices'].get('metric')} "
        f"compensation={rec['choices'].get('compensation')}",
        f"removed {rec['num_prune']}/{rec['num_layers']} layers: {rec['removed_layers']}",
        f"pruning time {t['pruning_seconds']:.1f}s  (" + ", ".join(
            f"{s} {t['seconds'].get(s, 0):.1f}s" for s in ("score", "select", "prune", "compensate")) + ")",
        f"pruning cost: {t['pruning_cost']['forward_tokens']} forward + {t['pruning_cost']['backward_tokens']} "
        f"backward tokens",
    ]
    for phase, c in (rec.get("original_scoring") or {}).get("split", {}).items():
        lines.append(f"  {phase}: {c['passes']} passes, {c['seconds']:.1f}s, {c['forward_tokens']} forward + "
                     f"{c['backward_tokens']} backward tokens (when computed)")
    heads = rec["results"]["headline"]
    kept = rec["results"]["retained_pct"]
    lines.append(f"{'metric':<32}{'dense':>12}{'pruned':>12}{'retained %':>12}")
    for key, dense_value in heads["dense"].items():
        pruned_value = heads["pruned"].get(key, float("nan"))
        lines.append(f"{key:<32}{dense_value:>12.4f}{pruned_value:>12.4f}{kept.get(key, float('nan')):>12.1f}")
    lines.append("=" * 72)
    return "\n".join(lines)


def run(cfg: DictConfig, out_dir: str | Path, choices: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one job. `choices`: the option picked per config group (from Hydra), recorded and used in labels."""
    return Run(cfg, Path(out_dir), choices or {}).execute()
