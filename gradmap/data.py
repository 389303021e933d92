"""Calibration windows and held-out evaluation tokens, from the offline Wikipedia asset, a JSONL file, or the hub.

Calibration follows the SparseGPT/ShortGPT recipe: `num_samples` windows of exactly `seq_len` tokens, each from a
randomly chosen document at a random offset, drawn with `random.Random(seed)` so a seed fixes the set. Held-out
text is the standard perplexity recipe: documents joined with "\\n\\n", tokenized once as one stream.
Offline calibration and held-out text come from disjoint Wikipedia articles (see `gradmap.assets.build_wiki`):
calibration reads only the `calib` split; evaluation reads `validation` (where choices are made) or `test` (what
tables report), and a run with `tuning=true` is refused the `test` split, so no choice can see it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradmap.metric import Calibration

SOURCES = ("offline_wiki", "hub")
HUB_DATASETS = ("wikitext2", "c4")
# Held-out corpora and the splits each may be evaluated on. wiki / news: offline assets of that name (files
# <split>.jsonl); wikitext2: the hub dataset; jsonl: any file given as `path` (tests, your own text).
HELDOUT_CORPORA = {"wiki": ("validation", "test"), "news": ("test",), "wikitext2": ("validation", "test"),
                   "jsonl": ("validation", "test")}
TEST_SPLIT = "test"
# Draws of a document shorter than a window before giving up (only reachable when almost every text is short).
_MAX_SHORT_DRAWS = 10_000


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """Read `key` from an omegaconf node or a plain dict."""
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def _check_source(cfg: Any) -> str:
    source = _get(cfg, "source")
    if source not in SOURCES:
        raise ValueError(f"data source={source!r} is not supported; allowed: {list(SOURCES)}")
    return source


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    # No BOS/EOS: windows are cut from running text, and the same call works for HF tokenizers and ByteTokenizer.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def read_jsonl_texts(path: str | Path) -> list[str]:
    """The "text" field of every line of a JSONL file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist")
    texts = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                record = json.loads(line)
                if "text" not in record:
                    raise ValueError(f"{path}:{lineno} has no 'text' field (keys: {sorted(record)})")
                texts.append(record["text"])
    return texts


def _offline_texts(cfg: Any, split: str, corpus: str = "wiki") -> list[str]:
    """`cfg.path` if given, else split `split` of the cached offline asset `corpus` (wiki: calib/validation/test)."""
    path = _get(cfg, "path")
    if path is None:
        from gradmap.assets import ensure

        path = ensure(corpus) / f"{split}.jsonl"
    return read_jsonl_texts(path)


def _hub_texts(dataset: str, split: str) -> list[str]:
    """Raw documents of a hub dataset (needs internet or a warm datasets cache)."""
    from datasets import load_dataset

    if dataset == "wikitext2":
        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)  # train | validation | test
    elif dataset == "c4":
        if split != "train":
            raise ValueError(f"c4 is only used for calibration (split 'train'), got split={split!r}")
        ds = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    else:
        raise ValueError(f"hub dataset={dataset!r} is not supported; allowed: {list(HUB_DATASETS)}")
    return list(ds["text"])


def sample_windows(texts: list[str], tokenizer: Any, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`num_samples` random windows of `seq_len` tokens: random document (>= seq_len + 1 tokens), random offset.

    Documents are tokenized lazily and memoised, so only the drawn ones are tokenized (a few dozen articles, not
    the whole corpus). The +1 keeps the SparseGPT recipe's room for a shifted target.
    """
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"num_samples and seq_len must be >= 1, got num_samples={num_samples}, seq_len={seq_len}")
    if not texts:
        raise ValueError("no calibration texts to sample from")
    rng = random.Random(seed)
    cache: dict[int, list[int]] = {}
    too_short: set[int] = set()
    windows: list[list[int]] = []
    short_draws = 0
    while len(windows) < num_samples:
        if len(too_short) == len(texts) or short_draws > _MAX_SHORT_DRAWS:
            longest = max((len(ids) for ids in cache.values()), default=0)
            raise ValueError(f"no calibration text has seq_len + 1 = {seq_len + 1} tokens (longest seen: {longest}); "
                             f"lower seq_len or use longer texts")
        doc = rng.randrange(len(texts))
        if doc in too_short:
            short_draws += 1
            continue
        if doc not in cache:
            cache[doc] = _tokenize(tokenizer, texts[doc])
        ids = cache[doc]
        if len(ids) < seq_len + 1:
            too_short.add(doc)
            short_draws += 1
            continue
        start = rng.randrange(len(ids) - seq_len)
        windows.append(ids[start:start + seq_len])
    return torch.tensor(windows, dtype=torch.long)


def load_calibration(cfg: Any, tokenizer: Any) -> Calibration:
    """Calibration windows from a `conf/calibration/*.yaml` node (source offline_wiki [+ path] or hub)."""
    source = _check_source(cfg)
    if source == "offline_wiki":
        texts = _offline_texts(cfg, "calib")
    else:
        dataset = _get(cfg, "dataset", "wikitext2")
        if dataset not in HUB_DATASETS:
            raise ValueError(f"calibration.dataset={dataset!r} is not supported; allowed: {list(HUB_DATASETS)}")
        texts = [t for t in _hub_texts(dataset, "train") if t.strip()]
    input_ids = sample_windows(texts, tokenizer, int(_get(cfg, "num_samples", 128)), int(_get(cfg, "seq_len", 2048)),
                               int(_get(cfg, "seed", 0)))
    return Calibration(input_ids=input_ids, batch_size=int(_get(cfg, "batch_size", 8)))


def check_heldout_spec(name: str, spec: Any, tuning: bool) -> tuple[str, str]:
    """(corpus, split) of one `eval.heldout.texts` entry, refusing unknown ones and `test` in tuning runs."""
    corpus, split = _get(spec, "corpus"), _get(spec, "split")
    if corpus not in HELDOUT_CORPORA:
        raise ValueError(f"eval.heldout.texts.{name}.corpus={corpus!r} is not supported; "
                         f"allowed: {list(HELDOUT_CORPORA)}")
    if split not in HELDOUT_CORPORA[corpus]:
        raise ValueError(f"eval.heldout.texts.{name}.split={split!r} is not available for corpus {corpus!r}; "
                         f"allowed: {list(HELDOUT_CORPORA[corpus])}")
    if corpus == "jsonl" and _get(spec, "path") is None:
        raise ValueError(f"eval.heldout.texts.{name}.path is required for corpus 'jsonl'")
    if tuning and split == TEST_SPLIT:
        raise ValueError(f"eval.heldout.texts.{name}.split='test' is refused in a tuning run (tuning=true): choices "
                         "are made on 'validation' only; allowed: 'validation'")
    return corpus, split


def load_heldout_tokens(spec: Any, tokenizer: Any, max_tokens: int | None, name: str = "text",
                        tuning: bool = False) -> torch.Tensor:
    """1-D held-out token stream of one text: documents joined with "\\n\\n", tokenized, cut to `max_tokens`.

    Offline corpora: documents in file order (only as many as needed are tokenized); hub wikitext2: the whole split
    joined with "\\n\\n" and tokenized in one call, the standard WikiText-2 perplexity recipe.
    """
    corpus, split = check_heldout_spec(name, spec, tuning)
    if max_tokens is not None and int(max_tokens) < 1:
        raise ValueError(f"eval.heldout.max_tokens={max_tokens} must be >= 1 or null (all)")
    max_tokens = None if max_tokens is None else int(max_tokens)
    if corpus == "wikitext2":
        ids = _tokenize(tokenizer, "\n\n".join(_hub_texts(corpus, split)))
    else:
        texts = _offline_texts(spec, split, corpus)
        # Only the leading documents that can fill max_tokens are tokenized: count per document (cheap upper bound
        # on what is needed), then tokenize their joined text once so the result is exactly "join, tokenize, cut".
        used, count = len(texts), 0
        if max_tokens is not None:
            for i, text in enumerate(texts):
                count += len(_tokenize(tokenizer, text)) + 1
                if count >= max_tokens:
                    used = i + 1
                    break
        ids = _tokenize(tokenizer, "\n\n".join(texts[:used]))
        while max_tokens is not None and len(ids) < max_tokens and used < len(texts):
            used += 1  # joined tokenization merged across a boundary and came out a few tokens short
            ids = _tokenize(tokenizer, "\n\n".join(texts[:used]))
    if not ids:
        raise ValueError(f"held-out text {name!r} ({corpus}/{split}) is empty")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class HeldoutText:
    """One held-out text: its token stream and where it comes from (every perplexity is recorded with both)."""

    name: str
    corpus: str
    split: str
    token_ids: torch.Tensor


def load_heldout(cfg: Any, tokenizer: Any, tuning: bool = False) -> list[HeldoutText]:
    """Every text of an `eval.heldout` node ({max_tokens, texts: {name: {corpus, split[, path]}}}), in order."""
    texts = _get(cfg, "texts") or {}
    specs = [(str(name), spec) for name, spec in texts.items()]
    for name, spec in specs:  # check every entry before tokenizing any
        check_heldout_spec(name, spec, tuning)
    return [HeldoutText(name, _get(spec, "corpus"), _get(spec, "split"),
                        load_heldout_tokens(spec, tokenizer, _get(cfg, "max_tokens"), name, tuning))
            for name, spec in specs]
