"""lm-eval task files: the templates shipped with gradmap (`gradmap/tasks/`) and the task names lm-eval knows.

Standard library only (lm-eval is imported only for a name the fast scan does not find), so validation can check
task names before anything heavy is loaded.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from pathlib import Path

from gradmap.schema import TASKS_DIR

DATA_PLACEHOLDER = "__DATA_FILE__"
_TASK_LINE = re.compile(r"^task:\s*([^\s#]+)", re.M)
_TOP_KEY = re.compile(r"^(task|group|tag):[ \t]*([^#\n]*)", re.M)
_NESTED_TASK = re.compile(r"^[ \t]+-?[ \t]*task:[ \t]*([^\s#\[]+)", re.M)


def template_path(template_name: str) -> Path:
    """`gradmap/tasks/<template_name>` (`.yaml` added when the name has no YAML suffix); may not exist."""
    name = template_name if template_name.endswith((".yaml", ".yml")) else f"{template_name}.yaml"
    return TASKS_DIR / name


def shipped_templates() -> list[str]:
    return sorted(p.name for p in TASKS_DIR.glob("*.yaml"))


def task_name(path: Path) -> str | None:
    """The `task:` a task YAML defines (a text scan: lm-eval's `!function` tags are not plain YAML)."""
    match = _TASK_LINE.search(Path(path).read_text())
    return match.group(1).strip("'\"") if match else None


def materialize_local_task(template_name: str, data_file: str | Path, out_dir: str | Path) -> Path:
    """Write task template `gradmap/tasks/<template_name>` into `out_dir` with the absolute data path filled in.

    `out_dir` is then passed to lm-eval as `include_path`. Returns the written YAML.
    """
    template = template_path(template_name)
    if not template.is_file():
        raise ValueError(f"task template {template_name!r} not found in {TASKS_DIR}; allowed: {shipped_templates()}")
    data = Path(data_file).expanduser().resolve()
    if not data.is_file():
        raise FileNotFoundError(f"data file {str(data)!r} for task template {template.name!r} does not exist")
    text = template.read_text()
    if text.count(DATA_PLACEHOLDER) != 1:
        raise ValueError(f"task template {template} must contain the placeholder {DATA_PLACEHOLDER} exactly once "
                         f"(found {text.count(DATA_PLACEHOLDER)})")
    # A JSON string is a valid YAML scalar: quotes and escapes any path safely.
    text = text.replace(DATA_PLACEHOLDER, json.dumps(str(data)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / template.name
    target.write_text(text)
    return target


@functools.lru_cache(maxsize=1)
def scanned_lm_eval_names() -> frozenset[str]:
    """Task, group and tag names of lm-eval's built-in YAMLs by a plain text scan (under a second, against ~15 s
    for lm-eval's own index). It finds most names; a name it misses is looked up in lm-eval's index."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        return frozenset()
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
    return frozenset(names)


def lm_eval_task_known(task: str) -> bool:
    if task in scanned_lm_eval_names():
        return True
    try:  # authoritative, slow: only for a name the scan did not find
        from lm_eval.tasks import TaskManager

        return task in set(TaskManager().all_tasks)
    except ImportError:
        return False
