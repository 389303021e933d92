"""One pruning run: load -> calibration data -> score/select -> prune -> compensate -> evaluate -> record.

`run(cfg, out_dir)` runs one job through `gradmap.jobs.run_job` (record history, validation, failures) and returns its
record; `Run.execute` is the pipeline itself, called once the config is valid. It writes `record.json` (the source of
truth) and `scores.csv` into `out_dir`, a per-layer score plot, and mirrors the essentials to the configured logger,
each pruning decision as it is made.
"""

from __future__ import annotations

import csv
import io
import os
import random
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from gradmap import surgery
from gradmap.assets import use_cache_root
from gradmap.cache import CacheEntryError, SelectionCache, check_dense_entry, read_json_entry, selection_key
from gradmap.compensation import IncompatibleCompensationError  # noqa: F401  (re-exported)
from gradmap.data import load_calibration, load_heldout
from gradmap.evaluation import evaluate, headline, retained
from gradmap.files import move_aside
from gradmap.loggers import make_logger
from gradmap.metric import Cost
from gradmap.models import load_model, resolve_device, resolve_dtype
from gradmap.record import StageRecorder, atomic_write_json, atomic_write_text, environment, stable_hash
from gradmap.validation import GROUPS, Checked, ConfigError, brief, num_to_prune  # noqa: F401  (num_to_prune re-exported)


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

    return Path(cfg.get("cache_dir") or cache_root(default=True)).expanduser()


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
    """The pipeline of one job whose config passed validation (`checked`); `job` owns the record and its history,
    so a failure at any stage still leaves a complete record."""

    def __init__(self, cfg: DictConfig, out_dir: Path, choices: dict[str, str], job, checked: Checked):
        self.cfg, self.out_dir, self.choices, self.job, self.checked = cfg, Path(out_dir), choices, job, checked
        self.record: dict[str, Any] = job.record
        self.record["environment"] = environment()
        self.recorder = StageRecorder(checked.device if checked.device != "auto" else resolve_device("auto"))
        self.logger = None

    def save(self) -> None:
        self.record["timings"] = self.recorder.as_dict()
        self.job.save()

    def execute(self) -> dict[str, Any]:
        with use_cache_root(self.checked.cache):
            try:
                return self._execute()
            except BaseException:
                self.record["failed_stage"] = self.recorder.current or self.recorder.last
                self.record["timings"] = self.recorder.as_dict()
                raise
            finally:
                if self.logger is not None:
                    self.logger.finish(self.record.get("status", "failed"))

    def _execute(self) -> dict[str, Any]:
        cfg, rec, stage, checked = self.cfg, self.record, self.recorder.stage, self.checked
        try:
            self.logger = logger = make_logger(cfg.logger, cfg, self.out_dir, self.choices)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001  (W&B cannot start: no login, no network, a bad project name)
            kind = cfg.logger.get("kind")
            raise ConfigError("logger", kind, problem=f"the {kind} logger cannot start ({brief(err)})",
                              hint="logger.mode=offline mirrors W&B without a login; logger=none turns it off") \
                from err
        self.save()
        seed_everything(cfg.seed)
        device = resolve_device(checked.device)
        with stage("load"):
            model_cfg = cfg.model if cfg.get("dtype") is None else OmegaConf.merge(cfg.model, {"dtype": cfg.dtype})
            model, tokenizer = load_model(model_cfg)
            if not model_cfg.get("device_map"):
                model.to(device)
        num_layers = surgery.num_layers(model)
        if num_layers != checked.info.num_layers:
            raise RuntimeError(f"the loaded model has {num_layers} layers, its config said {checked.info.num_layers}")
        n = checked.num_prune
        rec.update({"model_class": type(model).__name__, "num_layers": num_layers, "num_prune": n,
                    "prune_ratio": cfg.get("prune_ratio"), "effective_prune_ratio": n / num_layers,
                    "dtype": str(resolve_dtype(model_cfg.get("dtype", "float32")))})

        metric, compensation = checked.metric, checked.compensation
        if metric is None or compensation is None:  # validated without building them
            metric, compensation = instantiate(cfg.metric), instantiate(cfg.compensation)
        # Checked on the architecture already; this is the loaded model (cheap).
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
        t = self.recorder.seconds
        rec["pruning_seconds_original"] = (rec["original_scoring"]["seconds"] + t.get("prune", 0.0)
                                           + t.get("compensate", 0.0))
        self.save()
        if checked.save_dir is not None:
            info = {"removed_layers": rec["removed_layers"], "original_num_layers": num_layers,
                    "metric": self.choices.get("metric"), "compensation": self.choices.get("compensation"),
                    "compensation_report": rec["compensation"], "config": rec["config"]}
            with stage("save"):
                rec["saved_to"] = str(save_checkpoint(model, tokenizer, str(checked.save_dir), info,
                                                      overwrite=bool(cfg.get("save_overwrite"))))
        rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.record["timings"] = self.recorder.as_dict()
        self.job.end("done")
        try:  # the mirror must never turn a finished job into a failed one
            logger.log_run(rec, plot)
        except Exception as err:  # noqa: BLE001
            print(f"[gradmap] warning: logger failed ({type(err).__name__}: {err}); record.json is complete")
        print(summary_table(rec))
        return rec

    def _decision_logger(self):
        """Log each fresh decision to the logger as it is made; `flush` logs the cached ones after selection."""
        logged: set[int] = set()

        def on_decision(decision) -> None:
            logged.add(decision.step)
            # One line per decision in logs too (bars are terminal-only); tqdm.write keeps a terminal's bars intact.
            tqdm.write(f"[gradmap] decision {decision.step}: removed {decision.removed} (scored in "
                       f"{decision.score_seconds:.1f}s)", file=sys.stdout)
            try:
                self.logger.log_decision(decision)
            except Exception as err:  # noqa: BLE001  (the mirror must not fail the run)
                print(f"[gradmap] warning: logging decision {decision.step} failed ({type(err).__name__}: {err})")

        def flush(selection) -> None:
            for d in selection.decisions:
                if d.step not in logged:
                    try:
                        self.logger.log_decision(d, cached=True)
                    except Exception:  # noqa: BLE001
                        pass

        return on_decision, flush

    def _select(self, model, metric, calib, n):
        """Score and choose layers, reusing the selection cache (see gradmap.cache) where it applies."""
        cfg, rec = self.cfg, self.record
        cache = SelectionCache(cache_root_of(cfg)) if cfg.get("cache_selection", True) else None
        key = selection_key(cfg)
        num_layers = surgery.num_layers(model)
        cached, complete = cache.lookup(key, metric, n, num_layers) if cache else (None, False)
        on_decision, flush = self._decision_logger()
        with self.recorder.stage("score", model) as cost:
            t0 = time.perf_counter()
            if cached is not None and complete and metric.reuse != "scores":
                selection = cached
            else:  # compute, or continue an iterative order / re-pick from cached one-shot scores
                resume = {"resume": cached} if cached is not None else {}  # span metrics take no resume
                selection = metric.select(model, calib, n, cost, on_decision=on_decision, **resume)
            total = time.perf_counter() - t0
        flush(selection)
        new_decisions = len(selection.decisions) - (len(cached.decisions) if cached is not None else 0)
        fresh_score = sum(d.score_seconds for d in selection.decisions[-new_decisions:]) if new_decisions > 0 else 0.0
        # Split the synchronised stage time into scoring passes and the choosing in between.
        self.recorder.seconds["score"] -= total - fresh_score
        self.recorder.add_seconds("select", total - fresh_score)
        source = "computed" if cached is None else ("cache" if new_decisions <= 0 else "cache+extended")
        if cache is not None and source != "cache":
            cache.store(key, n, selection, {"model": self.choices.get("model"), "metric": self.choices.get("metric")},
                        num_layers)
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
        num_layers = surgery.num_layers(model)
        cached, _ = cache.lookup(key, reuse, n, num_layers) if cache else (None, False)
        on_decision, flush = self._decision_logger()
        with self.recorder.stage("compensate", model) as cost:
            selection, report = compensation.prune_iteratively(model, metric, calib, n, cost, resume=cached,
                                                               on_decision=on_decision)
        flush(selection)
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
                                            "compensation": self.choices.get("compensation")}, num_layers)
        rec.update(selection_source=source, selection_cache_key=key,
                   original_scoring=original_scoring(metric, selection))
        return selection, report

    def _dense_results(self, model, tokenizer, heldout) -> dict[str, Any]:
        cfg = self.cfg
        key = dense_cache_key(cfg)
        cache_file = cache_root_of(cfg) / "dense_eval" / f"{key}.json"
        use_cache = cfg.eval.get("cache_dense", True)
        cached = read_json_entry(cache_file) if use_cache else None
        if cached is not None:
            seq_lens = [int(s) for s in (cfg.eval.perplexity.get("seq_lens") or [])]
            tasks = [str(t) for t in (cfg.eval.lm_eval.get("tasks") or [])]
            try:
                results = check_dense_entry(cached, key, [t.name for t in heldout], seq_lens, tasks)
                self.record["dense_from_cache"] = str(cache_file)
                return results
            except CacheEntryError as err:
                move_aside(cache_file, f"malformed dense-evaluation entry: {err}")
        with self.recorder.stage("evaluate_dense", model):
            results = evaluate(model, tokenizer, cfg.eval, heldout, seed=cfg.seed)
        self.record["dense_from_cache"] = None
        if use_cache:
            atomic_write_json(cache_file, {"key": key, "results": results,
                                           "model": OmegaConf.to_container(cfg.model, resolve=True)})
        return results


def save_checkpoint(model, tokenizer, save_dir: str, info: dict[str, Any], overwrite: bool) -> Path:
    """Write the pruned checkpoint to a temporary sibling of `save_dir` and rename it into place at the end: a
    failed write leaves nothing behind (and an existing folder, replaced only with `save_overwrite=true`,
    untouched). Errors are ConfigErrors on `save_dir`."""
    final = Path(save_dir).expanduser().resolve()
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        surgery.save_pruned(model, tokenizer, tmp, info)
        if final.exists():
            if not overwrite and (not final.is_dir() or any(final.iterdir())):
                raise ConfigError("save_dir", save_dir, "an empty or new folder, or save_overwrite=true",
                                  problem=f"{final} appeared (non-empty) while the run was going")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except ConfigError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as err:  # noqa: BLE001  (disk full, permissions, a serialisation error)
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError("save_dir", save_dir, problem=f"writing the checkpoint failed ({brief(err)}); nothing was "
                          f"left at {final}",
                          hint="the results are in record.json; fix the cause and rerun with force=true") from err
    return final


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
    """Run one job (validation, pipeline, record history; see `gradmap.jobs.run_job`) and return its record. A
    refused config or a failure is recorded in `out_dir/record.json` and raised."""
    from gradmap.jobs import run_job

    return run_job(cfg, Path(out_dir), choices or {}, raise_errors=True).record
