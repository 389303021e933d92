"""Tiny models and a tiny tokenizer for the tests that need another family than the tiny Llama: a random
Gemma-3 (post-MLP norm, sandwich norms, tied embeddings) and a word-level tokenizer with a `<bos>` token, built
locally (nothing is downloaded). And `method`: a metric or compensation built from its shipped YAML (the only place
its option values come from), with some options changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CONF = Path(__file__).resolve().parents[1] / "conf"


def method(option: str, **overrides: Any) -> Any:
    """The object `conf/<option>.yaml` builds (option: "metric/gradmap", "compensation/projection", ...), with
    `overrides` replacing some of its values (each must be a key of the YAML). Built with Hydra's `instantiate`, as a
    run builds it; an error the class raises (ConfigError for a bad value) is raised as is."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(CONF / f"{option}.yaml"), resolve=True)
    unknown = sorted(set(overrides) - set(node))
    if unknown:
        raise KeyError(f"conf/{option}.yaml has no key {', '.join(unknown)}")
    node.update(overrides)
    try:
        return instantiate(node)
    except InstantiationException as err:
        if err.__cause__ is None:
            raise
        raise err.__cause__ from None

WORDS = ("the of and a to in is was for on as with by he at from his an were are which this be or has its "
         "one first new two their after who had been also not it but they her she more year city most other").split()


def bos_tokenizer():
    """A word-level fast tokenizer with `<pad>`, `<eos>`, `<bos>`, `<unk>` (ids 0-3) that adds no BOS on its own
    (like Gemma's, whose `add_bos_token` is false)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_gemma3(seed: int = 0, num_layers: int = 4, hidden_size: int = 32, vocab_size: int = 64,
                norm_weight_scale: float = 0.5):
    """A random Gemma3ForCausalLM (model_type gemma3_text) with non-trivial norm weights (random, so the
    post-norms' gains are not all 1)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                              num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              max_position_embeddings=256, sliding_window=16, bos_token_id=2, eos_token_id=1,
                              pad_token_id=0, layer_types=["sliding_attention", "full_attention"] * (num_layers // 2))
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * norm_weight_scale)
    model.eval()
    return model
