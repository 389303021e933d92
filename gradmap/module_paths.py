"""Attribute paths to the modules layer pruning touches, per architecture family, and the walk that follows them.

Paths start at the CausalLM wrapper (`model.layers`) or at a decoder layer (`mlp.down_proj`). Standard library
only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# The decoder layer list, from the CausalLM wrapper.
LAYER_PATHS: dict[str, str] = {
    "llama/mistral/qwen2/qwen3/gemma/gemma3/phi3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
}
# The norm after the last decoder layer, from the CausalLM wrapper.
FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm")
# The MLP's output projection, from a decoder layer; folding into it is exact when nothing follows it but the
# residual add.
OUTPUT_PROJECTIONS = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "fc2")
# The modules of a pre-norm decoder layer that write into the residual stream (attention and MLP output
# projections); together with the input embedding they are everything the residual stream is a sum of.
RESIDUAL_WRITERS = ("self_attn.o_proj", "mlp.down_proj")
# A norm between the MLP and the residual add (e.g. Gemma's post_feedforward_layernorm): folding into the MLP's
# output is then not exact.
POST_MLP_NORMS = ("post_feedforward_layernorm",)
# Norms applied to a sublayer's output before the residual add (Gemma 2/3): they absorb any scale folded before them.
POST_SUBLAYER_NORMS = POST_MLP_NORMS + ("pre_feedforward_layernorm",)
# A "sandwich" layer (Gemma 2/3) normalises each sublayer's input and output: its residual writers are the two
# output norms, whose gains a scale folds into exactly; the input norms keep every reader scale-invariant.
SANDWICH_INPUT_NORMS = ("input_layernorm", "pre_feedforward_layernorm")
SANDWICH_WRITER_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")


def get_path(obj: Any, path: str) -> Any | None:
    """`obj.a.b.c` for path "a.b.c", or None where an attribute is missing (or None)."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def first_path(obj: Any, paths: Iterable[str], kind: type | tuple[type, ...] = object) -> tuple[str, Any] | None:
    """The first of `paths` that leads from `obj` to an instance of `kind`, as (path, object); None if none does."""
    for path in paths:
        found = get_path(obj, path)
        if found is not None and isinstance(found, kind):
            return path, found
    return None
