"""The pure checks of gradmap.validation: strict types, the error's one line, schemas vs the shipped configs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gradmap.cache import CacheEntryError, check_selection_entry
from gradmap.evaluation import Evaluation
from gradmap.schema import check_fields, option
from gradmap.targets import shipped_targets
from gradmap.validation import (
    ConfigError,
    brief,
    build_group,
    check_component,
    check_save_dir,
    check_value,
    lm_eval_task_known,
    num_to_prune,
    validate,
)
from methods.gradmap.projection import ProjectionCompensation

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("value,tp,ok", [
    (2, int, True), (2.0, int, False), (2.5, int, False), (True, int, False), ("2", int, False),
    (True, bool, True), (1, bool, False), ("yes", bool, False),
    (1, float, True), (0.5, float, True), (True, float, False), (float("nan"), float, False), ("x", float, False),
    (None, Optional[int], True), (None, int, False), ([2, 3], list[int], True), ([2, 3.5], list[int], False),
    ("a", str, True), (3, str, False),
])
def test_check_value_is_strict(value, tp, ok):
    if ok:
        assert check_value("k", value, tp) == value
    else:
        with pytest.raises(ConfigError, match=r"^k(\[1\])?="):
            check_value("k", value, tp)


def test_ranges_and_choices_say_what_is_allowed():
    with pytest.raises(ConfigError, match=r"^x=0: out of range; allowed: an integer >= 1$"):
        check_value("x", 0, int, {"ge": 1})
    with pytest.raises(ConfigError, match=r"^x='c' is not valid; allowed: a, b$"):
        check_value("x", "c", str, {"choices": ("a", "b")})


def test_config_error_is_one_line_with_key_value_allowed():
    err = ConfigError("reduction", "foo", ["a", "b"], problem="not valid\nfor this target", hint="see the README")
    assert str(err) == "reduction='foo': not valid for this target; allowed: a, b; see the README"
    err.relabel(prefix="metric")
    assert str(err).startswith("metric.reduction='foo'") and err.as_dict()["key"] == "metric.reduction"
    assert isinstance(err, ValueError)
    assert brief(OSError("first sentence. " + "x" * 300), 40) == "OSError: first sentence."
    assert brief(OSError("y" * 300), 40) == "OSError: " + "y" * 37 + "..."


def test_num_to_prune():
    assert num_to_prune(30, 0.25, None) == 8 and num_to_prune(30, None, 3) == 3
    with pytest.raises(ConfigError, match="^prune_ratio=None: neither"):
        num_to_prune(30, None, None)
    with pytest.raises(ConfigError, match=r"^prune_ratio=0.99: removing 30 of 30 layers"):
        num_to_prune(30, 0.99, None)


@pytest.mark.parametrize("group", ["metric", "compensation"])
def test_every_shipped_metric_and_compensation_matches_its_class(group):
    """Each YAML's keys are the option fields of its class, with their types and ranges (what validation checks)."""
    for path in sorted((CONF / group).glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path))
        assert check_component(group, node) is not None, path.name


@dataclass(eq=False)
class OptionalKnobs:
    """A user component whose option fields annotate optional values both ways (`X | None` and Optional[X])."""

    width: int | None = option(ge=1)
    name: Optional[str] = option()

    def __post_init__(self) -> None:
        check_fields(self)


class PlainKnobs:
    """A user component whose options are constructor parameters, not dataclass fields."""

    def __init__(self, width: int = 1):
        self.width = width


class Subclassed(ProjectionCompensation):
    """A subclass of a dataclass that takes its options in its own __init__: not itself a dataclass."""

    def __init__(self, width: int = 1):
        super().__init__(sites="largest", top_k=1, shift="mean", alpha=0.0, guard="none", post_norm="refuse")


@pytest.mark.parametrize("key, value, ok", [("width", 3, True), ("width", None, True), ("name", "a", True),
                                            ("width", "wide", False), ("width", 2.5, False), ("name", 4, False)])
def test_component_optional_annotations_are_checked(key, value, ok, monkeypatch):
    monkeypatch.setenv("GRADMAP_ALLOW_TARGETS", f"{__name__}.OptionalKnobs")  # a user's class, registered
    node = {"_target_": f"{__name__}.OptionalKnobs", "width": None, "name": None, key: value}
    if ok:
        assert getattr(check_component("metric", node), key) == value
    else:
        with pytest.raises(ConfigError, match=rf"^metric\.{key}="):
            check_component("metric", node)


def test_a_component_declares_its_options_as_dataclass_fields(monkeypatch):
    """One schema mechanism: a class that is not itself a dataclass of option() fields is refused in one line (a
    subclass of a shipped dataclass with its own __init__ too), never introspected."""
    monkeypatch.setenv("GRADMAP_ALLOW_TARGETS", f"{__name__}.PlainKnobs,{__name__}.Subclassed")
    for name in ("PlainKnobs", "Subclassed"):
        with pytest.raises(ConfigError, match=rf"^compensation._target_='{__name__}.{name}': {name} does not "
                                              r"declare its options as dataclass fields; allowed: .*option"):
            check_component("compensation", {"_target_": f"{__name__}.{name}", "width": 1})


def test_an_object_built_in_python_is_checked_as_a_config_node():
    """The base classes' __post_init__ check every option (`check_fields`) as validation checks the node: same key,
    value and allowed values, relative to the group."""
    from tests.tiny_models import method

    for yaml, key, value, line in [
            ("metric/gradmap", "protect_first", -1, "protect_first=-1: out of range; allowed: an integer >= 0"),
            ("metric/bi", "iterative", "yes", "iterative='yes': not a boolean; allowed: true or false"),
            ("metric/taylor", "parameters", "some", "parameters='some' is not valid; allowed: weights, all"),
            ("compensation/projection", "top_k", 1.5, "top_k=1.5: not an integer (a fraction); allowed: an integer "
                                                      ">= 1"),
            ("compensation/streamline_ffn", "lr", 0, "lr=0: out of range; allowed: a number > 0")]:
        with pytest.raises(ConfigError) as err:
            method(yaml, **{key: value})
        assert str(err.value) == line
        group = yaml.split("/")[0]
        node = {**OmegaConf.to_container(OmegaConf.load(CONF / f"{yaml}.yaml")), key: value}
        with pytest.raises(ConfigError) as err:
            check_component(group, node, build=False)
        assert str(err.value) == f"{group}.{line}"
    assert OptionalKnobs(width=None, name="a").width is None
    with pytest.raises(ConfigError, match=r"^width=0: out of range"):
        OptionalKnobs(width=0, name=None)


def test_every_model_calibration_eval_and_logger_option_builds_its_config_class(tmp_path):
    """Each shipped option composes into a config whose plain groups build their `_target_` config class through the
    schema checks (assets aside)."""
    text = Path(__file__).parent / "data" / "tiny_text.jsonl"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        base = ["model=tiny_random", "calibration=tiny", "eval=tiny", "logger=none", f"calibration.path={text}",
                f"eval.heldout.texts.tiny.path={text}", f"cache_dir={tmp_path}"]
        assert validate(compose("config", overrides=base), build=False).num_prune == 2
        for group in ("model", "logger"):
            for path in sorted((CONF / group).glob("*.yaml")):
                built = build_group(group, OmegaConf.to_container(OmegaConf.load(path)))
                assert f"{type(built).__module__}.{type(built).__name__}" in shipped_targets(group), path.name
        for option in ("hub", "wiki_offline", "tiny"):
            path = [f"calibration.path={text}"] if option == "tiny" else []
            cfg = compose("config", overrides=[f"calibration={option}", *path])
            built = build_group("calibration", OmegaConf.to_container(cfg.calibration, resolve=True))
            assert f"{type(built).__module__}.{type(built).__name__}" in shipped_targets("calibration"), option
        for option in ("offline", "validation", "zeroshot7", "tiny"):
            path = [f"eval.heldout.texts.tiny.path={text}"] if option == "tiny" else []
            cfg = compose("config", overrides=[f"eval={option}", *path])
            assert isinstance(build_group("eval", OmegaConf.to_container(cfg.eval, resolve=True)), Evaluation)


def test_a_group_builds_only_its_own_classes():
    with pytest.raises(ConfigError, match=r"^calibration._target_='gradmap.models.HubModel': not a calibration class"):
        build_group("calibration", {"_target_": "gradmap.models.HubModel", "pretrained": "x", "dtype": "float32",
                                    "device_map": None, "attn_implementation": None})
    with pytest.raises(ConfigError, match=r"^model.dtype: missing"):
        build_group("model", {"_target_": "gradmap.models.OfflineModel", "asset": "smollm2_135m", "device_map": None})
    with pytest.raises(ConfigError, match=r"^model.config.num_layers=1: out of range"):
        build_group("model", {"_target_": "gradmap.models.TinyRandomModel", "dtype": "float32", "device_map": None,
                              "config": {"num_layers": 1, "hidden_size": 8, "intermediate_size": 8, "vocab_size": 8,
                                         "max_position_embeddings": 8, "seed": 0, "rope_theta": 1.0}})


def test_lm_eval_task_names():
    for task in ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"):
        assert lm_eval_task_known(task), task  # the zeroshot7 tasks, found by the fast scan


def test_save_dir_checks(tmp_path):
    cache = tmp_path / "cache"
    assert check_save_dir(str(tmp_path / "new" / "model"), False, [cache], None) == tmp_path / "new" / "model"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="gradmap did not write"):  # overwrite replaces only its own checkpoints
        check_save_dir(str(tmp_path / "full"), True, [cache], None)
    (tmp_path / "full" / "pruning_info.json").write_text("{}")
    assert check_save_dir(str(tmp_path / "full"), True, [cache], None) == tmp_path / "full"
    for bad, overwrite, match in ((cache / "m", False, "inside the asset cache"), (tmp_path, False, "contains"),
                                  (tmp_path / "full", False, "non-empty"), (tmp_path / "full" / "x", False, "file")):
        with pytest.raises(ConfigError, match=match):
            check_save_dir(str(bad), overwrite, [cache], None)
    with pytest.raises(ConfigError, match="run folder"):
        check_save_dir(str(tmp_path / "runs"), True, [cache], tmp_path / "runs" / "job")


def test_selection_entry_shape():
    decision = {"step": 0, "scores": [0.1, 0.2, 0.3], "removed": [0], "seconds": 0.0, "score_seconds": 0.0,
                "forward_tokens": 0, "backward_tokens": 0}
    good = {"selections": {"1": {"removed": [0], "removal_order": [0], "decisions": [decision]}}}
    assert check_selection_entry(good, 3)[1].removed == [0]
    for bad in ({"selections": []}, {"selections": {"x": good["selections"]["1"]}},
                {"selections": {"2": good["selections"]["1"]}},
                {"selections": {"1": {**good["selections"]["1"],
                                      "decisions": [{**decision, "scores": [0.1, True, 0]}]}}},
                {"selections": {"1": {**good["selections"]["1"], "decisions": [{**decision, "step": "0"}]}}}):
        with pytest.raises(CacheEntryError):
            check_selection_entry(bad, 3)
    with pytest.raises(CacheEntryError, match="3 layers, the model has 4"):
        check_selection_entry(good, 4)
