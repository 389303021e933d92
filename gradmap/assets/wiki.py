"""Text assets from the gensim wheel's test data: an English Wikipedia extract, cleaned of markup and split by
article into `calib` / `validation` / `test`, and the Lee news corpus (`test` only)."""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import html
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gradmap.assets.fetch import PACKAGES, build_from_member, file_sha256, log

# Members of the gensim wheel.
WIKI_BZ2 = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# The Lee background corpus: 300 news articles of the Australian Broadcasting Corporation (one per line), our second,
# non-Wikipedia test corpus (another domain and source than the calibration text).
LEE_NEWS = "gensim/test/test_data/lee_background.cor"

WIKI_MIN_CHARS = 500
WIKI_HELDOUT_MODULUS = 10
# Splits of the Wikipedia asset. Choices (defaults, hyperparameters) are made on `validation`; tables report `test`.
WIKI_SPLITS = ("calib", "validation", "test")

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
    log("wiki: " + ", ".join(f"{split} {len(titles[split])} articles ({chars[split]:,} chars)"
                             for split in WIKI_SPLITS))
    return stats


def build_wiki_from_wheel(wheel: Path, out_dir: Path) -> None:
    build_from_member(wheel, WIKI_BZ2, out_dir, build_wiki)


def build_news_from_wheel(wheel: Path, out_dir: Path) -> None:
    build_from_member(wheel, LEE_NEWS, out_dir, build_news)


def build_news(cor_path: Path, out_dir: Path) -> dict[str, Any]:
    """The Lee news corpus (one article per line) -> `test.jsonl` in file order and `stats.json`. Test only: it
    is never used for calibration or for choosing anything."""
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = [line.strip() for line in cor_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    with open(out_dir / "test.jsonl", "w", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"title": f"lee_background:{i}", "text": text}, ensure_ascii=False) + "\n")
    stats = {"splits": {"test": {"articles": len(texts), "chars": sum(map(len, texts)),
                                 "sha256": file_sha256(cor_path)}},
             "source": f"{PACKAGES['gensim'].spec}: {LEE_NEWS} (Australian Broadcasting Corporation news)"}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log(f"news: {len(texts)} articles ({stats['splits']['test']['chars']:,} chars)")
    return stats
