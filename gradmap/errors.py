"""The one error type of a refused run, `ConfigError`, and the helpers that keep every error message to one line.

Standard library only: every module may raise it (metrics, compensations, data, validation) without importing the
others, and a run refused at validation never imports torch.
"""

from __future__ import annotations

import json
from typing import Any

UNSET: Any = object()  # "no value given" (None is a value a key can have)
# Metric keys that change how much memory a backward needs, never its result (gradmap/lm_loss.py, issue 17), with the
# value that reproduces the code before them: finished jobs and cached selections compare and hash as that value.
MEMORY_ONLY_METRIC_KEYS = {"gradient_checkpointing": False, "loss_chunk_tokens": None}
# The memory knobs a user can turn when a run is out of memory (gradmap.oom, gradmap.jobs).
OOM_HINT = ("set metric.gradient_checkpointing=true, lower calibration.batch_size (or calibration.seq_len) and "
            "eval.perplexity.batch_size, or use a larger device")


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

    def __init__(self, key: str, value: Any = UNSET, allowed: Any = None, problem: str | None = None,
                 hint: str | None = None):
        self.key, self.value, self.allowed, self.problem, self.hint = key, value, allowed, problem, hint
        super().__init__(self.line())

    def line(self) -> str:
        text = self.key if self.value is UNSET else f"{self.key}={_show(self.value)}"
        if self.problem:
            text += f": {self.problem}"
        elif self.value is not UNSET:
            text += " is not valid"
        if self.allowed is not None:
            allowed = self.allowed
            if isinstance(allowed, (list, tuple)):
                allowed = ", ".join(str(a) for a in allowed)
            text += f"; allowed: {allowed}"
        if self.hint:
            text += f"; {self.hint}"
        return one_line(text)

    def relabel(self, prefix: str | None = None, key: str | None = None, value: Any = UNSET) -> ConfigError:
        """Give the key its group prefix (or replace it, and the value); in place, returns self."""
        if key is not None:
            self.key = key
        elif prefix and not self.key.startswith(f"{prefix}.") and self.key != prefix:
            self.key = f"{prefix}.{self.key}"
        if value is not UNSET:
            self.value = value
        self.args = (self.line(),)
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "value": None if self.value is UNSET else self.value,
                "allowed": self.allowed if not isinstance(self.allowed, tuple) else list(self.allowed),
                "problem": self.problem, "hint": self.hint}
