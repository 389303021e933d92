"""One pruning run: load -> calibration data -> score/select -> prune -> compensate -> evaluate -> record.

`Run.execute` is the pipeline of one job whose config passed validation (`gradmap.validation.Checked`, the one
input: cache keys, logger and names all derive from it); `gradmap.jobs.run_job` calls it (record history,
validation, failures). The run fills the job's `RunRecord` (written as `record.json`, the source of truth), writes
`scores.csv` into the run folder and a per-layer score plot, and mirrors the essentials to the configured logger,
each pruning decision as it is made. `select_layers` is the select-only entry point (no pruning, evaluation or
record) for experiments that compare selections.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gradmap import surgery
from gradmap.assets import use_cache_root
from gradmap.cache import (
    CachedSelection,
    CacheEntryError,
    SelectionCache,
    check_dense_entry,
    dense_cache_key,
    interleaved_key,
    read_json_entry,
    selection_key,
)
from gradmap.checkpoint import save_checkpoint
from gradmap.compensation import is_interleaved
from gradmap.data import load_heldout
from gradmap.errors import ConfigError, brief
from gradmap.evaluation import evaluate, headline, retained
from gradmap.files import atomic_write_json, atomic_write_text, move_aside
from gradmap.models import resolve_device, resolve_dtype
from gradmap.oom import ParamFingerprint, retry_halving
from gradmap.record import RunRecord, environment
from gradmap.selection import Decision, Selection
from gradmap.stages import Cost, StageRecorder
from gradmap.validation import Checked
from gradmap.windows import decide_window_bos


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


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


def original_scoring(metric, selection: Selection) -> dict[str, Any]:
    """What the selection cost when it was computed (cached decisions keep their own cost); a metric with phases
    (gradmap_verify: gradient screening, then exact verification) adds their split from its `cost_split`."""
    out = {"seconds": selection.seconds, "score_seconds": sum(d.score_seconds for d in selection.decisions),
           **selection.cost}
    split = getattr(metric, "cost_split", None)
    if callable(split):
        out["split"] = split(selection)
    return out


class DecisionLog:
    """Each fresh decision goes to the log and the logger as it is made (`on_decision`); `flush` then sends the
    cached ones of the final selection (marked cached)."""

    def __init__(self, logger: Any):
        self.logger = logger
        self.logged: set[int] = set()

    def on_decision(self, decision: Decision) -> None:
        self.logged.add(decision.step)
        # One line per decision in logs too (bars are terminal-only); tqdm.write keeps a terminal's bars intact.
        tqdm.write(f"[gradmap] decision {decision.step}: removed {decision.removed} (scored in "
                   f"{decision.score_seconds:.1f}s)", file=sys.stdout)
        try:
            self.logger.log_decision(decision)
        except Exception as err:  # noqa: BLE001  (the mirror must not fail the run)
            print(f"[gradmap] warning: logging decision {decision.step} failed ({type(err).__name__}: {err})")

    def flush(self, selection: Selection) -> None:
        for d in selection.decisions:
            if d.step not in self.logged:
                try:
                    self.logger.log_decision(d, cached=True)
                except Exception:  # noqa: BLE001
                    pass


def with_calibration_retry(stage: str, calib, cost: Cost, attempt, allowed: bool, on_retry, can_retry=None):
    """`attempt()` with `calib.batch_size` halved after each out-of-memory error (`gradmap.oom`); the failed attempt's
    tokens are taken back out of the stage's cost, and the smaller micro-batch stays for the later stages."""
    start = Cost(**cost.as_dict())

    def with_batch(bs: int):
        calib.batch_size = bs
        cost.forward_tokens, cost.backward_tokens, cost.train_tokens = (
            start.forward_tokens, start.backward_tokens, start.train_tokens)
        return attempt()

    return retry_halving(with_batch, stage=stage, key="calibration.batch_size", batch_size=calib.batch_size,
                         on_retry=on_retry, allowed=allowed, can_retry=can_retry)


def selection_cache(checked: Checked) -> SelectionCache:
    """The run's selection cache (in its cache folder; off with `cache_selection=false`)."""
    return SelectionCache(checked.cache, enabled=checked.config["cache_selection"])


def cached_selection(checked: Checked, model, calib, bos: bool, recorder: StageRecorder, meta: dict[str, Any],
                     on_decision=None, on_retry=None) -> tuple[CachedSelection, str]:
    """The metric's selection of `checked.num_prune` layers through the selection cache
    (`SelectionCache.get_or_compute`, as `checked.metric.selection_kind` says), and its cache key. The stage's time
    is split into the scoring passes (`score`) and the choosing in between (`select`). `bos`: whether the windows
    start with a BOS token (part of the key); `meta`: what the cache entry says it is (for people reading it)."""
    metric, n = checked.metric, checked.num_prune
    key, total = selection_key(checked.config, bos), 0.0

    def compute(resume: Selection | None) -> Selection:
        nonlocal total
        with recorder.stage("score", model) as cost:
            t0 = time.perf_counter()

            def attempt() -> Selection:
                return metric.select(model, calib, n, cost, resume=resume, on_decision=on_decision)

            selection = with_calibration_retry("score", calib, cost, attempt, metric.micro_batch_is_memory_knob,
                                               on_retry or (lambda _retry: None))
            total = time.perf_counter() - t0
        return selection

    got = selection_cache(checked).get_or_compute(key, n, metric.selection_kind, compute, meta,
                                                  surgery.num_layers(model))
    recorder.move("score", "select", total - sum(d.score_seconds for d in got.fresh))
    return got, key


def select_layers(checked: Checked, model, tokenizer,
                  meta: dict[str, Any] | None = None) -> tuple[CachedSelection, StageRecorder]:
    """Select-only entry point: the calibration windows and the metric's selection through the selection cache, as
    a run's `calibration`, `score` and `select` stages make them (same seed, BOS decision and cache key), without
    pruning, evaluation or a record. `checked`: `gradmap.validation.validate` of a composed config; `model`: loaded
    by its model config (`checked.model.load()`) and left unchanged. The recorder holds the stages' time and
    tokens; `meta`: what the cache entry says it is."""
    seed_everything(checked.config["seed"])
    windows = decide_window_bos(checked.model.window_bos, model.config, tokenizer)
    recorder = StageRecorder(next(model.parameters()).device, progress=False)
    with recorder.stage("calibration"):
        calib = checked.calibration.load(tokenizer, windows.token)
    got, _key = cached_selection(checked, model, calib, windows.bos, recorder,
                                 meta or {"metric": type(checked.metric).__name__})
    return got, recorder


class Run:
    """The pipeline of one job whose config passed validation (`checked`, which holds the built group objects);
    `job` owns the record and its history, so a failure at any stage still leaves a complete record."""

    def __init__(self, checked: Checked, out_dir: Path, job):
        self.checked, self.out_dir, self.job = checked, Path(out_dir), job
        self.record: RunRecord = job.record
        self.choices: dict[str, str] = self.record.choices
        self.record.environment = environment()
        self.recorder = StageRecorder(checked.device if checked.device != "auto" else resolve_device("auto"))
        self.logger = None
        self.bos_id: int | None = None  # windows start with this token (gradmap.windows), decided once loaded

    def save(self) -> None:
        self.record.timings = self.recorder.as_dict()
        self.job.save()

    def execute(self) -> RunRecord:
        with use_cache_root(self.checked.cache):
            try:
                return self._execute()
            except BaseException:
                self.record.failed_stage = self.recorder.current or self.recorder.last
                self.record.timings = self.recorder.as_dict()
                raise
            finally:
                if self.logger is not None:
                    self.logger.finish(self.record.status)

    def _start_logger(self) -> None:
        try:
            self.logger = self.checked.logger.start(self.checked.config, self.out_dir, self.choices)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001  (W&B cannot start: no login, no network, a bad project name)
            name = self.choices.get("logger")
            raise ConfigError("logger", name, problem=f"the {name} logger cannot start ({brief(err)})",
                              hint="logger.mode=offline mirrors W&B without a login; logger=none turns it off") \
                from err

    def _execute(self) -> RunRecord:
        rec, stage, checked = self.record, self.recorder.stage, self.checked
        self._start_logger()
        self.save()
        seed_everything(checked.config["seed"])
        device = resolve_device(checked.device)
        with stage("load"):
            model, tokenizer = checked.model.load()
            if not checked.model.device_map:
                model.to(device)
        num_layers = surgery.num_layers(model)
        if num_layers != checked.info.num_layers:
            raise RuntimeError(f"the loaded model has {num_layers} layers, its config said {checked.info.num_layers}")
        n = checked.num_prune
        rec.model_class, rec.num_layers, rec.num_prune = type(model).__name__, num_layers, n
        rec.prune_ratio, rec.effective_prune_ratio = checked.config["prune_ratio"], n / num_layers
        rec.dtype = str(resolve_dtype(checked.model.dtype))

        metric, compensation = checked.metric, checked.compensation
        # Checked on the architecture already; this is the loaded model (cheap).
        compensation.check_compatible(model, [])

        windows = decide_window_bos(checked.model.window_bos, model.config, tokenizer)
        rec.windows = windows.as_dict()
        self.bos_id = windows.token
        with stage("calibration"):
            calib = checked.calibration.load(tokenizer, self.bos_id)
            heldout = load_heldout(checked.evaluation.heldout, tokenizer, tuning=checked.config["tuning"])
        rec.calibration = {"num_samples": int(calib.input_ids.shape[0]), "seq_len": int(calib.input_ids.shape[1]),
                           "tokens": calib.num_tokens, "distinct_tokens": calib.distinct_tokens, "split": "calib",
                           "bos": windows.bos}
        rec.heldout = {t.name: {"corpus": t.corpus, "split": t.split, "tokens": int(t.token_ids.numel())}
                       for t in heldout}

        rec.results = {"dense": self._dense_results(model, tokenizer, heldout)}
        self.save()

        if is_interleaved(compensation):  # e.g. Prune&Comp: prune, compensate, rescore
            selection, comp_report = self._prune_interleaved(model, metric, compensation, calib, n)
        else:
            selection = self._select(model, metric, calib, n)
        rec.selection = selection.as_dict()
        rec.removed_layers = sorted(selection.removed)
        atomic_write_text(self.out_dir / "scores.csv", scores_csv(rec.selection["decisions"]))
        plot = plot_scores(rec.selection["decisions"], self.out_dir / "scores.png",
                           f"{self.choices.get('metric')} on {self.choices.get('model')}")
        self.save()

        if is_interleaved(compensation):
            rec.compensation = comp_report
        else:
            with stage("prune"):
                removed = surgery.remove_layers(model, selection.removed)
            with stage("compensate", model) as cost:
                rec.compensation = self._compensate(model, compensation, removed, calib, cost)
            del removed  # the dense reference is no longer needed
        self.save()

        with stage("evaluate", model):
            pruned = self._evaluate(model, tokenizer, heldout, "evaluate")
        dense = rec.results["dense"]
        rec.results.update({"pruned": pruned, "retained_pct": retained(dense, pruned),
                            "headline": {"dense": headline(dense), "pruned": headline(pruned)}})
        t = self.recorder.seconds
        rec.pruning_seconds_original = (rec.original_scoring["seconds"] + t.get("prune", 0.0)
                                        + t.get("compensate", 0.0))
        self.save()
        if checked.save_dir is not None:
            info = {"removed_layers": rec.removed_layers, "original_num_layers": num_layers,
                    "metric": self.choices.get("metric"), "compensation": self.choices.get("compensation"),
                    "compensation_report": rec.compensation, "config": rec.config}
            with stage("save"):
                rec.saved_to = str(save_checkpoint(model, tokenizer, str(checked.save_dir), info,
                                                   overwrite=checked.config["save_overwrite"]))
        rec.finished = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        rec.timings = self.recorder.as_dict()
        self.job.end("done")
        try:  # the mirror must never turn a finished job into a failed one
            self.logger.log_run(rec, plot)
        except Exception as err:  # noqa: BLE001
            print(f"[gradmap] warning: logger failed ({type(err).__name__}: {err}); record.json is complete")
        print(summary_table(rec))
        return rec

    def _select(self, model, metric, calib, n: int) -> Selection:
        """Score and choose layers through the selection cache (`cached_selection`); a decision goes to the log and
        the logger as it is made."""
        log = DecisionLog(self.logger)
        got, key = cached_selection(self.checked, model, calib, self.bos_id is not None, self.recorder,
                                    {"model": self.choices.get("model"), "metric": self.choices.get("metric")},
                                    on_decision=log.on_decision, on_retry=self.record.oom_retries.append)
        log.flush(got.selection)
        self._record_selection(metric, got.selection, got.source, key)
        return got.selection

    def _prune_interleaved(self, model, metric, compensation, calib, n: int) -> tuple[Selection, dict[str, Any]]:
        """Selection and compensation in one loop (the selection depends on the compensation): cached under a key
        that includes the compensation config; cached decisions are replayed (removal and fold, no rescoring). The
        fresh decisions' own time and tokens are booked to `score` and `select`, the rest stays `compensate`."""
        key, log, report = interleaved_key(self.checked.config, self.bos_id is not None), DecisionLog(self.logger), {}

        def compute(resume: Selection | None) -> Selection:
            nonlocal report
            with self.recorder.stage("compensate", model) as cost:
                selection, report = compensation.prune_iteratively(model, metric, calib, n, cost, resume=resume,
                                                                   on_decision=log.on_decision)
            return selection

        meta = {g: self.choices.get(g) for g in ("model", "metric", "compensation")}
        num_layers = surgery.num_layers(model)
        got = selection_cache(self.checked).get_or_compute(key, n, compensation.selection_kind(metric), compute,
                                                           meta, num_layers)
        log.flush(got.selection)
        fresh = got.fresh
        scored = Cost(forward_tokens=sum(d.forward_tokens for d in fresh),
                      backward_tokens=sum(d.backward_tokens for d in fresh))
        self.recorder.move("compensate", "score", sum(d.score_seconds for d in fresh), scored)
        self.recorder.move("compensate", "select", sum(d.seconds - d.score_seconds for d in fresh))
        self._record_selection(metric, got.selection, got.source, key)
        return got.selection, report

    # ------------------------------------------------------- out of memory: halve the micro-batch (gradmap.oom)

    def _compensate(self, model, compensation, removed, calib, cost: Cost) -> dict[str, Any]:
        before = ParamFingerprint(model)  # a retry is safe only if the failed attempt changed no weight
        return with_calibration_retry("compensate", calib, cost,
                                      lambda: compensation.apply(model, removed, calib, cost),
                                      compensation.micro_batch_is_memory_knob, self.record.oom_retries.append,
                                      can_retry=lambda: before.unchanged(model))

    def _evaluate(self, model, tokenizer, heldout, stage: str) -> dict[str, Any]:
        """`evaluate` with `eval.perplexity.batch_size` (and lm-eval's batch size in proportion) halved after each
        out-of-memory error."""
        evaluation = self.checked.evaluation
        first = int(evaluation.perplexity.batch_size)

        def attempt(bs: int) -> dict[str, Any]:
            lm_bs = max(1, int(evaluation.lm_eval.batch_size) * bs // first)
            ev = dataclasses.replace(evaluation, perplexity=dataclasses.replace(evaluation.perplexity, batch_size=bs),
                                     lm_eval=dataclasses.replace(evaluation.lm_eval, batch_size=lm_bs))
            return evaluate(model, tokenizer, ev, heldout, self.bos_id)

        return retry_halving(attempt, stage=stage, key="eval.perplexity.batch_size", batch_size=first,
                             on_retry=self.record.oom_retries.append)

    def _record_selection(self, metric, selection: Selection, source: str, key: str) -> None:
        self.record.selection_source = source
        self.record.selection_cache_key = key
        # What scoring cost when it was actually computed (the basis for speed comparisons across a sweep).
        self.record.original_scoring = original_scoring(metric, selection)

    def _dense_results(self, model, tokenizer, heldout) -> dict[str, Any]:
        evaluation = self.checked.evaluation
        key = dense_cache_key(self.checked.config, self.bos_id is not None)
        cache_file = self.checked.cache / "dense_eval" / f"{key}.json"
        cached = read_json_entry(cache_file) if evaluation.cache_dense else None
        if cached is not None:
            seq_lens = [int(s) for s in evaluation.perplexity.seq_lens]
            tasks = [str(t) for t in evaluation.lm_eval.tasks]
            try:
                results = check_dense_entry(cached, key, [t.name for t in heldout], seq_lens, tasks)
                self.record.dense_from_cache = str(cache_file)
                return results
            except CacheEntryError as err:
                move_aside(cache_file, f"malformed dense-evaluation entry: {err}")
        with self.recorder.stage("evaluate_dense", model):
            results = self._evaluate(model, tokenizer, heldout, "evaluate_dense")
        self.record.dense_from_cache = None
        if evaluation.cache_dense:
            atomic_write_json(cache_file, {"key": key, "results": results, "model": self.checked.config["model"]})
        return results


def summary_table(rec: RunRecord) -> str:
    t = rec.timings
    lines = [
        "",
        "=" * 72,
        f"gradmap | model={rec.choices.get('model')} metric={rec.choices.get('metric')} "
        f"compensation={rec.choices.get('compensation')}",
        f"removed {rec.num_prune}/{rec.num_layers} layers: {rec.removed_layers}",
        f"pruning time {t['pruning_seconds']:.1f}s  (" + ", ".join(
            f"{s} {t['seconds'].get(s, 0):.1f}s" for s in ("score", "select", "prune", "compensate")) + ")",
        f"pruning cost: {t['pruning_cost']['forward_tokens']} forward + {t['pruning_cost']['backward_tokens']} "
        f"backward tokens",
    ]
    for phase, c in (rec.original_scoring or {}).get("split", {}).items():
        lines.append(f"  {phase}: {c['passes']} passes, {c['seconds']:.1f}s, {c['forward_tokens']} forward + "
                     f"{c['backward_tokens']} backward tokens (when computed)")
    heads = rec.results["headline"]
    kept = rec.results["retained_pct"]
    lines.append(f"{'metric':<32}{'dense':>12}{'pruned':>12}{'retained %':>12}")
    for key, dense_value in heads["dense"].items():
        pruned_value = heads["pruned"].get(key, float("nan"))
        lines.append(f"{key:<32}{dense_value:>12.4f}{pruned_value:>12.4f}{kept.get(key, float('nan')):>12.1f}")
    lines.append("=" * 72)
    return "\n".join(lines)
