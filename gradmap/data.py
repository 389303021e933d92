"""The calibration group (`conf/calibration/*.yaml`) and held-out evaluation text.

Calibration follows the SparseGPT/ShortGPT recipe: `num_samples` windows of exactly `seq_len` tokens, each from a
randomly chosen document at a random offset, drawn with `random.Random(seed)` so a seed fixes the set; its config
classes, the `_target_`s of the YAMLs, are `WikiCalibration` (the offline Wikipedia extract or a JSONL file) and
`HubCalibration` (WikiText-2 or C4 from the hub). Held-out text is the standard perplexity recipe: documents joined
with "\\n\\n", tokenized once as one stream.
Offline calibration and held-out text come from disjoint Wikipedia articles (see `gradmap.assets.wiki`):
calibration reads only the `calib` split; evaluation reads `validation` (where choices are made) or `test` (what
tables report), and a run with `tuning=true` is refused the `test` split, so no choice can see it.
torch is imported where it is used, so validation can read the config classes without it.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from gradmap.errors import ConfigError, brief
from gradmap.schema import HELDOUT_CORPORA, HUB_DATASETS, TEST_SPLIT, check_node, option

if TYPE_CHECKING:
    import torch


# Draws of a document shorter than a window before giving up (only reachable when almost every text is short).
_MAX_SHORT_DRAWS = 10_000
# Memory bound of reading and tokenising: a document longer than this is read as consecutive pieces of at most
# this many characters (cut before a whitespace), so one tokenizer call never sees more (the longest article of
# the offline corpora has 99k). Peak memory is then about 4x the longest line of a file plus one piece's tokens.
MAX_DOC_CHARS = 1_000_000


def split_long(text: str, limit: int = MAX_DOC_CHARS) -> list[str]:
    """`text` as pieces of at most `limit` characters, each cut before a whitespace where there is one."""
    if len(text) <= limit:
        return [text]
    pieces, start = [], 0
    while len(text) - start > limit:
        cut = max(text.rfind(" ", start + limit // 2, start + limit), text.rfind("\n", start + limit // 2,
                                                                               start + limit))
        cut = cut if cut > start else start + limit
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _tokenize_bounded(tokenizer: Any, text: str) -> list[int]:
    """`_tokenize` of a text of any length, one piece (`split_long`) at a time."""
    ids: list[int] = []
    for piece in split_long(text):
        ids += _tokenize(tokenizer, piece)
    return ids


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    # No BOS/EOS: windows are cut from running text (a window gets its BOS when it is cut, if its family needs one:
    # gradmap.windows), and the same call works for HF tokenizers and ByteTokenizer.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def read_jsonl_texts(path: str | Path, key: str = "path") -> list[str]:
    """The "text" field of every line of a JSONL file, in file order. `key`: the config key that named the file
    (in errors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist")
    texts = []
    allowed = 'a JSONL file, one {"text": ...} object per line'
    lineno = 0
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ConfigError(key, str(path), allowed,
                                          problem=f"line {lineno} is not JSON ({brief(err, 120)})") from err
                    del line  # a long line: keep one copy of its text, not two
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise ConfigError(key, str(path), allowed, problem=f"line {lineno} has no 'text' string "
                                          "(keys: "
                                          f"{sorted(record) if isinstance(record, dict) else type(record).__name__})")
                    texts += split_long(record.pop("text"))
    except UnicodeDecodeError as err:
        raise ConfigError(key, str(path), "a UTF-8 text file", problem=f"line {lineno + 1} is not UTF-8 "
                          f"(byte {err.object[err.start:err.start + 1]!r}: {err.reason})",
                          hint="convert it, e.g. iconv -f latin1 -t utf-8") from err
    return texts


def window_supply(texts: list[str], tokenizer: Any, memo: dict[int, list[int]], seq_len: int, need: int) -> int:
    """Tokens of the documents that can hold a window (>= seq_len + 1 tokens), counted in file order until `need`
    is reached (so at most `need` tokens plus one document are tokenized; they are memoised for the sampling)."""
    total = 0
    for doc, text in enumerate(texts):
        if doc not in memo:
            memo[doc] = _tokenize(tokenizer, text)
        if len(memo[doc]) >= seq_len + 1:
            total += len(memo[doc])
        if total >= need:
            break
    return total


def distinct_tokens(spans: list[tuple[int, int]], seq_len: int) -> int:
    """How many distinct text positions the windows (document, start) cover (overlaps counted once)."""
    total, by_doc = 0, {}
    for doc, start in spans:
        by_doc.setdefault(doc, []).append(start)
    for starts in by_doc.values():
        end = -1
        for start in sorted(starts):
            total += start + seq_len - max(start, end)
            end = max(end, start + seq_len)
    return total


def _offline_texts(path: str | None, split: str, corpus: str = "wiki", key: str = "calibration.path") -> list[str]:
    """The JSONL file `path` if given, else split `split` of the cached offline asset `corpus` (wiki:
    calib/validation/test)."""
    if path is None:
        from gradmap.assets import ensure

        path = ensure(corpus) / f"{split}.jsonl"
    return read_jsonl_texts(path, key)


def _hub_texts(dataset: str, split: str) -> list[str]:
    """Raw documents of a hub dataset (needs internet or a warm datasets cache)."""
    from datasets import load_dataset

    if dataset == "wikitext2":
        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)  # train | validation | test
    elif dataset == "c4":
        if split != "train":
            raise ConfigError("eval.heldout.texts", f"c4/{split}", "wikitext2 for held-out text",
                              problem="c4 is only used for calibration (split 'train')")
        ds = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    else:
        raise ConfigError("calibration.dataset", dataset, list(HUB_DATASETS), problem="not supported")
    return list(ds["text"])


def sample_windows(texts: list[str], tokenizer: Any, num_samples: int, seq_len: int, seed: int,
                   spans: list[tuple[int, int]] | None = None, bos_id: int | None = None) -> torch.Tensor:
    """`num_samples` random windows of `seq_len` tokens: random document (>= seq_len + 1 tokens), random offset.

    Documents are tokenized lazily and memoised, so only the drawn ones are tokenized (a few dozen articles, not
    the whole corpus). The +1 keeps the SparseGPT recipe's room for a shifted target. More tokens than the texts
    hold is refused (the windows would repeat the same text). `spans`: filled with each window's (document, start).
    `bos_id` (`gradmap.windows`): each window is [BOS] + the seq_len - 1 tokens at the drawn offset, so the draws
    (document, offset) are the same with and without it.
    """
    import torch

    if num_samples < 1:
        raise ConfigError("calibration.num_samples", num_samples, "an integer >= 1")
    if seq_len < 1:
        raise ConfigError("calibration.seq_len", seq_len, "an integer >= 2")
    if not texts:
        raise ConfigError("calibration.path", None, "a file with at least one text", problem="no calibration texts")
    rng = random.Random(seed)
    cache: dict[int, list[int]] = {}
    need = num_samples * seq_len
    supply = window_supply(texts, tokenizer, cache, seq_len, need)
    if 0 < supply < need:
        raise ConfigError("calibration.num_samples", num_samples, f"at most {supply // seq_len} windows of seq_len="
                          f"{seq_len} for these texts", problem=f"{num_samples} x {seq_len} = {need} tokens, but the "
                          f"calibration texts hold {supply} (windows would repeat the same text)",
                          hint="lower calibration.num_samples or calibration.seq_len, or give more text")
    too_short: set[int] = set()
    windows: list[list[int]] = []
    short_draws = 0
    while len(windows) < num_samples:
        if len(too_short) == len(texts) or short_draws > _MAX_SHORT_DRAWS:
            longest = max((len(ids) for ids in cache.values()), default=0)
            raise ConfigError("calibration.seq_len", seq_len, f"at most {max(longest - 1, 1)} for these texts",
                              problem=f"no calibration text has seq_len + 1 = {seq_len + 1} tokens (longest seen: "
                                      f"{longest}); lower seq_len or use longer texts")
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
        if bos_id is None:
            windows.append(ids[start:start + seq_len])
        else:
            windows.append([int(bos_id)] + ids[start:start + seq_len - 1])
        if spans is not None:
            spans.append((doc, start))
    return torch.tensor(windows, dtype=torch.long)


@dataclass
class Calibration:
    """Calibration token ids [num_samples, seq_len], iterated in micro-batches of `batch_size` rows."""

    input_ids: torch.Tensor
    batch_size: int = 8
    distinct_tokens: int | None = None  # text positions the windows cover (overlaps once), where sampled

    def __post_init__(self):
        # A non-positive micro-batch size would give no batches at all: every score 0, silently.
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError("calibration.batch_size", self.batch_size, "an integer >= 1")
        if self.input_ids.dim() != 2 or self.input_ids.shape[0] < 1 or self.input_ids.shape[1] < 2:
            raise ConfigError("calibration", tuple(self.input_ids.shape), "[num_samples >= 1, seq_len >= 2] tokens",
                              problem="calibration tokens have an unusable shape")

    def batches(self, device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
        for start in range(0, self.input_ids.shape[0], self.batch_size):
            chunk = self.input_ids[start:start + self.batch_size]
            yield chunk.to(device) if device is not None else chunk

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_batches(self) -> int:
        return math.ceil(self.input_ids.shape[0] / self.batch_size)


@dataclass
class WikiCalibration:
    """Windows from the `calib` split of the offline Wikipedia extract (`path: null`), or from a JSONL file of
    {"text": ...} lines (conf/calibration/wiki_offline.yaml, tiny.yaml)."""

    path: Optional[str] = option()
    num_samples: int = option(ge=1)
    seq_len: int = option(ge=2)  # one window predicts seq_len - 1 tokens
    batch_size: int = option(ge=1)  # micro-batch rows per forward/backward (a memory knob)
    seed: int = option(ge=0, le=2**32 - 1)

    def texts(self) -> list[str]:
        return _offline_texts(self.path, "calib")

    def load(self, tokenizer: Any, bos_id: int | None = None) -> Calibration:
        return _windows(self, self.texts(), tokenizer, bos_id)


@dataclass
class HubCalibration:
    """Windows from the hub (needs internet): WikiText-2 train or C4 (conf/calibration/hub.yaml)."""

    dataset: str = option(choices=HUB_DATASETS)
    num_samples: int = option(ge=1)
    seq_len: int = option(ge=2)
    batch_size: int = option(ge=1)
    seed: int = option(ge=0, le=2**32 - 1)

    def texts(self) -> list[str]:
        if self.dataset not in HUB_DATASETS:
            raise ConfigError("calibration.dataset", self.dataset, list(HUB_DATASETS), problem="not supported")
        try:
            return [t for t in _hub_texts(self.dataset, "train") if t.strip()]
        except Exception as err:  # noqa: BLE001  (no network, no datasets cache)
            raise ConfigError("calibration.dataset", self.dataset, problem=f"cannot be read from the hub "
                              f"({brief(err)})",
                              hint="check network access or the datasets cache (HF_DATASETS_OFFLINE)") from err

    def load(self, tokenizer: Any, bos_id: int | None = None) -> Calibration:
        return _windows(self, self.texts(), tokenizer, bos_id)


def _windows(cfg: WikiCalibration | HubCalibration, texts: list[str], tokenizer: Any,
             bos_id: int | None = None) -> Calibration:

    spans: list[tuple[int, int]] = []
    input_ids = sample_windows(texts, tokenizer, int(cfg.num_samples), int(cfg.seq_len), int(cfg.seed), spans,
                               bos_id)
    return Calibration(input_ids=input_ids, batch_size=int(cfg.batch_size),
                       distinct_tokens=distinct_tokens(spans, int(cfg.seq_len)))


def load_calibration(cfg: Any, tokenizer: Any, bos_id: int | None = None) -> Calibration:
    """Calibration windows from a config class, or from a `conf/calibration/*.yaml` node (built through its
    `_target_`); `bos_id`: windows start with it (`gradmap.windows`)."""
    if not hasattr(cfg, "load"):  # a config node, not a built config class
        from hydra.utils import instantiate

        cfg = instantiate(cfg, _convert_="all")
    return cfg.load(tokenizer, bos_id)


@dataclass
class TextSource:
    """One entry of `eval.heldout.texts`: a corpus and split (HELDOUT_CORPORA), and for corpus `jsonl` the file."""

    corpus: str = option(choices=tuple(HELDOUT_CORPORA))
    split: str = option(choices=("validation", "test"))
    path: Optional[str] = option(absent_ok=True)  # a JSONL file instead of the corpus's own text


def check_heldout_spec(name: str, spec: Any, tuning: bool) -> tuple[str, str]:
    """(corpus, split) of one `eval.heldout.texts` entry: known corpus and split, a path where the corpus needs one,
    and no `test` text in a tuning run (refused before anything is read)."""
    key = f"eval.heldout.texts.{name}"
    present = {k: spec.get(k) for k in ("corpus", "split", "path") if spec.get(k) is not None}
    check_node(key, present, TextSource)
    corpus, split = present["corpus"], present["split"]
    if split not in HELDOUT_CORPORA[corpus]:
        raise ConfigError(f"{key}.split", split, HELDOUT_CORPORA[corpus],
                          problem=f"not available for corpus {corpus!r}")
    if corpus == "jsonl" and present.get("path") is None:
        raise ConfigError(f"{key}.path", None, "the path of a JSONL file with a 'text' field",
                          problem="required for corpus 'jsonl'")
    if tuning and split == TEST_SPLIT:
        raise ConfigError(f"{key}.split", split, "validation",
                          problem="refused in a tuning run (tuning=true): choices are made on 'validation' only")
    return corpus, split


def load_heldout_tokens(spec: Any, tokenizer: Any, max_tokens: int | None, name: str = "text",
                        tuning: bool = False) -> torch.Tensor:
    """1-D held-out token stream of one text: documents joined with "\\n\\n", tokenized, cut to `max_tokens`.

    Offline corpora: documents in file order (only as many as needed are tokenized); hub wikitext2: the whole split
    joined with "\\n\\n" and tokenized in one call, the standard WikiText-2 perplexity recipe.
    """
    corpus, split = check_heldout_spec(name, spec, tuning)
    if max_tokens is not None and int(max_tokens) < 1:
        raise ConfigError("eval.heldout.max_tokens", max_tokens, "an integer >= 2, or null (all)")
    max_tokens = None if max_tokens is None else int(max_tokens)
    if corpus == "wikitext2":
        ids = _tokenize(tokenizer, "\n\n".join(_hub_texts(corpus, split)))
    else:
        texts = _offline_texts(spec.get("path"), split, corpus, key=f"eval.heldout.texts.{name}.path")
        # Only the leading documents that can fill max_tokens are tokenized: count per document (cheap upper bound
        # on what is needed), then tokenize their joined text once so the result is exactly "join, tokenize, cut".
        used, count = len(texts), 0
        if max_tokens is not None:
            for i, text in enumerate(texts):
                count += len(_tokenize(tokenizer, text)) + 1
                if count >= max_tokens:
                    used = i + 1
                    break
        ids = _tokenize_bounded(tokenizer, "\n\n".join(texts[:used]))
        while max_tokens is not None and len(ids) < max_tokens and used < len(texts):
            used += 1  # joined tokenization merged across a boundary and came out a few tokens short
            ids = _tokenize_bounded(tokenizer, "\n\n".join(texts[:used]))
    if not ids:
        raise ConfigError(f"eval.heldout.texts.{name}", f"{corpus}/{split}", "a non-empty text", problem="empty")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    import torch

    return torch.tensor(ids, dtype=torch.long)


@dataclass
class HeldoutText:
    """One held-out text: its token stream and where it comes from (every perplexity is recorded with both)."""

    name: str
    corpus: str
    split: str
    token_ids: Any  # 1-D torch.Tensor of token ids


def load_heldout(cfg: Any, tokenizer: Any, tuning: bool = False) -> list[HeldoutText]:
    """Every text of `eval.heldout` (a `gradmap.evaluation.Heldout`, or a node {max_tokens, texts: {name: {corpus,
    split[, path]}}}), in order."""
    specs = [(str(name), spec) for name, spec in (cfg.texts or {}).items()]
    for name, spec in specs:  # check every entry before tokenizing any
        check_heldout_spec(name, spec, tuning)
    return [HeldoutText(name, spec["corpus"], spec["split"],
                        load_heldout_tokens(spec, tokenizer, cfg.max_tokens, name, tuning))
            for name, spec in specs]
