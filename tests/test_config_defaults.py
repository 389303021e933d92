"""One source of defaults, one schema mechanism. Every option of every config group (metrics and compensations
included) is built through its YAML's `_target_`, a dataclass whose fields are declared with `option()`; the YAML's
keys are exactly the class's option fields (conf/ mirrors the code one to one); no option field has a default in
code (only a field a class fixes, `init=False`, which is no key), so the YAML is the only copy of every value; and
the built object holds the resolved values, so what runs is what the config says."""

from __future__ import annotations

import dataclasses
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


def test_every_group_has_options():
    assert {g for g, _ in OPTIONS} == set(GROUPS) and len(OPTIONS) >= 30


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_yaml_keys_are_the_class_option_fields_and_the_code_holds_no_default(group, option):
    node = resolved(group, option)
    cls = get_object(node["_target_"])
    assert isinstance(cls, type) and "__dataclass_fields__" in vars(cls), f"{cls} is not itself a dataclass"
    keys = {k for k in node if not k.startswith("_")}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    assert keys == set(fields), f"conf/{group}/{option}.yaml keys vs {cls.__name__}: {sorted(keys ^ set(fields))}"
    with_default = [f.name for f in fields.values()
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
    assert not with_default, f"{cls.__name__} has defaults in code for {with_default} (conf/{group}/{option}.yaml " \
                             f"is their only place)"


@pytest.mark.parametrize("group", ["metric", "compensation"])
def test_a_field_a_class_fixes_is_no_option(group):
    """Fixed fields (`init=False`: e.g. span metrics are never iterative, ReplaceMe's sites) are not YAML keys and
    are refused as config keys; the base classes check every option when built in Python, too."""
    from gradmap.errors import ConfigError
    from gradmap.validation import check_component

    fixed = 0
    for path in sorted((CONF / group).glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path))
        for f in dataclasses.fields(get_object(node["_target_"])):
            if not f.init:
                fixed += 1
                assert f.name not in node, (path.name, f.name)
                with pytest.raises(ConfigError, match=rf"^{group}\.{f.name}=.*unknown key"):
                    check_component(group, {**node, f.name: getattr(instantiate(node), f.name)}, build=False)
    assert fixed


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_the_built_object_holds_the_resolved_values(group, option):
    node = resolved(group, option)
    built = instantiate(node, _convert_="all")
    for key, value in node.items():
        if not key.startswith("_"):
            assert plain(getattr(built, key)) == value, f"{group}={option}: {key}"


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
