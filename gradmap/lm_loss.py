"""The next-token loss for the metrics that take gradients (GradMAP, Taylor), computed so that a backward pass needs
little more memory than a forward.

A causal LM's own loss (`model(labels=...)`) materialises the [B, T, vocab] logits, upcasts them to float32 and keeps
both (and the log-softmax) for the backward: at 7B with 4 x 2048 tokens and a 32k vocabulary that is ~3 GiB, at a
262k vocabulary (Gemma 3) ~24 GiB, more than the rest of the backward. Here the decoder runs once, and the head +
cross-entropy run over chunks of positions, each chunk recomputed in the backward (activation checkpointing), so at
most one chunk's logits live at a time. The loss is the same mean over predicted tokens as HF's `ForCausalLMLoss`
(labels = inputs shifted by one; the last position predicts nothing), so scores match the model's own loss up to
float summation order (tests/test_lm_loss.py).

Only families whose head is `lm_head(final_norm(h))` (optionally with Gemma-2/3's final logit soft-capping) are
chunked; any other model falls back to its own loss, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradmap.stages import Cost

# model_type values whose CausalLM forward is `logits = lm_head(decoder(ids).last_hidden_state)` (+ soft-capping).
CHUNKABLE = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2",
                       "phi3", "smollm3"})
IGNORE = -100


def chunkable(model: nn.Module) -> bool:
    """Whether `chunked_loss` reproduces this model's own loss (a known head; decoder and head reachable)."""
    return (getattr(model.config, "model_type", None) in CHUNKABLE and hasattr(model, "get_decoder")
            and model.get_output_embeddings() is not None)


def _chunk_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module,
                    softcap: float | None) -> torch.Tensor:
    """Summed cross-entropy of one chunk of positions ([n, d] hidden, [n] targets; IGNORE = no prediction)."""
    logits = head(hidden).float()  # float32 as HF's loss does
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")


def chunked_loss(model: nn.Module, input_ids: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Mean next-token cross-entropy of `input_ids` [B, T] (labels = inputs), the head applied `chunk_tokens`
    positions at a time and recomputed in the backward. Equals `model(input_ids, labels=input_ids).loss`."""
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    b, t, d = hidden.shape
    # Targets at every position (a view of hidden, no copy): position i predicts token i+1; the last predicts none.
    targets = F.pad(input_ids[:, 1:], (0, 1), value=IGNORE).reshape(-1)
    flat = hidden.reshape(b * t, d)
    head, softcap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, b * t, chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_loss_sum, flat[sl], targets[sl], head, softcap, use_reentrant=False)
    return total / (b * (t - 1))


def backward_lm_loss(model: nn.Module, batch: torch.Tensor, cost: Cost, chunk_tokens: int) -> None:
    """One forward + backward of the next-token loss of `batch` (labels = inputs), booked in `cost`. `chunk_tokens`
    > 0 and a chunkable model: the head in chunks (above); else the model's own loss."""
    if chunk_tokens > 0 and chunkable(model):
        loss = chunked_loss(model, batch, chunk_tokens)
        # The decoder was called directly, so the runner's hook on the whole model did not see this forward.
        cost.forward_tokens += batch.numel()
    else:
        # Keep only the loss: holding the output would keep the [B, T, vocab] logits alive through the backward.
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    cost.backward_tokens += batch.numel()
