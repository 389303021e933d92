"""Model loading (offline assets, hub checkpoints, tiny random test models) and clean checkpoint saving."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradmap.validation import DTYPE_ALIASES, MODEL_SOURCES, ConfigError, brief

DTYPES = {name: getattr(torch, canonical) for name, canonical in DTYPE_ALIASES.items()}
SOURCES = MODEL_SOURCES


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError("dtype", name, sorted(DTYPES), problem="not supported")
    return DTYPES[name]


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def tiny_random_config(vocab_size: int = 256, hidden_size: int = 32, num_layers: int = 6, intermediate_size: int = 64,
                       num_heads: int = 4, num_kv_heads: int = 2, max_position_embeddings: int = 512, seed: int = 0,
                       **overrides: Any):
    """The LlamaConfig of `tiny_random_llama` (`seed` is the weights' seed, not part of the config)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                       max_position_embeddings=max_position_embeddings, tie_word_embeddings=False, **overrides)


def tiny_random_llama(seed: int = 0, **config: Any) -> nn.Module:
    """A small random Llama built from a config (`tiny_random_config`): for unit tests, seconds on a CPU."""
    from transformers import LlamaForCausalLM

    config = tiny_random_config(**config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


class ByteTokenizer:
    """Stand-in tokenizer for the tiny random model: bytes mod vocab. Enough for calibration and perplexity."""

    def __init__(self, vocab_size: int = 256):
        self.vocab_size = vocab_size
        self.eos_token_id = 0
        self.pad_token_id = 0

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    def encode(self, text: str, **_: Any) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def decode(self, ids, **_: Any) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def load_model(cfg: Any) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) from a `conf/model/*.yaml` node.

    source=offline: a converted asset folder (see `gradmap.assets`); source=hub: `pretrained` name or path with
    dtype/device_map; source=tiny_random: the unit-test model.
    """
    source = cfg.source
    dtype = resolve_dtype(cfg.get("dtype", "float32"))
    if source == "tiny_random":
        kwargs = {k: v for k, v in dict(cfg.get("config", {}) or {}).items()}
        model = tiny_random_llama(**kwargs).to(dtype)
        return model, ByteTokenizer(model.config.vocab_size)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == "offline":
        from gradmap.assets import ensure

        path, key = str(ensure(cfg.asset)), "model.asset"
    elif source == "hub":
        path, key = cfg.pretrained, "model.pretrained"
    else:
        raise ConfigError("model.source", source, list(SOURCES), problem="not supported")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg.get("device_map"):
        kwargs["device_map"] = cfg.device_map
    if cfg.get("attn_implementation"):
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001  (a damaged folder, a network failure: the load itself failed)
        hint = ("check it with: python -m gradmap.assets --verify; rebuild it with: python -m gradmap.assets "
                f"--rebuild {cfg.asset}") if source == "offline" else "check the name and network access"
        raise ConfigError(key, cfg.get(key.split(".")[1]), problem=f"the model cannot be loaded from {path} "
                          f"({brief(err)})", hint=hint) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def save_plain_checkpoint(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
    """Save `model` as a plain safetensors checkpoint that `from_pretrained` loads without gguf.

    A GGUF-loaded model refuses `save_pretrained` while `config.quantization_config` is set, and keeps quantizer
    state on the object; its weights are already dequantised, so a fresh model is rebuilt from the cleaned config
    and the state dict, and that one is saved.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        dtype = next(iter(state.values())).dtype
        clean = AutoModelForCausalLM.from_config(config, dtype=dtype)
        missing, unexpected = clean.load_state_dict(state, strict=False)
        # Tied embeddings legitimately appear as "missing" lm_head weights.
        missing = [k for k in missing if not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
        if missing or unexpected:
            raise RuntimeError(f"rebuilding the model for saving lost weights: missing={missing} unexpected={unexpected}")
        clean.save_pretrained(out, safe_serialization=True)
    else:
        model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    return out
