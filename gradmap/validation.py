"""Validation of a composed run config, right after composition and before anything is loaded.

`validate(cfg)` checks every top-level and group key for type, range and consistency with the model's config (layer
count and maximum positions read from the asset's `config.json`, the hub config or the tiny model's YAML, without
loading weights), device and dtype availability, protected layers vs layers to remove, the files and assets the run
will read, the save and cache folders, and the lm-eval tasks. A bad value raises `ConfigError` (`gradmap.errors`),
the one error type of a refused run: it carries the key, the value and what is allowed, and prints as one line
(`run.py` exits 2).

Every group is built through the `_target_` of its YAML, and validation dispatches on that class. The schema of any
option is its config class (`gradmap.models`, `gradmap.data`, `gradmap.evaluation`, `gradmap.loggers`, and the
metric and compensation classes in `methods/` and `gradmap.compensation`): a dataclass whose fields (types, ranges,
choices; no defaults, those live in `conf/` only) are checked with `gradmap.schema.check_node` before the class is
built. A metric or compensation then checks what spans fields (e.g. a reduction valid for its target) when built,
raising `ConfigError` with the option as key, which gets the group prefix here.

Order: checks that need no heavy import run first (a refused run costs about half a second): keys, types, ranges,
files, assets, save and cache folders, lm-eval task names (a text scan of lm-eval's task YAMLs; lm-eval's own index,
~15 s, only for a name the scan does not find), the model's layer count and maximum positions; then those that import
torch (device, metric and compensation classes), then transformers (a meta-device model for the compensation's
compatibility check).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gradmap.assets import check_asset
from gradmap.data import TEST_SPLIT, WikiCalibration, check_heldout_spec
from gradmap.errors import ConfigError, brief, one_line
from gradmap.evaluation import Evaluation
from gradmap.lm_tasks import lm_eval_task_known, shipped_templates, task_name, template_path
from gradmap.models import ModelInfo, TinyRandomModel
from gradmap.path_checks import check_cache_dir, check_cache_writable, check_file, check_save_dir
from gradmap.schema import (
    DEVICE_PATTERN,
    DEVICES_ALLOWED,
    DTYPE_ALIASES,
    OFFLINE_CORPORA,
    TASKS_DIR,
    check_node,
    check_value,
    option,
)
from gradmap.targets import ALLOW_ENV, ENTRY_POINT_GROUP, allowed_targets, is_allowed

__all__ = ["GROUPS", "Checked", "ConfigError", "ModelInfo", "brief", "check_asset", "check_component",
           "check_node", "check_save_dir", "check_value", "lm_eval_task_known", "num_to_prune", "one_line",
           "resolve", "validate"]

GROUPS = ("model", "metric", "compensation", "calibration", "eval", "logger")


@dataclass
class TopLevelSchema:
    prune_ratio: Optional[float] = option(gt=0, lt=1)
    num_prune: Optional[int] = option(ge=1)
    seed: int = option(ge=0, le=2**32 - 1)  # numpy's seed range
    device: str = option(allowed=DEVICES_ALLOWED)
    dtype: Optional[str] = option(choices=tuple(DTYPE_ALIASES))
    save_dir: Optional[str] = option()
    save_overwrite: bool = option()
    cache_dir: Optional[str] = option()
    cache_selection: bool = option()
    force: bool = option()
    tuning: bool = option()
    extra_keys: list[str] = option()


EXTRA_KEYS = "extra_keys"  # top-level keys a user adds on purpose (`+name=value`, e.g. for interpolations)


def check_top_keys(c: Mapping[str, Any]) -> None:
    """Every top-level key is known, or declared in `extra_keys` (so `+prune_rato=0.9` is a typo, refused), and
    none of the known ones was deleted (`~seed`)."""
    top = [f.name for f in dataclasses.fields(TopLevelSchema)]
    extra = c.get(EXTRA_KEYS) or []
    check_value(EXTRA_KEYS, extra, list[str])
    for key in top:
        if key not in c:
            raise ConfigError(key, problem="missing (deleted with ~?)", allowed="a value (see conf/config.yaml)")
    known = set(top) | set(GROUPS) | {EXTRA_KEYS}
    for key in c:
        if key not in known and key not in extra:
            raise ConfigError(str(key), c[key], ", ".join(top + list(GROUPS)), problem="unknown key",
                              hint=f"a key of your own must be declared too: {EXTRA_KEYS}=[{key}]")


# ------------------------------------------------------------------------------------------ prune count

def num_to_prune(num_layers: int, prune_ratio: float | None, num_prune: int | None) -> int:
    """floor(ratio * L + 0.5), i.e. round half up, unless `num_prune` is given explicitly. Types and ranges of both
    keys are `TopLevelSchema`'s, checked before; this is where the count is made and refused for the model."""
    if num_prune is not None:
        n = num_prune
        key, value = "num_prune", num_prune
    else:
        if prune_ratio is None:
            raise ConfigError("prune_ratio", None, "a number in (0, 1), or set num_prune",
                              problem="neither prune_ratio nor num_prune is set")
        n = math.floor(float(prune_ratio) * num_layers + 0.5)
        key, value = "prune_ratio", prune_ratio
    if not 0 < n < num_layers:
        how = "" if num_prune is not None else f" (floor({prune_ratio} x {num_layers} + 0.5))"
        raise ConfigError(key, value, f"1..{num_layers - 1} layers" if num_prune is not None else
                          f"a ratio that removes 1..{num_layers - 1} of {num_layers} layers",
                          problem=f"removing {n} of {num_layers} layers is not possible{how}")
    return n


# ------------------------------------------------------------------------------------------ building groups

def _class_of(group: str, node: Mapping[str, Any]) -> Any:
    target = node.get("_target_") if isinstance(node, Mapping) else None
    if not isinstance(target, str) or not target:
        raise ConfigError(f"{group}._target_", target, f"a class path (see conf/{group}/*.yaml)", problem="missing")
    if not is_allowed(group, target):  # checked as text: nothing unknown is ever imported or called
        raise ConfigError(f"{group}._target_", target, list(allowed_targets(group)), problem=f"not a {group} class",
                          hint=f"register your own as a {ENTRY_POINT_GROUP} entry point or in ${ALLOW_ENV}"
                          if group in ("metric", "compensation") else None)
    try:
        from hydra.utils import get_object

        return get_object(target)
    except Exception as err:  # noqa: BLE001
        cause = err.__cause__ or err
        raise ConfigError(f"{group}._target_", target, f"an importable class (see conf/{group}/*.yaml)",
                          problem=f"cannot be imported ({brief(cause, 160)})") from err


def declares_fields(cls: Any) -> bool:
    """A config class: itself a dataclass (a subclass of one that is not would hide the options it adds)."""
    return inspect.isclass(cls) and "__dataclass_fields__" in vars(cls)


def build_group(group: str, node: Mapping[str, Any]) -> Any:
    """The config object of a model, calibration, eval or logger node: its `_target_` must be one of the group's
    config classes (the `_target_`s of its YAMLs, `gradmap.targets`: the Hydra group is the registry), a dataclass
    whose fields the node's keys and values must match."""
    cls = _class_of(group, node)
    if not declares_fields(cls):
        raise ConfigError(f"{group}._target_", node.get("_target_"), list(allowed_targets(group)),
                          problem=f"not a {group} config class (a dataclass of option() fields)")
    return cls(**check_node(group, node, cls))


# -------------------------------------------------------------------------------------- the group checks

def check_calibration(calib: Any, cache: Path) -> None:
    if isinstance(calib, WikiCalibration):
        if calib.path is not None:
            check_file("calibration.path", calib.path)
        else:
            check_asset("calibration.path", "wiki", cache, value=None)


def check_heldout_text(name: str, spec: Any, tuning: bool, cache: Path) -> tuple[str, str]:
    """(corpus, split) of one `eval.heldout.texts` entry (`gradmap.data.check_heldout_spec`), then its file, or
    its offline asset built where no path is given."""
    corpus, split = check_heldout_spec(name, spec, tuning)
    key = f"eval.heldout.texts.{name}"
    if spec.get("path") is not None:
        check_file(f"{key}.path", spec["path"])
    elif corpus in OFFLINE_CORPORA:
        check_asset(f"{key}.corpus", corpus, cache)
    return corpus, split


def check_eval(ev: Evaluation, tuning: bool, cache: Path) -> None:
    texts = ev.heldout.texts or {}
    for name, spec in texts.items():
        check_heldout_text(str(name), spec, tuning, cache)
    seq_lens = ev.perplexity.seq_lens
    if not seq_lens and not ev.lm_eval.tasks:
        raise ConfigError("eval.perplexity.seq_lens", seq_lens, "at least one window length, or eval.lm_eval.tasks",
                          problem="nothing would be evaluated")
    if texts and not seq_lens:
        raise ConfigError("eval.perplexity.seq_lens", seq_lens, "at least one window length, or "
                          "eval.heldout.texts={}", problem=f"held-out texts ({', '.join(map(str, texts))}) without a "
                          "window length would be read and never evaluated")
    if seq_lens and not texts:
        raise ConfigError("eval.perplexity.seq_lens", seq_lens, "[] when eval.heldout.texts is empty",
                          problem="no held-out text to evaluate")
    lm = ev.lm_eval
    if isinstance(lm.limit, float) and lm.limit > 1:
        allowed = {f.name: f for f in dataclasses.fields(type(lm))}["limit"].metadata["allowed"]
        raise ConfigError("eval.lm_eval.limit", lm.limit, allowed, problem="a fraction above 1")
    for name, spec in lm.local_tasks.items():
        key = f"eval.lm_eval.local_tasks.{name}"
        template = template_path(spec.template)
        if not template.is_file():
            raise ConfigError(f"{key}.template", spec.template, shipped_templates(),
                              problem=f"not found in {TASKS_DIR}")
        found = task_name(template)
        if found is not None and found != name:
            raise ConfigError(key, name, f"the task name {found!r} that {template.name} defines",
                              problem="the local task's name and its template differ")
    for task in lm.tasks:
        if task in lm.local_tasks:
            spec = lm.local_tasks[task]
            data_name = Path(str(spec.data if spec.data is not None else spec.file or "")).name
            if tuning and data_name.startswith(TEST_SPLIT):  # test items: as for held-out text, never for choosing
                raise ConfigError("eval.lm_eval.tasks", task, "tasks whose data is not a test file",
                                  problem=f"its data {data_name!r} is test data, refused in a tuning run "
                                          f"(tuning=true): choices are made on 'validation' only")
            if spec.data is not None:
                check_file(f"eval.lm_eval.local_tasks.{task}.data", spec.data)
            elif spec.asset is None or spec.file is None:
                raise ConfigError(f"eval.lm_eval.local_tasks.{task}.asset", spec.asset, "an offline asset and a file "
                                  "of it (asset, file), or a data file", problem="no data for the task")
            else:
                check_asset(f"eval.lm_eval.local_tasks.{task}.data", spec.asset, cache, value=None)
    unknown = [t for t in lm.tasks if t not in lm.local_tasks and not lm_eval_task_known(t)]
    if unknown:
        raise ConfigError("eval.lm_eval.tasks", unknown, "task names of lm-eval (`lm-eval ls tasks`) or of "
                          f"eval.lm_eval.local_tasks ({', '.join(map(str, lm.local_tasks)) or 'none'})",
                          problem=f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")


def check_lengths(cfg: Mapping[str, Any], info: ModelInfo) -> None:
    """Window lengths against the model's maximum positions, and the held-out budget against the windows."""
    seq_lens = cfg["eval"]["perplexity"]["seq_lens"]
    if info.max_positions is not None:
        limit = f"2..{info.max_positions} (the model's maximum positions)"
        if cfg["calibration"]["seq_len"] > info.max_positions:
            raise ConfigError("calibration.seq_len", cfg["calibration"]["seq_len"], limit,
                              problem="longer than the model allows")
        for i, seq_len in enumerate(seq_lens):
            if seq_len > info.max_positions:
                raise ConfigError(f"eval.perplexity.seq_lens[{i}]", seq_len, limit,
                                  problem="longer than the model allows")
    max_tokens = cfg["eval"]["heldout"]["max_tokens"]
    if max_tokens is not None and seq_lens and max_tokens < max(seq_lens):
        raise ConfigError("eval.heldout.max_tokens", max_tokens, f"at least max(eval.perplexity.seq_lens) = "
                          f"{max(seq_lens)}, or null", problem="fewer tokens than one perplexity window")


def check_device(device: str, dtype: str, device_map: Any) -> str:
    """The device exists on this machine and supports the dtype; returns the resolved device."""
    if not DEVICE_PATTERN.match(device):
        raise ConfigError("device", device, DEVICES_ALLOWED)
    if device_map or device == "cpu":  # device_map: accelerate places the model and `device` is ignored
        return device
    import torch

    resolved = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if resolved.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device", device, "auto, cpu" + (", mps" if _mps() else ""),
                              problem="CUDA is not available on this machine")
        index = int(resolved.split(":")[1]) if ":" in resolved else 0
        if index >= torch.cuda.device_count():
            raise ConfigError("device", device, f"cuda:0..cuda:{torch.cuda.device_count() - 1}",
                              problem=f"this machine has {torch.cuda.device_count()} CUDA device(s)")
        if DTYPE_ALIASES[dtype] == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("dtype", dtype, "float32, float16", problem=f"{resolved} does not support bfloat16")
    elif resolved == "mps" and not _mps():
        raise ConfigError("device", device, "auto, cpu" + (", cuda" if torch.cuda.is_available() else ""),
                          problem="MPS is not available on this machine")
    return resolved


def _mps() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


# ------------------------------------------------------------------------------ metric and compensation

def check_component(group: str, node: Mapping[str, Any], build: bool = True) -> Any:
    """Check a metric/compensation node against its class, a dataclass of `option()` fields, as every group is
    checked (`check_node`: unknown and missing keys, a deleted key would run with a value the record does not show;
    types, ranges, choices) and, with `build`, build it; errors its constructor raises (checks across fields) come
    back as ConfigError with the group prefix."""
    cls = _class_of(group, node)
    if not declares_fields(cls):
        raise ConfigError(f"{group}._target_", node.get("_target_"), f"a {group} class that is a dataclass "
                          "(@dataclass(eq=False)) declaring its options as fields (gradmap.schema.option)",
                          problem=f"{getattr(cls, '__name__', cls)} does not declare its options as dataclass fields")
    check_node(group, node, cls)
    if not build:
        return None
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, ConfigError):
            raise cause.relabel(prefix=group) from err
        raise ConfigError(group, node.get("_target_"), problem=brief(cause)) \
            from err
    except ConfigError as err:
        raise err.relabel(prefix=group)


# ------------------------------------------------------------------------------------------- validate

@dataclass
class Checked:
    """What validation established: the resolved config, the model facts and the objects it built (the model,
    calibration, evaluation and logger config objects always; the metric and compensation with `build`)."""

    config: dict[str, Any]
    info: ModelInfo
    num_prune: int
    device: str
    cache: Path
    save_dir: Path | None
    model: Any = None  # with the top-level `dtype` applied
    calibration: Any = None
    evaluation: Evaluation | None = None
    logger: Any = None
    metric: Any = None
    compensation: Any = None
    notes: list[str] = field(default_factory=list)


def input_paths(c: Mapping[str, Any]) -> dict[str, Path]:
    """The files a run reads that its config names (key -> resolved path), from the raw config."""
    from gradmap.path_checks import resolve_path

    def node(value: Any) -> Mapping[str, Any]:
        return value if isinstance(value, Mapping) else {}

    found = {"calibration.path": node(c.get("calibration")).get("path")}
    ev = node(c.get("eval"))
    for name, spec in node(node(ev.get("heldout")).get("texts")).items():
        found[f"eval.heldout.texts.{name}.path"] = node(spec).get("path")
    for name, spec in node(node(ev.get("lm_eval")).get("local_tasks")).items():
        found[f"eval.lm_eval.local_tasks.{name}.data"] = node(spec).get("data")
    return {k: resolve_path(v) for k, v in found.items() if isinstance(v, str) and v.strip()}


def resolve(cfg: Any) -> dict[str, Any]:
    """The config as plain containers, every interpolation resolved (a failing one is a ConfigError)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        msg = " ".join(line for line in str(getattr(err, "msg", err)).splitlines()
                       if not line.strip().startswith(("full_key:", "object_type=")))
        raise ConfigError(str(key), problem=f"cannot be resolved ({one_line(msg)})",
                          allowed="a value or a resolvable ${...} interpolation") from err


def validate(cfg: Any, run_dir: str | Path | None = None, build: bool = True, evaluate: bool = True) -> Checked:
    """Check the whole run config before anything is loaded; raise ConfigError on the first problem.

    `build=False` skips the checks that import torch/transformers (device, metric, compensation, meta model);
    `evaluate=False` (select-only use, `gradmap.runner.select_layers`) skips the eval group: nothing is evaluated.
    """
    c = cfg if isinstance(cfg, dict) else resolve(cfg)
    for group in GROUPS:
        if not isinstance(c.get(group), Mapping):
            raise ConfigError(group, c.get(group), f"an option of conf/{group}/", problem="missing config group")
    check_top_keys(c)
    top = [f.name for f in dataclasses.fields(TopLevelSchema)]
    check_node("", {k: c[k] for k in top}, TopLevelSchema)
    cache = check_cache_dir(c["cache_dir"])
    from gradmap.assets import cache_root

    caches = sorted({cache, cache_root(default=True).resolve(), cache_root(default=True)}, key=str)
    save_dir = None
    if c["save_dir"] is not None:
        save_dir = check_save_dir(c["save_dir"], c["save_overwrite"], caches,
                                  Path(run_dir).resolve() if run_dir is not None else None, input_paths(c))
    writes = [k for k, on in (("cache_selection=true", c["cache_selection"]),
                              ("eval.cache_dense=true", isinstance(c["eval"], Mapping)
                               and c["eval"].get("cache_dense") is True)) if on]
    if writes:
        check_cache_writable(cache, ", ".join(writes))
    model = build_group("model", c["model"])
    if c["dtype"] is not None:
        model = dataclasses.replace(model, dtype=c["dtype"])
    logger = build_group("logger", c["logger"])
    calibration = build_group("calibration", c["calibration"])
    check_calibration(calibration, cache)
    evaluation = build_group("eval", c["eval"]) if evaluate else None
    if evaluation is not None:
        check_eval(evaluation, c["tuning"], cache)
    if evaluation is not None and isinstance(model, TinyRandomModel) and evaluation.lm_eval.tasks:
        raise ConfigError("eval.lm_eval.tasks", evaluation.lm_eval.tasks, "[] with model=tiny_random",
                          problem="lm-eval needs a real tokenizer; model=tiny_random's byte tokenizer only supports "
                                  "perplexity")
    info = model.info(cache)
    n = num_to_prune(info.num_layers, c["prune_ratio"], c["num_prune"])
    check_lengths(c, info)
    checked = Checked(c, info, n, c["device"], cache, save_dir, model=model, calibration=calibration,
                      evaluation=evaluation, logger=logger)
    if not build:
        return checked
    checked.device = check_device(c["device"], model.dtype, model.device_map)
    for group in ("metric", "compensation"):  # both checked before either constructor runs
        check_component(group, c[group], build=False)
    checked.metric = check_component("metric", c["metric"])
    try:
        getattr(checked.metric, "check_budget", lambda *_: None)(info.num_layers, n)
    except ConfigError as err:
        if err.key == "num_prune" and c["num_prune"] is None:
            err.relabel(key="prune_ratio", value=c["prune_ratio"])
        raise
    checked.compensation = check_component("compensation", c["compensation"])
    check = getattr(checked.compensation, "check_compatible", None)
    if callable(check):
        from gradmap.compensation import IncompatibleCompensationError

        meta = model.architecture(cache)
        try:
            check(meta, [])
        except IncompatibleCompensationError as err:
            raise err.relabel(key="compensation", value=c["compensation"].get("_target_"))
        tokens = calibration.num_samples * calibration.seq_len
        try:
            getattr(checked.compensation, "check_calibration", lambda *_: None)(meta, tokens)
        except ConfigError as err:
            raise err.relabel(prefix="compensation")
    return checked
