"""Layer surgery on tiny random models of every supported layout: find, remove, hide, restore, save.

References are built independently of `gradmap.surgery` wherever possible: a model constructed from scratch with
only the kept layers, a deep copy of the dense model, and greedy generation without a KV cache.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from gradmap import surgery
from gradmap.checkpoint import save_pruned
from gradmap.models import ByteTokenizer, tiny_random_llama

VOCAB = 128
TOKEN_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _seeded(cls, config):
    torch.manual_seed(0)
    return cls(config).eval()


def build_llama():
    return tiny_random_llama(vocab_size=VOCAB, num_layers=6, **TOKEN_IDS)


def build_gpt2():
    return _seeded(GPT2LMHeadModel, GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                                               **TOKEN_IDS))


def build_neox():
    return _seeded(GPTNeoXForCausalLM, GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4,
                                                     num_attention_heads=4, intermediate_size=64,
                                                     max_position_embeddings=64, **TOKEN_IDS))


def build_opt():
    return _seeded(OPTForCausalLM, OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, ffn_dim=64,
                                             num_attention_heads=4, word_embed_proj_dim=32,
                                             max_position_embeddings=64, **TOKEN_IDS))


GEMMA3_TYPES = ["sliding_attention", "sliding_attention", "full_attention",
                "sliding_attention", "sliding_attention", "full_attention"]


def build_gemma3():
    # sliding_window=4 is shorter than prompt + generated tokens, so the sliding layers' window is exercised.
    return _seeded(Gemma3ForCausalLM, Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, layer_types=list(GEMMA3_TYPES),
        max_position_embeddings=64, **TOKEN_IDS))


def build_qwen2():
    # Layers 2 and 3 use sliding-window attention (window 4): layer_types is mixed.
    return _seeded(Qwen2ForCausalLM, Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=2,
        max_position_embeddings=64, **TOKEN_IDS))


# arch -> (builder, path of the layer list written out by hand, config attribute of the layer count, removal)
ARCHS = {
    "llama": (build_llama, "model.layers", "num_hidden_layers", [1, 4]),
    "gpt2": (build_gpt2, "transformer.h", "n_layer", [0, 2]),
    "gpt_neox": (build_neox, "gpt_neox.layers", "num_hidden_layers", [1, 3]),
    "opt": (build_opt, "model.decoder.layers", "num_hidden_layers", [2]),
    "gemma3": (build_gemma3, "model.layers", "num_hidden_layers", [2, 3]),
    "qwen2": (build_qwen2, "model.layers", "num_hidden_layers", [1, 2]),
}
ARCH_NAMES = list(ARCHS)


def get_by_path(obj, path):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def inputs(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def layer_idx_table(model):
    """Per decoder layer: the `layer_idx` of every submodule that has one."""
    return [[m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
            for layer in surgery.get_decoder_layers(model)]


def per_layer_config(model):
    c = model.config
    return {a: copy.deepcopy(getattr(c, a)) for a in ("num_hidden_layers", "n_layer", "num_layers", "layer_types")
            if hasattr(c, a)}


def kept_only_reference(model, arch, keep):
    """A fresh model built from a config with len(keep) layers, loaded with the kept layers' weights."""
    builder, path, count_attr, _ = ARCHS[arch]
    dense = builder()
    config = copy.deepcopy(dense.config)
    setattr(config, count_attr, len(keep))
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    ref = type(dense)(config).eval()
    state = {}
    for k, v in dense.state_dict().items():
        prefix = path + "."
        if k.startswith(prefix):
            idx, rest = k[len(prefix):].split(".", 1)
            if int(idx) not in keep:
                continue
            k = f"{prefix}{keep.index(int(idx))}.{rest}"
        state[k] = v
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected
    assert all("lm_head" in k for k in missing), missing  # tied heads only
    return ref


# ---------------------------------------------------------------------------------------------- finding layers

@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_get_decoder_layers_finds_the_layer_list(arch):
    builder, path, count_attr, _ = ARCHS[arch]
    model = builder()
    layers = surgery.get_decoder_layers(model)
    assert layers is get_by_path(model, path)
    assert isinstance(layers, nn.ModuleList)
    assert surgery.num_layers(model) == len(layers) == getattr(model.config, count_attr)


def test_unknown_architecture_is_refused_with_its_class_name():
    class MysteryNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(surgery.UnsupportedArchitectureError, match="MysteryNet"):
        surgery.get_decoder_layers(MysteryNet())
    with pytest.raises(surgery.UnsupportedArchitectureError, match="MysteryNet"):
        surgery.remove_layers(MysteryNet(), [0])
    assert issubclass(surgery.UnsupportedArchitectureError, ValueError)


# ---------------------------------------------------------------------------------------------- removal

@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_remove_layers_keeps_layers_config_and_layer_idx_in_sync(arch):
    builder, _, count_attr, drop = ARCHS[arch]
    model = builder()
    original = list(surgery.get_decoder_layers(model))
    n = len(original)
    types_before = list(getattr(model.config, "layer_types", None) or [])
    assert all(len(row) >= 1 for row in layer_idx_table(model))  # every layer has an indexed attention module

    removed = surgery.remove_layers(model, drop)

    keep = [i for i in range(n) if i not in drop]
    assert sorted(removed) == sorted(drop)
    assert all(removed[i] is original[i] for i in drop)
    assert [id(x) for x in surgery.get_decoder_layers(model)] == [id(original[i]) for i in keep]
    assert getattr(model.config, count_attr) == len(keep)
    if types_before:
        assert model.config.layer_types == [types_before[i] for i in keep]
    for pos, row in enumerate(layer_idx_table(model)):
        assert row and all(idx == pos for idx in row), (pos, row)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_removed_model_equals_a_model_built_with_only_the_kept_layers(arch):
    builder, _, _, drop = ARCHS[arch]
    model = builder()
    n = surgery.num_layers(model)
    keep = [i for i in range(n) if i not in drop]
    ids = inputs()
    reference = logits(kept_only_reference(model, arch, keep), ids)

    with surgery.layers_removed(model, drop):
        hidden = logits(model, ids)
    surgery.remove_layers(model, drop)
    pruned = logits(model, ids)

    torch.testing.assert_close(pruned, reference, rtol=1e-5, atol=1e-6)
    assert torch.equal(hidden, pruned)
    # Removing layers does change the function (the reference is not trivially the dense model).
    assert not torch.allclose(pruned, logits(builder(), ids), atol=1e-4)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_cached_generation_after_removal_equals_uncached_greedy_generation(arch):
    builder, _, _, drop = ARCHS[arch]
    model = builder()
    n = surgery.num_layers(model)
    surgery.remove_layers(model, drop)
    prompt = inputs(batch=1, length=5, seed=3)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (1, 13)
    assert torch.equal(cached, uncached)
    # Greedy continuation by hand, from full forwards of the pruned model.
    seq = prompt
    for _ in range(8):
        nxt = logits(model, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)
    # A second removal on the already pruned model keeps the cache addressing consistent as well.
    surgery.remove_layers(model, [0])
    assert surgery.num_layers(model) == n - len(drop) - 1
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, use_cache=True, **kwargs),
                           model.generate(prompt, use_cache=False, **kwargs))


def test_gemma3_layer_types_follow_the_kept_layers():
    model = build_gemma3()
    surgery.remove_layers(model, [2, 3])  # a full and a sliding layer
    assert model.config.layer_types == ["sliding_attention", "sliding_attention", "sliding_attention",
                                        "full_attention"]
    # Each kept layer's own attention type (fixed at construction) matches its new config entry.
    for pos, layer in enumerate(model.model.layers):
        assert layer.self_attn.layer_type == model.config.layer_types[pos]
        assert layer.self_attn.layer_idx == pos
    # The cache built for generation follows the new layer types: generation with cache is still exact.
    surgery.remove_layers(model, [3])  # now the last full-attention layer goes too
    assert model.config.layer_types == ["sliding_attention"] * 3
    prompt = inputs(batch=1, length=6, seed=5)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, use_cache=True, **kwargs),
                           model.generate(prompt, use_cache=False, **kwargs))


# ---------------------------------------------------------------------------------------------- hide / restore

@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_layers_removed_restores_everything_exactly(arch):
    builder, _, count_attr, drop = ARCHS[arch]
    model = builder()
    ids = inputs()
    layers_obj = surgery.get_decoder_layers(model)
    order = [id(x) for x in layers_obj]
    config = per_layer_config(model)
    idx = layer_idx_table(model)
    before = logits(model, ids)
    n = len(order)

    with surgery.layers_removed(model, drop) as inner:
        assert inner is model
        assert surgery.num_layers(model) == n - len(drop)
        assert getattr(model.config, count_attr) == n - len(drop)
        assert not torch.allclose(logits(model, ids), before, atol=1e-4)

    assert surgery.get_decoder_layers(model) is layers_obj
    assert [id(x) for x in surgery.get_decoder_layers(model)] == order
    assert per_layer_config(model) == config
    assert layer_idx_table(model) == idx
    assert torch.equal(logits(model, ids), before)

    # Also restored when the body raises.
    with pytest.raises(RuntimeError, match="boom"):
        with surgery.layers_removed(model, drop):
            raise RuntimeError("boom")
    assert [id(x) for x in surgery.get_decoder_layers(model)] == order
    assert per_layer_config(model) == config
    assert layer_idx_table(model) == idx
    assert torch.equal(logits(model, ids), before)

    with surgery.layers_removed(model, []):  # nothing to hide
        assert [id(x) for x in surgery.get_decoder_layers(model)] == order


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_dense_view_of_a_pruned_model_reproduces_the_dense_model(arch):
    builder, _, _, drop = ARCHS[arch]
    model = builder()
    dense_copy = copy.deepcopy(model)
    ids = inputs()
    dense = logits(dense_copy, ids)
    dense_config = per_layer_config(dense_copy)

    removed = surgery.remove_layers(model, drop)
    pruned_order = [id(x) for x in surgery.get_decoder_layers(model)]
    pruned_config = per_layer_config(model)
    pruned_idx = layer_idx_table(model)
    pruned = logits(model, ids)

    with surgery.dense_view(model, removed):
        assert per_layer_config(model) == dense_config
        assert layer_idx_table(model) == layer_idx_table(dense_copy)
        assert torch.equal(logits(model, ids), dense)

    assert [id(x) for x in surgery.get_decoder_layers(model)] == pruned_order
    assert per_layer_config(model) == pruned_config
    assert layer_idx_table(model) == pruned_idx
    assert torch.equal(logits(model, ids), pruned)


def test_dense_view_after_two_removals_and_with_nothing_removed():
    model = build_gemma3()
    dense = logits(copy.deepcopy(model), inputs())
    first = surgery.remove_layers(model, [0, 5])   # original 0, 5
    second = surgery.remove_layers(model, [1])     # current 1 = original 2
    # Removed layers keyed by original position, as compensation receives them.
    removed = first.then(second)
    assert dict(removed) == {0: first[0], 2: second[1], 5: first[5]}
    pruned = logits(model, inputs())
    with surgery.dense_view(model, removed):
        assert model.config.layer_types == GEMMA3_TYPES
        assert torch.equal(logits(model, inputs()), dense)
    assert model.config.layer_types == [GEMMA3_TYPES[i] for i in (1, 3, 4)]
    assert torch.equal(logits(model, inputs()), pruned)
    with surgery.dense_view(model, {}):
        assert surgery.num_layers(model) == 3


# ---------------------------------------------------------------------------------------------- bad indices

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bad_indices_raise_and_leave_the_model_untouched(arch):
    builder, _, count_attr, _ = ARCHS[arch]
    model = builder()
    n = surgery.num_layers(model)
    order = [id(x) for x in surgery.get_decoder_layers(model)]
    for bad in ([n], [-1], [0, n + 3]):
        with pytest.raises(ValueError, match=rf"0\.\.{n - 1}"):
            surgery.remove_layers(model, bad)
    with pytest.raises(ValueError, match="duplicate"):
        surgery.remove_layers(model, [1, 1])
    with pytest.raises(ValueError, match=rf"{n} of {n}.*at least one"):
        surgery.remove_layers(model, list(range(n)))
    with pytest.raises(ValueError, match=rf"0\.\.{n - 1}"):
        with surgery.layers_removed(model, [n]):
            pass
    assert [id(x) for x in surgery.get_decoder_layers(model)] == order
    assert getattr(model.config, count_attr) == n
    assert layer_idx_table(model) == [[i] * len(row) for i, row in enumerate(layer_idx_table(model))]


# ---------------------------------------------------------------------------------------------- saving

@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "qwen2"])
def test_save_pruned_reloads_with_plain_from_pretrained(arch, tmp_path):
    builder, _, count_attr, drop = ARCHS[arch]
    model = builder()
    n = surgery.num_layers(model)
    surgery.remove_layers(model, drop)
    info = {"removed": drop, "metric": "gradmap", "compensation": {"sites": []}}
    out = save_pruned(model, ByteTokenizer(VOCAB), tmp_path / "pruned", info)

    assert out == tmp_path / "pruned"
    assert json.loads((out / "pruning_info.json").read_text()) == info
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(model)
    assert surgery.num_layers(reloaded) == n - len(drop) == getattr(reloaded.config, count_attr)
    if getattr(model.config, "layer_types", None) is not None:
        assert list(reloaded.config.layer_types) == list(model.config.layer_types)
    assert layer_idx_table(reloaded) == layer_idx_table(model)
    ids = inputs()
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    prompt = inputs(batch=1, length=5, seed=7)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        generated = reloaded.generate(prompt, **kwargs)
        assert generated.shape == (1, 11)
        assert torch.equal(generated, model.generate(prompt, use_cache=False, **kwargs))
