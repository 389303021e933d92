"""Writing a pruned model as a standard checkpoint: plain safetensors that `from_pretrained` loads without gguf,
`pruning_info.json` beside it, and an atomic write into the run's `save_dir`."""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradmap.errors import ConfigError, brief


def save_plain_checkpoint(model: Any, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
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
            raise RuntimeError(f"rebuilding the model for saving lost weights: missing={missing} "
                               f"unexpected={unexpected}")
        clean.save_pretrained(out, safe_serialization=True)
    else:
        model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    honour_umask(out)
    return out


def honour_umask(folder: Path) -> None:
    """Give every file and folder under `folder` the mode a plain `open()` / `mkdir` would (0666 / 0777 minus the
    umask): safetensors writes weights 0600, which a group sharing a cache or a checkpoint cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def sweep_partial_saves(final: Path) -> None:
    """Remove what an earlier save to `final` left behind (`.<name>.tmp-PID` / `.old-PID` of a process that is
    gone: killed during the write)."""
    for kind in ("tmp", "old"):
        for stale in final.parent.glob(f".{final.name}.{kind}-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and _gone(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)


def save_pruned(model: Any, tokenizer: Any, save_dir: str | os.PathLike, info: Mapping[str, object]) -> Path:
    """Write a standard checkpoint that plain `AutoModelForCausalLM.from_pretrained` loads, plus
    `pruning_info.json` (which original layers were removed and how the model was compensated)."""
    out = save_plain_checkpoint(model, tokenizer, save_dir)
    (out / "pruning_info.json").write_text(json.dumps(dict(info), indent=2, default=str))
    honour_umask(out)
    return out


def save_checkpoint(model: Any, tokenizer: Any, save_dir: str, info: dict[str, Any], overwrite: bool) -> Path:
    """Write the pruned checkpoint to a temporary sibling of `save_dir` and rename it into place at the end: a
    failed write leaves nothing behind (and an existing folder, replaced only with `save_overwrite=true`,
    untouched). Errors are ConfigErrors on `save_dir`."""
    final = Path(save_dir).expanduser().resolve()
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        sweep_partial_saves(final)
        save_pruned(model, tokenizer, tmp, info)
        if final.exists():
            if not overwrite and (not final.is_dir() or any(final.iterdir())):
                raise ConfigError("save_dir", save_dir, "an empty or new folder, or save_overwrite=true",
                                  problem=f"{final} appeared (non-empty) while the run was going")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except (ConfigError, KeyboardInterrupt):  # refused, or Ctrl-C / SIGTERM during the write: nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as err:  # noqa: BLE001  (disk full, permissions, a serialisation error)
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError("save_dir", save_dir, problem=f"writing the checkpoint failed ({brief(err)}); nothing was "
                          f"left at {final}",
                          hint="the results are in record.json; fix the cause and rerun with force=true") from err
    return final
