"""Calibration windows and held-out evaluation tokens, from the offline Wikipedia asset, a JSONL file, or the hub.

Calibration follows the SparseGPT/ShortGPT recipe: `num_samples` windows of exactly `seq_len` tokens, each from a
randomly chosen document at a random offset, drawn with `random.Random(seed)` so a seed fixes the set. Held-out
text is the standard perplexity recipe: documents joined with "\\n\\n", tokenized once as one stream.
Offline calibration and held-out text come from disjoint Wikipedia articles (see `gradmap.assets.build_wiki`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from gradmap.metric import Calibration

SOURCES = ("offline_wiki", "hub")
HUB_DATASETS = ("wikitext2", "c4")
HELDOUT_HUB_DATASETS = ("wikitext2",)
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


def _offline_texts(cfg: Any, split: str) -> list[str]:
    """`cfg.path` if given, else the `calib`/`heldout` split of the cached Wikipedia asset."""
    path = _get(cfg, "path")
    if path is None:
        from gradmap.assets import ensure

        path = ensure("wiki") / f"{split}.jsonl"
    return read_jsonl_texts(path)


def _hub_texts(dataset: str, split: str) -> list[str]:
    """Raw documents of a hub dataset (needs internet or a warm datasets cache)."""
    from datasets import load_dataset

    if dataset == "wikitext2":
        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
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


def load_heldout_tokens(cfg: Any, tokenizer: Any) -> torch.Tensor:
    """1-D held-out token stream: documents joined with "\\n\\n", tokenized, cut to `max_tokens` (null = all).

    offline_wiki: held-out articles in file order (only as many as needed are tokenized); hub wikitext2: the test
    split joined with "\\n\\n" and tokenized in one call, the standard WikiText-2 perplexity recipe.
    """
    source = _check_source(cfg)
    max_tokens = _get(cfg, "max_tokens")
    max_tokens = None if max_tokens is None else int(max_tokens)
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or null, got {max_tokens}")
    if source == "hub":
        dataset = _get(cfg, "dataset", "wikitext2")
        if dataset not in HELDOUT_HUB_DATASETS:
            raise ValueError(f"eval.heldout.dataset={dataset!r} is not supported; allowed: {list(HELDOUT_HUB_DATASETS)}")
        ids = _tokenize(tokenizer, "\n\n".join(_hub_texts(dataset, "test")))
    else:
        texts = _offline_texts(cfg, "heldout")
        # Only the leading articles that can fill max_tokens are tokenized: count per article (cheap upper bound on
        # what is needed), then tokenize their joined text once so the result is exactly "join, tokenize, cut".
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
        raise ValueError("held-out text is empty")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)
