"""Config schemas: the allowed values of config keys, and the strict value checks.

A config class (the `_target_` of any `conf/<group>` YAML: model, calibration, eval, logger, metric, compensation) is
a dataclass whose fields are declared with `option(...)`: the field's type annotation and metadata (ranges, choices)
are what `gradmap.validation` checks before anything is loaded (`check_node`), and a field has no default, so the
YAML is the only place its value comes from. A field a subclass fixes (`field(default=..., init=False)`) is no
config key. Metric and compensation classes also check themselves when built (`check_fields` in their base class's
`__post_init__`), so an object built in Python is checked as one built from a config. Standard library only, so
validation stays fast and never imports torch; which offline assets are models and corpora comes from the asset
registry (`gradmap.assets.registry`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, Union

from gradmap.assets.registry import HELDOUT_ASSETS
from gradmap.errors import ConfigError

# --------------------------------------------------------------------------------------- allowed values

# dtype names accepted by `dtype` and `model.dtype` -> the torch dtype's name.
DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                 "float16": "float16", "fp16": "float16"}
HUB_DATASETS = ("wikitext2", "c4")
# Held-out corpora and the splits each may be evaluated on: the offline assets that hold held-out text (the asset
# registry, `gradmap.assets.registry.HELDOUT_ASSETS`: files <split>.jsonl, read from the asset of that name unless
# `path` is given), wikitext2 (the hub dataset) and jsonl (any file given as `path`: tests, your own text).
OFFLINE_CORPORA = tuple(HELDOUT_ASSETS)
HELDOUT_CORPORA = {**HELDOUT_ASSETS, "wikitext2": ("validation", "test"), "jsonl": ("validation", "test")}
TEST_SPLIT = "test"
WANDB_MODES = ("online", "offline", "disabled")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICES_ALLOWED = "auto, cpu, cuda, cuda:N, mps"
TASKS_DIR = Path(__file__).parent / "tasks"  # lm-eval task templates shipped with gradmap
# Config attributes that hold the layer count and the maximum positions, by architecture family.
LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layer", "num_layers")
MAX_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx")


def option(**meta: Any) -> Any:
    """A dataclass field without a default, whose metadata says what is allowed: `gt`, `ge`, `lt`, `le`,
    `choices`, `allowed` (the words shown), `items` (metadata of list items), `schema` (a dataclass the value, a
    mapping, is checked against; `extra_keys`: it may have further keys; a field typed with a dataclass is checked
    against it anyway), `values` (a dataclass every value of a mapping is checked against), `absent_ok` (the key may
    be left out of a config node; only for optional keys of nested nodes, never for a class's fields)."""
    return field(metadata=meta)


# --------------------------------------------------------------------------------------- value checks

def _describe(tp: Any, meta: Mapping[str, Any]) -> str:
    """What a schema field allows, in words."""
    if "allowed" in meta:
        return meta["allowed"]
    if "choices" in meta:
        return ", ".join(str(c) for c in meta["choices"]) + (" or null" if is_optional(tp) else "")
    base = _strip_optional(tp)
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(base)
    if words is None:
        origin = typing.get_origin(base)
        if origin in (list, tuple):
            (inner,) = typing.get_args(base)[:1] or (Any,)
            words = f"a list of {_describe(inner, {}).removeprefix('a ').removeprefix('an ')}s"
        elif origin in (dict, Mapping) or base in (dict, Mapping) or dataclasses.is_dataclass(base):
            words = "a mapping"
        else:
            words = "any value"
    bounds = []
    for op, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if op in meta:
            bounds.append(f"{sym} {meta[op]}")
    if bounds:
        words += " " + " and ".join(bounds)
    if is_optional(tp):
        words += " or null"
    return words


def is_optional(tp: Any) -> bool:
    """`Optional[X]`, `Union[X, None]` or `X | None` (a `types.UnionType`, which `typing.Union` is not on 3.11)."""
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _strip_optional(tp: Any) -> Any:
    if is_optional(tp):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else Union[tuple(rest)]
    return tp


def check_value(key: str, value: Any, tp: Any, meta: Mapping[str, Any] | None = None) -> Any:
    """Check one value against a type (bool, int, float, str, list[...], dict, a schema dataclass, Any,
    Optional[...]) and the metadata `gt`, `ge`, `lt`, `le`, `choices`; raise ConfigError naming the key, the value
    and what is allowed. A schema dataclass is checked to be a mapping only (its keys: `check_node`).

    Strict: an integer key refuses 2.5 (and 2.0), a boolean key refuses "yes" and 1, a number refuses true.
    """
    meta = meta or {}
    allowed = _describe(tp, meta)
    if value is None:
        if is_optional(tp) or tp is Any:
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
    elif origin in (dict, Mapping) or base in (dict, Mapping) or dataclasses.is_dataclass(base):
        if not isinstance(value, Mapping) and not isinstance(value, base if dataclasses.is_dataclass(base) else ()):
            raise ConfigError(key, value, allowed, problem="not a mapping")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(key, value, allowed)
    for op, test in (("gt", lambda v, b: v > b), ("ge", lambda v, b: v >= b), ("lt", lambda v, b: v < b),
                     ("le", lambda v, b: v <= b)):
        if op in meta and isinstance(value, (int, float)) and not test(value, meta[op]):
            raise ConfigError(key, value, allowed, problem="out of range")
    return value


def check_node(prefix: str, node: Any, schema: type, extra_keys: bool = False) -> dict[str, Any]:
    """Check a config node (a mapping) against a schema dataclass: unknown keys (unless `extra_keys`; keys starting
    with `_`, such as `_target_`, are Hydra's), missing keys (unless the field's metadata says `absent_ok`), and
    every value's type and range. Returns the node's fields (without Hydra's keys)."""
    if not isinstance(node, Mapping):
        keys = ", ".join(f.name for f in dataclasses.fields(schema) if f.init)
        raise ConfigError(prefix, node, f"a mapping with the keys {keys}")
    hints = _hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}  # init=False: fixed by the class, no key
    if not extra_keys:
        for key in node:
            if key not in fields and not str(key).startswith("_"):
                raise ConfigError(_join(prefix, key), node[key], ", ".join(fields), problem="unknown key")
    for name, f in fields.items():
        key = _join(prefix, name)
        if name not in node:
            if f.metadata.get("absent_ok"):
                continue
            raise ConfigError(key, problem="missing", allowed=_describe(hints[name], f.metadata))
        value = node[name]
        check_value(key, value, hints[name], f.metadata)
        nested = _strip_optional(hints[name])
        if isinstance(value, Mapping) and (dataclasses.is_dataclass(nested) or "schema" in f.metadata):
            check_node(key, value, f.metadata.get("schema", nested), extra_keys=f.metadata.get("extra_keys", False))
        if isinstance(value, Mapping) and "values" in f.metadata:
            for k, v in value.items():
                check_node(_join(key, k), v, f.metadata["values"])
    return {k: v for k, v in node.items() if not str(k).startswith("_")}


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check the option fields (`init=True`) of a built config object as `check_node` checks a config node: each
    value's type, range and choices (`check_value` with the field's metadata); ConfigError with the key
    `prefix.field` (the bare field name without a prefix: validation adds the group)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.init:
            check_value(_join(prefix, f.name), getattr(obj, f.name), hints[f.name], f.metadata)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)
