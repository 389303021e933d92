"""The model group (`conf/model/*.yaml`): one config class per kind of model, each loading (model, tokenizer).

`OfflineModel` (an offline asset folder built by `python -m gradmap.assets`), `HubModel` (a Hugging Face hub name
or path) and `TinyRandomModel` (a small random Llama for tests) are the `_target_`s of the YAMLs. Their fields are
the YAML's keys, without defaults; `gradmap.validation` checks them against the fields' types and metadata before
anything is loaded. torch and transformers are imported where they are used, so validation can read these classes
in half a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from gradmap.assets.registry import MODEL_ASSETS
from gradmap.errors import ConfigError, brief
from gradmap.schema import DTYPE_ALIASES, LAYER_COUNT_ATTRS, MAX_POSITION_ATTRS, option
from gradmap.windows import WINDOW_BOS_ALLOWED

if TYPE_CHECKING:
    import torch
    from torch import nn


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPE_ALIASES:
        raise ConfigError("dtype", name, sorted(DTYPE_ALIASES), problem="not supported")
    return getattr(torch, DTYPE_ALIASES[name])


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------------ tiny random model

def tiny_random_config(vocab_size: int = 256, hidden_size: int = 32, num_layers: int = 6, intermediate_size: int = 64,
                       num_heads: int = 4, num_kv_heads: int = 2, max_position_embeddings: int = 512, seed: int = 0,
                       **overrides: Any):
    """The LlamaConfig of `tiny_random_llama` (`seed` is the weights' seed, not part of the config). A test helper:
    `conf/model/tiny_random.yaml` sets every value the model group uses."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                       max_position_embeddings=max_position_embeddings, tie_word_embeddings=False, **overrides)


def tiny_random_llama(seed: int = 0, **config: Any) -> nn.Module:
    """A small random Llama built from a config (`tiny_random_config`): for unit tests, seconds on a CPU."""
    import torch
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


@dataclass
class TinyConfig:
    """`model.config` of `TinyRandomModel` (further keys go to LlamaConfig as they are)."""

    num_layers: int = option(ge=2)
    hidden_size: int = option(ge=1)
    intermediate_size: int = option(ge=1)
    vocab_size: int = option(ge=2)
    max_position_embeddings: int = option(ge=2)
    seed: int = option(ge=0)


# ------------------------------------------------------------------------------------------ the config classes

@dataclass
class ModelInfo:
    """What validation needs to know about the model, read without loading weights (`info(cache)`)."""

    num_layers: int
    max_positions: int | None
    model_type: str
    path: str | None = None  # the folder of an offline asset


def _info_from_config(config: dict[str, Any], what: str, path: str | None) -> ModelInfo:
    def attr(names: tuple[str, ...]) -> int | None:
        for source in (config, config.get("text_config") or {}):
            for name in names:
                if isinstance(source.get(name), int):
                    return source[name]
        return None

    layers = attr(LAYER_COUNT_ATTRS)
    if layers is None:
        raise ConfigError("model", what, problem=f"its config has no layer count ({', '.join(LAYER_COUNT_ATTRS)})")
    return ModelInfo(layers, attr(MAX_POSITION_ATTRS), str(config.get("model_type")), path)


def _meta_model(config: Any) -> nn.Module:
    """The architecture of `config` on the meta device (no memory, no weights), for compatibility checks."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _from_pretrained(path: str, dtype: str, device_map: Any, attn_implementation: str | None, key: str,
                     value: str, hint: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype)}
    if device_map:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001  (a damaged folder, a network failure: the load itself failed)
        raise ConfigError(key, value, problem=f"the model cannot be loaded from {path} ({brief(err)})",
                          hint=hint) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


@dataclass
class OfflineModel:
    """An offline asset: a plain HF folder built from a pinned package (conf/model/smollm2_135m.yaml, gemma3_270m)."""

    asset: str = option(choices=MODEL_ASSETS)
    dtype: str = option(choices=tuple(DTYPE_ALIASES))
    device_map: Optional[Any] = option()  # null: the runner moves the model to `device`
    window_bos: Optional[bool] = option(allowed=WINDOW_BOS_ALLOWED)  # windows start with BOS (gradmap.windows)

    def info(self, cache: Path) -> ModelInfo:
        from gradmap.assets import asset_command, check_asset

        path = check_asset("model.asset", self.asset, cache) / "config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError("model.asset", self.asset, problem=f"{path} is unreadable ({err})",
                              hint=f"rebuild it with: {asset_command(cache, '--rebuild', self.asset)}") from err
        return _info_from_config(config, self.asset, str(path.parent))

    def architecture(self, cache: Path) -> nn.Module:
        from transformers import AutoConfig

        return _meta_model(AutoConfig.from_pretrained(Path(cache) / self.asset))

    def load(self) -> tuple[nn.Module, Any]:
        from gradmap.assets import ensure

        hint = ("check it with: python -m gradmap.assets --verify; rebuild it with: python -m gradmap.assets "
                f"--rebuild {self.asset}")
        return _from_pretrained(str(ensure(self.asset)), self.dtype, self.device_map, None, "model.asset",
                                self.asset, hint)


@dataclass
class HubModel:
    """A Hugging Face hub checkpoint (name or path), in its native dtype across GPUs (conf/model/llama2_7b, ...)."""

    pretrained: str = option()
    dtype: str = option(choices=tuple(DTYPE_ALIASES))
    device_map: Optional[Any] = option()  # auto: spread across all visible GPUs (accelerate)
    attn_implementation: Optional[str] = option()
    window_bos: Optional[bool] = option(allowed=WINDOW_BOS_ALLOWED)  # windows start with BOS (gradmap.windows)

    def info(self, cache: Path) -> ModelInfo:
        try:
            from huggingface_hub.utils import logging as hub_logging
            from transformers import AutoConfig

            verbosity = hub_logging.get_verbosity()
            hub_logging.set_verbosity_error()  # its retry warnings would break the one-line error
            try:
                config = AutoConfig.from_pretrained(self.pretrained).to_dict()
            finally:
                hub_logging.set_verbosity(verbosity)
        except Exception as err:  # noqa: BLE001  (network, typo, gated model: all mean "cannot read it")
            raise ConfigError("model.pretrained", self.pretrained, problem=f"its config cannot be read ({brief(err)})",
                              hint="check the name, network access or the Hugging Face cache (HF_HUB_OFFLINE), "
                                   "and `huggingface-cli login` for gated models") from err
        return _info_from_config(config, self.pretrained, None)

    def architecture(self, cache: Path) -> nn.Module:
        from transformers import AutoConfig

        return _meta_model(AutoConfig.from_pretrained(self.pretrained))

    def load(self) -> tuple[nn.Module, Any]:
        return _from_pretrained(self.pretrained, self.dtype, self.device_map, self.attn_implementation,
                                "model.pretrained", self.pretrained, "check the name and network access")


@dataclass
class TinyRandomModel:
    """The tiny random Llama with a byte tokenizer (conf/model/tiny_random.yaml): tests and smoke runs."""

    dtype: str = option(choices=tuple(DTYPE_ALIASES))
    device_map: Optional[Any] = option()
    config: dict = option(schema=TinyConfig, extra_keys=True)  # TinyConfig's keys; further keys go to LlamaConfig
    window_bos: Optional[bool] = option(allowed=WINDOW_BOS_ALLOWED)  # windows start with BOS (gradmap.windows)

    def info(self, cache: Path) -> ModelInfo:
        return ModelInfo(self.config["num_layers"], self.config["max_position_embeddings"], "llama")

    def architecture(self, cache: Path) -> nn.Module:
        return _meta_model(tiny_random_config(**dict(self.config)))

    def load(self) -> tuple[nn.Module, Any]:
        model = tiny_random_llama(**dict(self.config)).to(resolve_dtype(self.dtype))
        return model, ByteTokenizer(model.config.vocab_size)


def load_model(cfg: Any) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a config class, or from a `conf/model/*.yaml` node (built through its `_target_`)."""
    if not hasattr(cfg, "load"):  # a config node, not a built config class
        from hydra.utils import instantiate

        cfg = instantiate(cfg, _convert_="all")
    return cfg.load()
