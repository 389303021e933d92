"""A last-word cloze (LAMBADA-style) built from the Wikipedia extract's held-out articles, as lm-eval JSONL.

Why: BIG-bench social_iqa does not separate pruned SmolLM2 models (every one within 1.5 standard errors of the
dense one); predicting the last word of a passage depends on the whole model, as perplexity does, but is scored as an
accuracy with lm-eval's standard error. Items come from the `validation` articles (choosing: the rule in
gradmap/tasks/wiki_cloze_validation.yaml) and from the `test` articles (tables), never from `calib`.

An item, per article in file order, paragraph by paragraph (lines of the cleaned text), sentence by sentence
(split after `.`, `!` or `?` followed by white space):
  - the target is the last word of a sentence that ends in `<word>.`, the word ASCII letters only, at least
    MIN_TARGET_CHARS long and not an abbreviation in ABBREVIATIONS (so no numbers, quotes, brackets or "etc.");
  - the context is the paragraph up to that word (earlier sentences of the paragraph + the sentence without its last
    word and period), cut from the left to the last CONTEXT_WORDS words, and at least MIN_CONTEXT_WORDS words long.
Items are shuffled once with CLOZE_SEED so that lm-eval's `limit=N` is a fixed random subset; `idx` is the position
before the shuffle.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gradmap.assets.fetch import build_from_member, log
from gradmap.assets.wiki import WIKI_BZ2, build_wiki

CLOZE_SEED = 1234
CLOZE_SPLITS = ("validation", "test")  # never `calib`
CONTEXT_WORDS = 80
MIN_CONTEXT_WORDS = 12
MIN_TARGET_CHARS = 3
ABBREVIATIONS = frozenset({"etc", "Inc", "Ltd", "Mrs", "Bros", "Corp", "viz", "Esq", "vol", "pp", "eds", "trans",
                           "repr"})
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_TARGET = re.compile(r"^([A-Za-z]+)\.$")


def cloze_items(articles: Iterable[dict[str, str]]) -> list[dict[str, Any]]:
    """Cleaned articles ({"title", "text"}) -> cloze items {"idx", "title", "context", "target"}, in text order."""
    items: list[dict[str, Any]] = []
    for article in articles:
        for paragraph in article["text"].split("\n"):
            before: list[str] = []  # words of the paragraph's earlier sentences
            for sentence in _SENTENCE_END.split(paragraph.strip()):
                words = sentence.split()
                match = _TARGET.match(words[-1]) if words else None
                if match and len(match.group(1)) >= MIN_TARGET_CHARS and match.group(1) not in ABBREVIATIONS:
                    context = (before + words[:-1])[-CONTEXT_WORDS:]
                    if len(context) >= MIN_CONTEXT_WORDS:
                        items.append({"idx": len(items), "title": article["title"], "context": " ".join(context),
                                      "target": match.group(1)})
                before += words
    return items


def shuffled(items: list[dict[str, Any]], seed: int = CLOZE_SEED) -> list[dict[str, Any]]:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


def build_cloze(wiki_dir: Path, out_dir: Path) -> dict[str, int]:
    """`wiki_dir`'s validation.jsonl / test.jsonl (the wiki asset's layout) -> out_dir's validation.jsonl,
    test.jsonl (shuffled items) and meta.json (counts, seed, the construction constants)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in CLOZE_SPLITS:
        with open(wiki_dir / f"{split}.jsonl", encoding="utf-8") as fh:
            items = shuffled(cloze_items(json.loads(line) for line in fh if line.strip()))
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for item in items:
                fh.write(json.dumps(item, ensure_ascii=False) + "\n")
        counts[split] = len(items)
    meta = {"counts": counts, "seed": CLOZE_SEED, "context_words": CONTEXT_WORDS,
            "min_context_words": MIN_CONTEXT_WORDS, "min_target_chars": MIN_TARGET_CHARS,
            "abbreviations": sorted(ABBREVIATIONS), "source": "the wiki asset's validation/test articles",
            "order": "shuffled with random.Random(seed); `idx` is the position before the shuffle"}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log("wiki_cloze: " + ", ".join(f"{split} {n} items" for split, n in counts.items()))
    return counts


def build_cloze_from_wheel(wheel: Path, out_dir: Path) -> None:
    """From the gensim wheel: the wiki articles (same recipe as the `wiki` asset) in scratch space, then the cloze."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
        build_from_member(wheel, WIKI_BZ2, Path(scratch) / "wiki", build_wiki)
        build_cloze(Path(scratch) / "wiki", out_dir)
