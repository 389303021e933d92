"""Which classes a config may build: the `_target_`s of the project's own YAMLs (the Hydra group is the registry),
plus classes a user registers on purpose. A `_target_` is checked against this list as a string, before it is
imported, so a config can never make the run import or call anything else (`metric._target_=builtins.open`).

Registering a class of your own (a metric or compensation outside this repository):

* a `gradmap.plugins` entry point of an installed package, named `<group>.<anything>` with the class as value
  (`[project.entry-points."gradmap.plugins"]` / `"metric.my_metric" = "my_pkg.metrics:MyMetric"`), or
* `GRADMAP_ALLOW_TARGETS=my_pkg.metrics.MyMetric,...` in the environment, for one shell or job script.

Standard library only (validation stays fast).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf"
ALLOW_ENV = "GRADMAP_ALLOW_TARGETS"
ENTRY_POINT_GROUP = "gradmap.plugins"
_TARGET_LINE = re.compile(r"^_target_:\s*['\"]?([A-Za-z_][\w.]*)['\"]?\s*(#.*)?$", re.MULTILINE)


@lru_cache(maxsize=None)
def shipped_targets(group: str) -> tuple[str, ...]:
    """The `_target_` of every `conf/<group>/*.yaml` (top-level line), sorted."""
    found = set()
    for path in sorted((CONF / group).glob("*.yaml")):
        found.update(m.group(1) for m in _TARGET_LINE.finditer(path.read_text()))
    return tuple(sorted(found))


# Classes that moved (issue #19: GradMAP and the baselines into `methods/`), old path -> new path. Records written
# before the move are read with the new paths (`gradmap.record`), so finished jobs still count as done; cache keys
# hash the old paths (`gradmap.cache`), so selections computed before the move are still found.
MOVED_TARGETS = {
    "gradmap.gradmap_metric.GradMAPMetric": "methods.gradmap.metric.GradMAPMetric",
    "gradmap.gradmap_verify.GradMAPVerify": "methods.gradmap.verify.GradMAPVerify",
    "gradmap.projection.ProjectionCompensation": "methods.gradmap.projection.ProjectionCompensation",
    **{f"baselines.{module}.{cls}": f"methods.baselines.{module}.{cls}" for module, cls in (
        ("angular", "AngularSpan"), ("bi", "BlockInfluence"), ("ppl", "PerplexityDrop"),
        ("prune_and_comp", "PruneAndComp"), ("random_metric", "RandomMetric"), ("replaceme", "ReplaceMe"),
        ("sleb", "SLEB"), ("streamline", "StreamlineSpan"), ("streamline_comp", "StreamlineTraining"),
        ("taylor", "BlockTaylor"))},
}
KEY_TARGETS = {new: old for old, new in MOVED_TARGETS.items()}


def _normal(target: str) -> str:
    return target.strip().replace(":", ".")


def plugin_targets(group: str) -> tuple[str, ...]:
    """Classes registered for `group` as `gradmap.plugins` entry points (`<group>.<name> = module:Class`)."""
    try:
        from importlib.metadata import entry_points

        eps = entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # noqa: BLE001  (broken package metadata must not break a run)
        return ()
    return tuple(sorted(_normal(ep.value) for ep in eps if ep.name.split(".", 1)[0] == group))


def env_targets() -> tuple[str, ...]:
    return tuple(_normal(t) for t in os.environ.get(ALLOW_ENV, "").split(",") if t.strip())


def allowed_targets(group: str) -> tuple[str, ...]:
    """Every class path a node of `group` may name: shipped, then registered (entry points, environment)."""
    out = list(shipped_targets(group))
    out += [t for t in plugin_targets(group) + env_targets() if t not in out]
    return tuple(out)


def is_allowed(group: str, target: object) -> bool:
    return isinstance(target, str) and _normal(target) in allowed_targets(group)
