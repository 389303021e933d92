"""One source of defaults. Every option of every config group is built through its YAML's `_target_`; the YAML's
keys are exactly the class's parameters (conf/ mirrors the code one to one); a parameter with a default has the
YAML's value (constructors have no defaults or the YAML's; a class shared by two YAMLs leaves the parameter they
differ in without one); and the built object holds the resolved values, so what runs is what the config says."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

import run  # noqa: F401  (registers the `split` resolver)
from gradmap.selection import SelectionKind
from gradmap.validation import GROUPS, TopLevelSchema

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TEXT = ROOT / "tests" / "data" / "tiny_text.jsonl"
# Overrides an option needs to resolve outside a run (interpolations of the run's own folder).
NEEDS = {("calibration", "tiny"): [f"calibration.path={TEXT}"],
         ("eval", "tiny"): [f"eval.heldout.texts.tiny.path={TEXT}"]}
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]


def resolved(group: str, option: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"{group}={option}", *NEEDS.get((group, option), [])])
    return OmegaConf.to_container(cfg[group], resolve=True)


def plain(value):
    """Config objects as the mappings they were built from."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def parameters(cls) -> dict[str, inspect.Parameter]:
    init = cls.__init__ if inspect.isclass(cls) else cls
    return {n: p for n, p in inspect.signature(init).parameters.items() if n != "self"
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}


def test_every_group_has_options():
    assert {g for g, _ in OPTIONS} == set(GROUPS) and len(OPTIONS) >= 30


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_yaml_keys_are_the_class_parameters_and_its_defaults_are_the_yaml_values(group, option):
    node = resolved(group, option)
    cls = get_object(node["_target_"])
    keys = {k for k in node if not k.startswith("_")}
    params = parameters(cls)
    assert keys == set(params), f"conf/{group}/{option}.yaml keys vs {cls.__name__}: {sorted(keys ^ set(params))}"
    for name, param in params.items():
        if param.default is not inspect.Parameter.empty:
            assert param.default == node[name], (f"{cls.__name__}({name}={param.default!r}) but conf/{group}/"
                                                 f"{option}.yaml says {node[name]!r}")
    if dataclasses.is_dataclass(cls):  # the config classes of the plain groups have no defaults at all
        assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   for f in dataclasses.fields(cls)), cls.__name__


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_the_built_object_holds_the_resolved_values(group, option):
    node = resolved(group, option)
    built = instantiate(node, _convert_="all")
    for key, value in node.items():
        if not key.startswith("_"):
            assert plain(getattr(built, key)) == value, f"{group}={option}: {key}"


def test_classes_shared_by_two_yamls_leave_their_difference_without_a_default():
    by_class: dict[str, list[dict]] = {}
    for group, option in OPTIONS:
        node = resolved(group, option)
        by_class.setdefault(node["_target_"], []).append(node)
    shared = {target: nodes for target, nodes in by_class.items() if len(nodes) > 1}
    assert "methods.baselines.taylor.BlockTaylor" in shared
    assert "methods.baselines.streamline_comp.StreamlineTraining" in shared
    for target, nodes in shared.items():
        params = parameters(get_object(target))
        differ = {k for k in params if len({repr(n.get(k)) for n in nodes}) > 1}
        assert all(params[k].default is inspect.Parameter.empty for k in differ), (target, differ)


def test_top_level_keys_are_the_schema():
    top = OmegaConf.load(CONF / "config.yaml")
    keys = {k for k in top if k not in ("defaults", "hydra")}
    assert keys == {f.name for f in dataclasses.fields(TopLevelSchema)}


def test_every_metric_declares_its_selection_kind():
    """The selection kind (what the cache and `select` both read) is declared, not guessed: a metric class that
    chooses with its own `select` declares its kind as a class attribute; the others are one-shot or greedy as their
    `iterative` option says."""
    import inspect

    from hydra.utils import instantiate

    from gradmap.metric import LayerMetric

    for path in sorted((CONF / "metric").glob("*.yaml")):
        node = OmegaConf.load(path)
        cls = get_object(node["_target_"])
        metric = instantiate(node)
        assert isinstance(metric.selection_kind, SelectionKind), path.name
        if cls.select is not LayerMetric.select:
            assert isinstance(inspect.getattr_static(cls, "selection_kind"), SelectionKind), \
                f"{cls.__name__} ({path.name}) has its own select but does not declare `selection_kind`"
        else:
            assert metric.selection_kind is (SelectionKind.GREEDY if metric.iterative else SelectionKind.ONE_SHOT)
