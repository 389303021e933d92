"""Validation of a composed run config, right after composition and before anything is loaded.

`validate(cfg)` checks every top-level and group key for type, range and consistency with the model's config (layer
count and maximum positions read from the asset's `config.json`, the hub config or the tiny model's YAML, without
loading weights), device and dtype availability, protected layers vs layers to remove, the files and assets the run
will read, the save and cache folders, and the lm-eval tasks. A bad value raises `ConfigError`, the one error type of
a refused run: it carries the key, the value and what is allowed, and prints as one line (`run.py` exits 2).

The checks are pure functions (`check_value`, `check_node`, `check_save_dir`, ...). The schemas of the plain groups
are dataclasses whose field types and metadata (ranges, choices) are the type checks; they hold no defaults (those
live in `conf/` only). The schema of a metric or compensation is its class: the keys of its YAML must be the
parameters of the class's `__init__`, with the annotated types, and the class's own constructor checks the ranges
and choices (raising `ConfigError` with the parameter as key).

Order: checks that need no heavy import run first (a refused run costs about half a second): keys, types, ranges,
files, assets, save and cache folders, lm-eval task names (a text scan of lm-eval's task YAMLs; lm-eval's own index,
~15 s, only for a name the scan does not find), the model's layer count and maximum positions; then those that import
torch (device, metric and compensation classes), then transformers (a meta-device model for the compensation's
compatibility check).

This module is also where the allowed values of the plain config keys live (dtypes, sources, corpora, logger kinds),
so the check does not import the modules that use them.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

# --------------------------------------------------------------------------------------- allowed values

# dtype names accepted by `dtype` and `model.dtype` -> the torch dtype's name.
DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                 "float16": "float16", "fp16": "float16"}
MODEL_SOURCES = ("offline", "hub", "tiny_random")
CALIBRATION_SOURCES = ("offline_wiki", "hub")
HUB_DATASETS = ("wikitext2", "c4")
# Held-out corpora and the splits each may be evaluated on. wiki / news: offline assets of that name (files
# <split>.jsonl); wikitext2: the hub dataset; jsonl: any file given as `path` (tests, your own text).
HELDOUT_CORPORA = {"wiki": ("validation", "test"), "news": ("test",), "wikitext2": ("validation", "test"),
                   "jsonl": ("validation", "test")}
OFFLINE_CORPORA = ("wiki", "news")  # corpora read from an offline asset of the same name unless `path` is given
TEST_SPLIT = "test"
LOGGER_KINDS = ("wandb", "none")
WANDB_MODES = ("online", "offline", "disabled")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICES_ALLOWED = "auto, cpu, cuda, cuda:N, mps"
TASKS_DIR = Path(__file__).parent / "tasks"  # lm-eval task templates shipped with gradmap
MODEL_ASSETS = ("smollm2_135m", "gemma3_270m")  # offline assets that are models (conf/model/*.yaml `asset`)
# Config attributes that hold the layer count and the maximum positions, by architecture family.
LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layer", "num_layers")
MAX_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx")


# ------------------------------------------------------------------------------------------ the error

_UNSET = object()


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str) \
        if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 120 else text[:117] + "..."


def one_line(text: str) -> str:
    """Collapse whitespace and newlines: an error is always exactly one line."""
    return " ".join(str(text).split())


def brief(err: BaseException, limit: int = 240) -> str:
    """`Type: message` of an exception in one line, cut at a sentence end where it is too long."""
    text = one_line(err)
    if len(text) > limit:
        cut = text.rfind(". ", 0, limit)
        text = text[:cut + 1] if cut > limit // 3 else text[:limit - 3] + "..."
    return f"{type(err).__name__}: {text}"


class ConfigError(ValueError):
    """A run refused because of a bad value or a fault the user can fix: the key, the value, what is allowed.

    `str(err)` is one line: `key=value: problem; allowed: ...; hint`. Keys raised inside a metric or compensation
    class are its parameter names; `relabel(prefix=...)` turns them into full keys (`metric.reduction`).
    """

    def __init__(self, key: str, value: Any = _UNSET, allowed: Any = None, problem: str | None = None,
                 hint: str | None = None):
        self.key, self.value, self.allowed, self.problem, self.hint = key, value, allowed, problem, hint
        super().__init__(self.line())

    def line(self) -> str:
        text = self.key if self.value is _UNSET else f"{self.key}={_show(self.value)}"
        if self.problem:
            text += f": {self.problem}"
        elif self.value is not _UNSET:
            text += " is not valid"
        if self.allowed is not None:
            allowed = self.allowed
            if isinstance(allowed, (list, tuple)):
                allowed = ", ".join(str(a) for a in allowed)
            text += f"; allowed: {allowed}"
        if self.hint:
            text += f"; {self.hint}"
        return one_line(text)

    def relabel(self, prefix: str | None = None, key: str | None = None, value: Any = _UNSET) -> ConfigError:
        """Give the key its group prefix (or replace it, and the value); in place, returns self."""
        if key is not None:
            self.key = key
        elif prefix and not self.key.startswith(f"{prefix}.") and self.key != prefix:
            self.key = f"{prefix}.{self.key}"
        if value is not _UNSET:
            self.value = value
        self.args = (self.line(),)
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "value": None if self.value is _UNSET else self.value,
                "allowed": self.allowed if not isinstance(self.allowed, tuple) else list(self.allowed),
                "problem": self.problem, "hint": self.hint}


# --------------------------------------------------------------------------------------- value checks

def _describe(tp: Any, meta: Mapping[str, Any]) -> str:
    """What a schema field allows, in words."""
    if "allowed" in meta:
        return meta["allowed"]
    if "choices" in meta:
        return ", ".join(str(c) for c in meta["choices"]) + (" or null" if _optional(tp) else "")
    base = _strip_optional(tp)
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(base)
    if words is None:
        origin = typing.get_origin(base)
        if origin in (list, tuple):
            (inner,) = typing.get_args(base)[:1] or (Any,)
            words = f"a list of {_describe(inner, {}).removeprefix('a ').removeprefix('an ')}s"
        elif origin in (dict, Mapping) or base in (dict, Mapping):
            words = "a mapping"
        else:
            words = "any value"
    bounds = []
    for op, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if op in meta:
            bounds.append(f"{sym} {meta[op]}")
    if bounds:
        words += " " + " and ".join(bounds)
    if _optional(tp):
        words += " or null"
    return words


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) is Union and type(None) in typing.get_args(tp)


def _strip_optional(tp: Any) -> Any:
    if _optional(tp):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else Union[tuple(rest)]
    return tp


def check_value(key: str, value: Any, tp: Any, meta: Mapping[str, Any] | None = None) -> Any:
    """Check one value against a type (bool, int, float, str, list[...], dict, Any, Optional[...]) and the
    metadata `gt`, `ge`, `lt`, `le`, `choices`; raise ConfigError naming the key, the value and what is allowed.

    Strict: an integer key refuses 2.5 (and 2.0), a boolean key refuses "yes" and 1, a number refuses true.
    """
    meta = meta or {}
    allowed = _describe(tp, meta)
    if value is None:
        if _optional(tp) or tp is Any:
            return None
        raise ConfigError(key, value, allowed, problem="a value is required")
    base = _strip_optional(tp)
    origin = typing.get_origin(base)
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, allowed, problem="not a boolean")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problem = "not an integer" + (" (a fraction)" if isinstance(value, float) else "")
            raise ConfigError(key, value, allowed, problem=problem)
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, allowed, problem="not a number")
        if not math.isfinite(value):
            raise ConfigError(key, value, allowed, problem="not a finite number")
    elif base is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, allowed, problem="not a string")
    elif origin in (list, tuple) or base in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, allowed, problem="not a list")
        inner = (typing.get_args(base) or (Any,))[0]
        for i, item in enumerate(value):
            check_value(f"{key}[{i}]", item, inner, meta.get("items", {}))
    elif origin in (dict, Mapping) or base in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, allowed, problem="not a mapping")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(key, value, allowed)
    for op, test in (("gt", lambda v, b: v > b), ("ge", lambda v, b: v >= b), ("lt", lambda v, b: v < b),
                     ("le", lambda v, b: v <= b)):
        if op in meta and isinstance(value, (int, float)) and not test(value, meta[op]):
            raise ConfigError(key, value, allowed, problem="out of range")
    return value


def check_node(prefix: str, node: Any, schema: type, extra_keys: bool = False) -> dict[str, Any]:
    """Check a config node (a mapping) against a schema dataclass: unknown keys (unless `extra_keys`), missing keys
    (unless the field's metadata says `absent_ok`), and every value's type and range."""
    if not isinstance(node, Mapping):
        raise ConfigError(prefix, node, f"a mapping with the keys {', '.join(f.name for f in dataclasses.fields(schema))}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    if not extra_keys:
        for key in node:
            if key not in fields:
                raise ConfigError(_join(prefix, key), node[key], ", ".join(fields), problem="unknown key")
    for name, f in fields.items():
        key = _join(prefix, name)
        if name not in node:
            if f.metadata.get("absent_ok"):
                continue
            raise ConfigError(key, problem="missing", allowed=_describe(hints[name], f.metadata))
        check_value(key, node[name], hints[name], f.metadata)
    return dict(node)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


# ---------------------------------------------------------------------------------------------- schemas
# Types, ranges and choices only: no defaults (conf/config.yaml composes those). `absent_ok`: the key may be left out.

def _f(**meta: Any) -> Any:
    return field(metadata=meta)


@dataclass
class TopLevelSchema:
    prune_ratio: Optional[float] = _f(gt=0, lt=1)
    num_prune: Optional[int] = _f(ge=1)
    seed: int = _f(ge=0, le=2**32 - 1)  # numpy's seed range
    device: str = _f(allowed=DEVICES_ALLOWED)
    dtype: Optional[str] = _f(choices=tuple(DTYPE_ALIASES))
    save_dir: Optional[str] = _f()
    save_overwrite: bool = _f()
    cache_dir: Optional[str] = _f()
    cache_selection: bool = _f()
    force: bool = _f()
    tuning: bool = _f()


@dataclass
class ModelSchema:
    source: str = _f(choices=MODEL_SOURCES)
    dtype: str = _f(choices=tuple(DTYPE_ALIASES))
    device_map: Optional[Any] = _f(absent_ok=True)
    asset: str = _f(absent_ok=True, choices=MODEL_ASSETS)
    pretrained: str = _f(absent_ok=True)
    attn_implementation: Optional[str] = _f(absent_ok=True)
    config: dict = _f(absent_ok=True)


@dataclass
class TinyModelConfigSchema:  # model.config of source=tiny_random; other keys go to LlamaConfig as they are
    num_layers: int = _f(ge=2)
    hidden_size: int = _f(ge=1)
    intermediate_size: int = _f(ge=1)
    vocab_size: int = _f(ge=2)
    max_position_embeddings: int = _f(ge=2)
    seed: int = _f(ge=0)


@dataclass
class CalibrationSchema:
    source: str = _f(choices=CALIBRATION_SOURCES)
    path: Optional[str] = _f(absent_ok=True)
    dataset: str = _f(absent_ok=True, choices=HUB_DATASETS)
    num_samples: int = _f(ge=1)
    seq_len: int = _f(ge=2)  # one window predicts seq_len - 1 tokens
    batch_size: int = _f(ge=1)
    seed: int = _f(ge=0, le=2**32 - 1)


@dataclass
class EvalSchema:
    heldout: dict = _f()
    perplexity: dict = _f()
    lm_eval: dict = _f()
    cache_dense: bool = _f()


@dataclass
class HeldoutSchema:
    max_tokens: Optional[int] = _f(ge=2)
    texts: dict = _f()


@dataclass
class HeldoutTextSchema:
    corpus: str = _f(choices=tuple(HELDOUT_CORPORA))
    split: str = _f(choices=("validation", "test"))
    path: Optional[str] = _f(absent_ok=True)


@dataclass
class PerplexitySchema:
    seq_lens: list[int] = _f(items={"ge": 2})
    batch_size: int = _f(ge=1)
    max_windows: Optional[int] = _f(ge=1)


@dataclass
class LmEvalSchema:
    tasks: list[str] = _f()
    limit: Optional[float] = _f(gt=0, allowed="an integer >= 1 (questions), a fraction in (0, 1], or null (all)")
    batch_size: int = _f(ge=1)
    num_fewshot: Optional[int] = _f(ge=0)
    local_tasks: dict = _f()
    seed: Optional[int] = _f(absent_ok=True, ge=0)


@dataclass
class LocalTaskSchema:
    template: str = _f()
    data: Optional[str] = _f()
    asset: str = _f(absent_ok=True)
    file: str = _f(absent_ok=True)


@dataclass
class LoggerSchema:
    kind: str = _f(choices=LOGGER_KINDS)


@dataclass
class WandbSchema:
    kind: str = _f(choices=LOGGER_KINDS)
    project: str = _f()
    entity: Optional[str] = _f()
    mode: str = _f(choices=WANDB_MODES)
    group: Optional[str] = _f()
    tags: list[str] = _f()
    name: Optional[str] = _f()


# ------------------------------------------------------------------------------------------ prune count

def num_to_prune(num_layers: int, prune_ratio: float | None, num_prune: int | None) -> int:
    """floor(ratio * L + 0.5), i.e. round half up, unless `num_prune` is given explicitly."""
    if num_prune is not None:
        n = check_value("num_prune", num_prune, int)
        key, value = "num_prune", num_prune
    else:
        if prune_ratio is None:
            raise ConfigError("prune_ratio", None, "a number in (0, 1), or set num_prune",
                              problem="neither prune_ratio nor num_prune is set")
        check_value("prune_ratio", prune_ratio, float, {"gt": 0, "lt": 1})
        n = math.floor(float(prune_ratio) * num_layers + 0.5)
        key, value = "prune_ratio", prune_ratio
    if not 0 < n < num_layers:
        how = "" if num_prune is not None else f" (floor({prune_ratio} x {num_layers} + 0.5))"
        raise ConfigError(key, value, f"1..{num_layers - 1} layers" if num_prune is not None else
                          f"a ratio that removes 1..{num_layers - 1} of {num_layers} layers",
                          problem=f"removing {n} of {num_layers} layers is not possible{how}")
    return n


# ------------------------------------------------------------------------------------------ model info

@dataclass
class ModelInfo:
    """What validation needs to know about the model, read without loading weights."""

    num_layers: int
    max_positions: int | None
    model_type: str
    path: str | None = None  # the folder of an offline asset


def _config_attr(config: Mapping[str, Any], names: tuple[str, ...]) -> int | None:
    for source in (config, config.get("text_config") or {}):
        for name in names:
            if isinstance(source.get(name), int):
                return source[name]
    return None


def model_info(model_cfg: Mapping[str, Any], cache: Path) -> ModelInfo:
    source = model_cfg["source"]
    if source == "tiny_random":
        conf = model_cfg.get("config") or {}
        check_node("model.config", conf, TinyModelConfigSchema, extra_keys=True)
        return ModelInfo(conf["num_layers"], conf["max_position_embeddings"], "llama")
    if source == "offline":
        folder = check_asset("model.asset", model_cfg["asset"], cache)
        path = folder / "config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError("model.asset", model_cfg["asset"], problem=f"{path} is unreadable ({err})",
                              hint=f"rebuild it with: {asset_command(cache, '--rebuild', model_cfg['asset'])}") from err
    else:
        try:
            from huggingface_hub.utils import logging as hub_logging
            from transformers import AutoConfig

            verbosity = hub_logging.get_verbosity()
            hub_logging.set_verbosity_error()  # its retry warnings would break the one-line error
            try:
                config = AutoConfig.from_pretrained(model_cfg["pretrained"]).to_dict()
            finally:
                hub_logging.set_verbosity(verbosity)
        except Exception as err:  # noqa: BLE001  (network, typo, gated model: all mean "cannot read it")
            raise ConfigError("model.pretrained", model_cfg["pretrained"],
                              problem=f"its config cannot be read ({brief(err)})",
                              hint="check the name, network access or the Hugging Face cache (HF_HUB_OFFLINE), "
                                   "and `huggingface-cli login` for gated models") from err
        folder = None
    layers = _config_attr(config, LAYER_COUNT_ATTRS)
    if layers is None:
        raise ConfigError("model", model_cfg.get("asset") or model_cfg.get("pretrained"),
                          problem=f"its config has no layer count ({', '.join(LAYER_COUNT_ATTRS)})")
    return ModelInfo(layers, _config_attr(config, MAX_POSITION_ATTRS), str(config.get("model_type")),
                     str(folder) if folder else None)


# ------------------------------------------------------------------------------------------------ assets

def asset_command(cache: Path, *args: str) -> str:
    from gradmap.assets import cache_root

    env = "" if Path(cache) == cache_root(default=True) else f"GRADMAP_CACHE={cache} "
    return f"{env}python -m gradmap.assets {' '.join(args)}".strip()


def check_asset(key: str, name: str, cache: Path, value: Any = _UNSET) -> Path:
    """The folder of a built, intact offline asset in `cache`, or ConfigError saying the command that builds it.
    `value`: the config value that made the run need the asset (default: the asset's name)."""
    from gradmap import assets

    value = name if value is _UNSET else value
    if name not in assets.ASSETS:
        raise ConfigError(key, value, sorted(assets.ASSETS), problem="no such offline asset")
    folder = Path(cache) / name
    what = "the offline asset" if value == name else f"the offline asset {name!r} it reads"
    if not assets.is_complete(name, root=cache):
        raise ConfigError(key, value, problem=f"{what} is not built in {cache}",
                          hint=f"build it with: {asset_command(cache, name)}")
    problems = assets.quick_verify(name, root=cache, weights_sha256=True)
    if problems:
        raise ConfigError(key, value, problem=f"{what} in {folder} is corrupt ({problems[0]})",
                          hint=f"rebuild it with: {asset_command(cache, '--rebuild', name)}")
    return folder


# ------------------------------------------------------------------------------------------------- paths

def _resolve(path: str) -> Path:
    return Path(os.path.expanduser(path)).resolve()


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_creatable(key: str, value: str, path: Path) -> None:
    """A folder that does not exist yet must be creatable: its nearest existing ancestor is a writable folder."""
    anchor = _nearest_existing(path.parent if path.exists() else path)
    if not anchor.is_dir():
        raise ConfigError(key, value, "a path under a writable folder", problem=f"{anchor} is a file, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise ConfigError(key, value, "a path under a writable folder", problem=f"{anchor} is not writable")


def check_save_dir(save_dir: str, overwrite: bool, caches: list[Path], run_dir: Path | None) -> Path:
    """The pruned-model folder: not inside (or around) an asset cache or this run's folder, not a file, not a
    folder holding the working directory or home, empty or new unless `save_overwrite=true`, and creatable."""
    key = "save_dir"
    if not str(save_dir).strip():
        raise ConfigError(key, save_dir, "a folder path, or null (do not save)", problem="empty path")
    path = _resolve(save_dir)
    for cache in caches:
        if _within(path, cache):
            raise ConfigError(key, save_dir, "a folder outside the asset cache",
                              problem=f"{path} is inside the asset cache {cache} (it would replace cached files)")
        if _within(cache, path):
            raise ConfigError(key, save_dir, "a folder outside the asset cache",
                              problem=f"{path} contains the asset cache {cache}")
    if run_dir is not None and _within(Path(run_dir).resolve(), path):
        raise ConfigError(key, save_dir, "a folder that does not contain this run's output folder",
                          problem=f"{path} contains the run folder {run_dir}")
    for guarded in (Path.cwd(), Path.home(), Path(path.anchor)):
        if _within(guarded.resolve(), path):
            raise ConfigError(key, save_dir, "a dedicated folder for the checkpoint",
                              problem=f"{path} contains {guarded} (replacing it would delete it)")
    if path.exists():
        if not path.is_dir():
            raise ConfigError(key, save_dir, "a folder", problem=f"{path} is an existing file")
        if any(path.iterdir()) and not overwrite:
            raise ConfigError(key, save_dir, "an empty or new folder, or save_overwrite=true to replace it",
                              problem=f"{path} is a non-empty folder")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise ConfigError(key, save_dir, "a path under a writable folder", problem=f"{path.parent} is not writable")
    else:
        check_creatable(key, save_dir, path)
    return path


def check_cache_dir(cache_dir: str | None) -> Path:
    from gradmap.assets import cache_root

    if cache_dir is None:
        return cache_root(default=True)
    if not str(cache_dir).strip():
        raise ConfigError("cache_dir", cache_dir, "a folder path, or null ($GRADMAP_CACHE or ~/.cache/gradmap)",
                          problem="empty path")
    path = _resolve(cache_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError("cache_dir", cache_dir, "a folder", problem=f"{path} is an existing file")
    check_creatable("cache_dir", cache_dir, path)
    return path


def check_file(key: str, value: str) -> Path:
    path = _resolve(value)
    if not path.exists():
        raise ConfigError(key, value, "an existing file", problem="no such file")
    if not path.is_file():
        raise ConfigError(key, value, "an existing file", problem="not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(key, value, "a readable file", problem="not readable")
    return path


# -------------------------------------------------------------------------------------- the group checks

def check_calibration(calib: Mapping[str, Any], cache: Path) -> None:
    check_node("calibration", calib, CalibrationSchema)
    if calib["source"] == "offline_wiki":
        if calib.get("path") is not None:
            check_file("calibration.path", calib["path"])
        else:
            check_asset("calibration.source", "wiki", cache, value=calib["source"])
    elif calib.get("dataset") is None:
        raise ConfigError("calibration.dataset", problem="missing (source=hub)", allowed=", ".join(HUB_DATASETS))


def check_heldout_text(name: str, spec: Any, tuning: bool, cache: Path | None) -> tuple[str, str]:
    """(corpus, split) of one `eval.heldout.texts` entry: known corpus and split, a path where needed, the asset
    built where no path is given, and no `test` text in a tuning run."""
    key = f"eval.heldout.texts.{name}"
    check_node(key, spec, HeldoutTextSchema)
    corpus, split = spec["corpus"], spec["split"]
    if split not in HELDOUT_CORPORA[corpus]:
        raise ConfigError(f"{key}.split", split, HELDOUT_CORPORA[corpus],
                          problem=f"not available for corpus {corpus!r}")
    path = spec.get("path")
    if corpus == "jsonl" and path is None:
        raise ConfigError(f"{key}.path", None, "the path of a JSONL file with a 'text' field",
                          problem="required for corpus 'jsonl'")
    if tuning and split == TEST_SPLIT:
        raise ConfigError(f"{key}.split", split, "validation",
                          problem="refused in a tuning run (tuning=true): choices are made on 'validation' only")
    if path is not None:
        check_file(f"{key}.path", path)
    elif corpus in OFFLINE_CORPORA and cache is not None:
        check_asset(f"{key}.corpus", corpus, cache)
    return corpus, split


def check_eval(ev: Mapping[str, Any], tuning: bool, cache: Path) -> None:
    check_node("eval", ev, EvalSchema)
    check_node("eval.heldout", ev["heldout"], HeldoutSchema)
    texts = ev["heldout"]["texts"] or {}
    for name, spec in texts.items():
        check_heldout_text(str(name), spec, tuning, cache)
    check_node("eval.perplexity", ev["perplexity"], PerplexitySchema)
    seq_lens = ev["perplexity"]["seq_lens"]
    if seq_lens and not texts:
        raise ConfigError("eval.perplexity.seq_lens", seq_lens, "[] when eval.heldout.texts is empty",
                          problem="no held-out text to evaluate")
    lm = ev["lm_eval"]
    check_node("eval.lm_eval", lm, LmEvalSchema)
    limit = lm["limit"]
    if isinstance(limit, float) and limit > 1:
        raise ConfigError("eval.lm_eval.limit", limit, LmEvalSchema.__dataclass_fields__["limit"].metadata["allowed"],
                          problem="a fraction above 1")
    local = lm["local_tasks"] or {}
    for name, spec in local.items():
        key = f"eval.lm_eval.local_tasks.{name}"
        check_node(key, spec, LocalTaskSchema)
        template = TASKS_DIR / (spec["template"] if spec["template"].endswith((".yaml", ".yml"))
                                else f"{spec['template']}.yaml")
        if not template.is_file():
            raise ConfigError(f"{key}.template", spec["template"],
                              sorted(p.name for p in TASKS_DIR.glob("*.yaml")), problem=f"not found in {TASKS_DIR}")
        found = _yaml_task_name(template)
        if found is not None and found != name:
            raise ConfigError(f"eval.lm_eval.local_tasks.{name}", name, f"the task name {found!r} that "
                              f"{template.name} defines", problem="the local task's name and its template differ")
    for task in lm["tasks"]:
        if task in local:
            spec = local[task]
            if spec.get("data") is not None:
                check_file(f"eval.lm_eval.local_tasks.{task}.data", spec["data"])
            else:
                check_asset(f"eval.lm_eval.local_tasks.{task}.data", spec.get("asset", task.removesuffix("_bigbench")),
                            cache, value=None)
    unknown = [t for t in lm["tasks"] if t not in local and not lm_eval_task_known(t)]
    if unknown:
        raise ConfigError("eval.lm_eval.tasks", unknown, "task names of lm-eval (`lm-eval ls tasks`) or of "
                          f"eval.lm_eval.local_tasks ({', '.join(map(str, local)) or 'none'})",
                          problem=f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")


def _yaml_task_name(path: Path) -> str | None:
    match = re.search(r"^task:\s*([^\s#]+)", path.read_text(), re.M)
    return match.group(1).strip("'\"") if match else None


_TASK_NAMES: set[str] | None = None
_TOP_KEY = re.compile(r"^(task|group|tag):[ \t]*([^#\n]*)", re.M)
_NESTED_TASK = re.compile(r"^[ \t]+-?[ \t]*task:[ \t]*([^\s#\[]+)", re.M)


def _scan_lm_eval_names() -> set[str]:
    """Task, group and tag names of lm-eval's built-in YAMLs by a plain text scan (under a second, against ~15 s
    for lm-eval's own index). It finds most names; a name it misses is looked up in lm-eval's index."""
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        return set()
    names: set[str] = set()
    for folder, _, files in os.walk(Path(spec.origin).parent / "tasks"):
        for name in files:
            if not name.endswith((".yaml", ".yml")):
                continue
            try:
                text = Path(folder, name).read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            for _, value in _TOP_KEY.findall(text):
                value = value.strip()
                if value.startswith("["):
                    names.update(v.strip().strip("'\"") for v in value.strip("[]").split(",") if v.strip())
                elif value:
                    names.add(value.strip("'\""))
            names.update(v.strip("'\"") for v in _NESTED_TASK.findall(text))
    return names


def lm_eval_task_known(task: str) -> bool:
    global _TASK_NAMES
    if _TASK_NAMES is None:
        _TASK_NAMES = _scan_lm_eval_names()
    if task in _TASK_NAMES:
        return True
    try:  # authoritative, slow: only for a name the scan did not find
        from lm_eval.tasks import TaskManager

        return task in set(TaskManager().all_tasks)
    except ImportError:
        return False


def check_logger(log: Mapping[str, Any]) -> None:
    check_node("logger", log, LoggerSchema, extra_keys=True)
    if log["kind"] == "wandb":
        check_node("logger", log, WandbSchema)


def check_model(model: Mapping[str, Any]) -> None:
    check_node("model", model, ModelSchema)
    need = {"offline": "asset", "hub": "pretrained", "tiny_random": "config"}[model["source"]]
    if model.get(need) is None:
        raise ConfigError(f"model.{need}", None, problem=f"required for model.source={model['source']}",
                          allowed=", ".join(MODEL_ASSETS) if need == "asset" else "a value")


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

def _class_of(group: str, node: Mapping[str, Any]) -> Any:
    target = node.get("_target_") if isinstance(node, Mapping) else None
    if not isinstance(target, str) or not target:
        raise ConfigError(f"{group}._target_", target, f"a class path (see conf/{group}/*.yaml)", problem="missing")
    try:
        from hydra.utils import get_object

        return get_object(target)
    except Exception as err:  # noqa: BLE001
        cause = err.__cause__ or err
        raise ConfigError(f"{group}._target_", target, f"an importable class (see conf/{group}/*.yaml)",
                          problem=f"cannot be imported ({brief(cause, 160)})") from err


def check_component(group: str, node: Mapping[str, Any]) -> Any:
    """Check a metric/compensation node against its class's `__init__` (keys and annotated types) and build it;
    errors its constructor raises come back as ConfigError with the group prefix."""
    cls = _class_of(group, node)
    init = cls.__init__ if inspect.isclass(cls) else cls
    params = {n: p for n, p in inspect.signature(init).parameters.items() if n != "self"}
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # noqa: BLE001  (unresolvable annotations: check keys only)
        hints = {}
    named = [n for n, p in params.items() if p.kind not in (inspect.Parameter.VAR_KEYWORD,
                                                            inspect.Parameter.VAR_POSITIONAL)]
    for key, value in node.items():
        if key.startswith("_"):
            continue
        if key not in params and not open_kwargs:
            raise ConfigError(f"{group}.{key}", value, f"the options of {cls.__name__}: {', '.join(named)}",
                              problem="unknown key")
        if key in hints and (hints[key] in (bool, int, float, str) or _optional(hints[key])):
            check_value(f"{group}.{key}", value, hints[key])
    missing = [n for n in named if params[n].default is inspect.Parameter.empty and n not in node]
    if missing:
        raise ConfigError(f"{group}.{missing[0]}", problem=f"missing (required by {cls.__name__})", allowed="a value")
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


def meta_model(model_cfg: Mapping[str, Any], info: ModelInfo) -> Any:
    """The model's architecture on the meta device (no memory, no weights), for compatibility checks."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_cfg["source"] == "tiny_random":
        from gradmap.models import tiny_random_config

        config = tiny_random_config(**dict(model_cfg["config"]))
    else:
        config = AutoConfig.from_pretrained(info.path or model_cfg["pretrained"])
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# ------------------------------------------------------------------------------------------- validate

@dataclass
class Checked:
    """What validation established: the resolved config, the model facts and the objects it built."""

    config: dict[str, Any]
    info: ModelInfo
    num_prune: int
    device: str
    cache: Path
    save_dir: Path | None
    metric: Any = None
    compensation: Any = None
    notes: list[str] = field(default_factory=list)


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


GROUPS = ("model", "metric", "compensation", "calibration", "eval", "logger")


def validate(cfg: Any, run_dir: str | Path | None = None, build: bool = True) -> Checked:
    """Check the whole run config before anything is loaded; raise ConfigError on the first problem.

    `build=False` skips the checks that import torch/transformers (device, metric, compensation, meta model).
    """
    c = cfg if isinstance(cfg, dict) else resolve(cfg)
    for group in GROUPS:
        if not isinstance(c.get(group), Mapping):
            raise ConfigError(group, c.get(group), f"an option of conf/{group}/", problem="missing config group")
    top = [f.name for f in dataclasses.fields(TopLevelSchema)]
    check_node("", {k: c[k] for k in top if k in c}, TopLevelSchema)
    cache = check_cache_dir(c["cache_dir"])
    from gradmap.assets import cache_root

    caches = sorted({cache, cache_root(default=True).resolve(), cache_root(default=True)}, key=str)
    save_dir = None
    if c["save_dir"] is not None:
        save_dir = check_save_dir(c["save_dir"], c["save_overwrite"], caches,
                                  Path(run_dir).resolve() if run_dir is not None else None)
    check_model(c["model"])
    check_logger(c["logger"])
    check_calibration(c["calibration"], cache)
    check_eval(c["eval"], c["tuning"], cache)
    if c["model"]["source"] == "tiny_random" and c["eval"]["lm_eval"]["tasks"]:
        raise ConfigError("eval.lm_eval.tasks", c["eval"]["lm_eval"]["tasks"], "[] with model=tiny_random",
                          problem="lm-eval needs a real tokenizer; model=tiny_random's byte tokenizer only supports "
                                  "perplexity")
    info = model_info(c["model"], cache)
    n = num_to_prune(info.num_layers, c["prune_ratio"], c["num_prune"])
    check_lengths(c, info)
    dtype = c["dtype"] or c["model"]["dtype"]
    checked = Checked(c, info, n, c["device"], cache, save_dir)
    if not build:
        return checked
    checked.device = check_device(c["device"], dtype, c["model"].get("device_map"))
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

        meta = meta_model(c["model"], info)
        try:
            check(meta, [])
        except IncompatibleCompensationError as err:
            raise err.relabel(key="compensation", value=c["compensation"].get("_target_"))
        tokens = c["calibration"]["num_samples"] * c["calibration"]["seq_len"]
        try:
            getattr(checked.compensation, "check_calibration", lambda *_: None)(meta, tokens)
        except ConfigError as err:
            raise err.relabel(prefix="compensation")
    return checked
