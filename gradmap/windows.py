"""Whether calibration and perplexity windows start with the model's BOS token, and how windows are cut.

Every window that is cut from one token stream (calibration windows, perplexity windows) starts with the BOS token
when the model's family is trained and used that way, and the BOS position is input only, never a prediction.

* Decided by `model.window_bos`: null (the default in every `conf/model/*.yaml`) lets the model family decide,
  true/false overrides it. The family decides from the config's `model_type`: Gemma (1, 2, 3) is trained with
  `<bos>` first and is far off without it (Gemma-3-270m on `wiki_test`: 184 without, ~28 with; its tokenizer's
  `add_bos_token` is false, so the stream has none). Every other family keeps the published protocol of one
  stream cut into windows without a per-window BOS: Llama-2 / Mistral perplexities on WikiText-2 (GPTQ, SparseGPT,
  ShortGPT, SLEB) are measured that way, so those numbers stay comparable; SmolLM2's tokenizer adds no BOS, so its
  windows are exactly what they were before this key existed.
* A window of `seq_len` tokens with a BOS is [BOS] + seq_len - 1 tokens of the stream: the model sees the same
  length, and the window predicts the same count (seq_len - 1 tokens: every stream token of the window, since the
  BOS is the first input and is never a label). Perplexity windows then advance by seq_len - 1 stream tokens, so
  every token of the stream covered by the windows is predicted once.

Standard library only, except `cut_windows` (torch is imported where it is used).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from gradmap.errors import ConfigError

if TYPE_CHECKING:
    import torch

# `model_type`s whose windows start with a BOS by default: trained with <bos> first (lm-eval's sglang backend and
# the Gemma model cards add it for the same reason).
BOS_FAMILIES = ("gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text")
WINDOW_BOS_ALLOWED = "null (the model family decides: gradmap.windows), true or false"


@dataclass
class WindowBos:
    """The decision for one run, recorded in `record.json` (`windows`)."""

    bos: bool  # windows start with the BOS token
    bos_token_id: int | None
    decided_by: str  # "model.window_bos=true" or "model family <model_type> (model.window_bos=null)"
    tokenizer_adds_bos: bool | None  # what `tokenizer(text)` does on its own (None: unknown)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def token(self) -> int | None:
        """The BOS id to prepend, or None for windows without one."""
        return self.bos_token_id if self.bos else None


def family_wants_bos(model_type: str | None) -> bool:
    return str(model_type) in BOS_FAMILIES


def legacy_window_bos(model_class: str | None, model_cfg: dict[str, Any]) -> bool | None:
    """`model.window_bos` for a record written before the key existed, as what that code did: no window had a BOS,
    which today is `null` for a family without BOS windows and an explicit `false` for one with them (Gemma: its
    CausalLM class, or failing that its asset or hub name, says so)."""
    names = [model_class, model_cfg.get("asset"), model_cfg.get("pretrained")]
    gemma = any(isinstance(n, str) and "gemma" in n.lower() for n in names)
    return False if gemma else None


def _tokenizer_adds_bos(tokenizer: Any, bos_id: int | None) -> bool | None:
    if bos_id is None or not callable(tokenizer):
        return None
    try:
        ids = list(tokenizer("a")["input_ids"])
    except Exception:  # noqa: BLE001  (a stand-in tokenizer: only informative)
        return None
    return bool(ids) and ids[0] == bos_id


def decide_window_bos(setting: bool | None, model_config: Any, tokenizer: Any) -> WindowBos:
    """The run's decision from `model.window_bos` (None: the family of `model_config.model_type` decides), with the
    BOS id from the tokenizer (else the model config). ConfigError if BOS windows are asked for and there is no BOS
    token."""
    if setting is not None and not isinstance(setting, bool):
        raise ConfigError("model.window_bos", setting, WINDOW_BOS_ALLOWED)
    model_type = getattr(model_config, "model_type", None)
    text_config = getattr(model_config, "text_config", None)
    if not family_wants_bos(model_type) and text_config is not None:
        model_type = getattr(text_config, "model_type", model_type)
    if setting is None:
        bos, decided_by = family_wants_bos(model_type), f"model family {model_type} (model.window_bos=null)"
    else:
        bos, decided_by = setting, f"model.window_bos={str(setting).lower()}"
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        bos_id = getattr(model_config, "bos_token_id", None)
    if bos and bos_id is None:
        raise ConfigError("model.window_bos", setting, "false or null for a tokenizer without a BOS token",
                          problem=f"windows should start with a BOS token"
                                  f"{f' ({decided_by})' if setting is None else ''}, but neither the tokenizer "
                                  f"({type(tokenizer).__name__}) nor the model config has one")
    return WindowBos(bos=bos, bos_token_id=None if bos_id is None else int(bos_id), decided_by=decided_by,
                     tokenizer_adds_bos=_tokenizer_adds_bos(tokenizer, bos_id))


def stream_tokens_per_window(seq_len: int, bos_id: int | None) -> int:
    """Stream tokens in one window of `seq_len` tokens: seq_len, or seq_len - 1 after a BOS."""
    return seq_len - (bos_id is not None)


def cut_windows(token_ids: torch.Tensor, seq_len: int, bos_id: int | None = None,
                max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len] of a 1-D stream, the incomplete tail dropped. Without a BOS, window i
    is token_ids[i*seq_len:(i+1)*seq_len] (the GPTQ recipe); with one, [BOS] + token_ids[i*(seq_len-1):
    (i+1)*(seq_len-1)]. Either way a window predicts its seq_len - 1 last tokens."""
    import torch

    step = stream_tokens_per_window(seq_len, bos_id)
    n = token_ids.numel() // step if step > 0 else 0
    if max_windows is not None:
        n = min(n, max_windows)
    body = token_ids[:n * step].long().view(n, step)
    if bos_id is None:
        return body
    return torch.cat([torch.full((n, 1), int(bos_id), dtype=torch.long), body], dim=1)
