"""The command line's overrides, checked where Hydra is lenient: a key given twice (the last would win without a
word), an experiment that does not exist (`optional experiment` would run the defaults instead), a value Hydra's
lexer cannot read (said with the override and a quoting hint), and sweep job folders that must stay inside the
sweep folder whatever the values (`safe_dirname`). Standard library only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from gradmap.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
MAX_DIRNAME = 240  # bytes; most file systems allow 255 per name (the job number and "_" come first)


def override_key(override: str) -> str:
    """`metric=bi` -> metric, `+a.b=1` -> a.b, `~seed` -> seed, `++x=1` -> x."""
    return override.split("=", 1)[0].lstrip("~+").strip()


def check_duplicates(overrides: list[str]) -> None:
    """The same key twice on one command line is refused (`metric=bi metric=gradmap` ran gradmap without a word)."""
    seen: dict[str, str] = {}
    for override in overrides:
        key = override_key(override)
        if key in seen:
            raise ConfigError(key, problem=f"given twice ({seen[key]!r} and {override!r})",
                              allowed="each key once per command line")
        seen[key] = override


def experiment_options() -> list[str]:
    """The experiments Hydra can compose (its search path, when a Hydra app is running), else conf/experiment."""
    try:
        from hydra.core.global_hydra import GlobalHydra

        if GlobalHydra.instance().is_initialized():
            return sorted(GlobalHydra.instance().config_loader().get_group_options("experiment"))
    except Exception:  # noqa: BLE001  (Hydra's internals: fall back to the shipped folder)
        pass
    return sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def check_experiment(name: str | None) -> None:
    if name is None:
        return
    options = experiment_options()
    if name not in options:
        raise ConfigError("experiment", name, options, problem="no such experiment (conf/experiment/)")


def check_overrides(overrides: list[str] | None, choices: dict[str, str | None]) -> None:
    check_duplicates(list(overrides or []))
    check_experiment(choices.get("experiment"))


def bad_override(overrides: list[str]) -> str | None:
    """The first override Hydra's grammar cannot parse (None if each parses on its own)."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import OverrideParseException
    except ImportError:
        return None
    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException:
            return override
        except Exception:  # noqa: BLE001
            continue
    return None


def lexer_error_line(overrides: list[str]) -> str | None:
    """One line for an override Hydra cannot parse: which one, and how to quote it."""
    bad = bad_override(overrides)
    if bad is None:
        return None
    key, sep, value = bad.partition("=")
    odd = sorted({c for c in value if not (c.isascii() and c.isprintable())})
    what = f" (it holds {', '.join(f'U+{ord(c):04X}' for c in odd)})" if odd else ""
    quoted = f"{key}{sep}'{value}'" if sep else f"'{bad}'"
    return (f"{key or bad}: the override {bad!r} cannot be parsed by Hydra{what}; allowed: a value Hydra's grammar "
            f"reads; quote the value, e.g. \"{quoted}\" on the command line, or retype it in plain ASCII")


def safe_dirname(text: str) -> str:
    """A sweep job's folder name from its overrides: one path component (no `/`, never `.` or `..`), short enough
    for any file system, so every job folder stays inside the sweep folder whatever the values."""
    name = str(text).replace("/", "%2F").replace("\\", "%5C").replace("\0", "")
    if name in ("", ".", ".."):
        name = name.replace(".", "%2E") or "_"
    data = name.encode()
    if len(data) > MAX_DIRNAME:  # keep both ends readable (overrides are sorted: the last ones are often the axes)
        digest = hashlib.sha256(data).hexdigest()[:12]
        keep = (MAX_DIRNAME - len(digest) - 2) // 2
        name = (data[:keep].decode(errors="ignore") + "-" + digest + "-" + data[-keep:].decode(errors="ignore"))
    return name
