"""Evaluation of a (dense or pruned) in-memory model: held-out perplexity and lm-evaluation-harness tasks.

`evaluate` is what the runner calls with the `conf/eval/*.yaml` node; `headline` flattens its result to the few
numbers a summary table shows, and `retained` compares pruned to dense on those numbers. Evaluation never changes
the model: no weights, hooks or `requires_grad` are touched, and it stays in eval mode.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gradmap.models import model_device
from gradmap.validation import TASKS_DIR, ConfigError, brief

DATA_PLACEHOLDER = "__DATA_FILE__"
# lm-eval computes the stderr of `mean` metrics in closed form whenever bootstrap_iters > 0 (0 disables stderr
# altogether); the few bootstrapped metrics stay cheap with 100 draws.
BOOTSTRAP_ITERS = 100
LM_EVAL_META_KEYS = ("versions", "n-samples", "config")
ACCURACY_METRICS = ("acc", "acc_norm")


# --------------------------------------------------------------------------------------------------- perplexity

def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the input embedding's device (differs from the first parameter's under device_map)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return model_device(model)


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, seq_len: int, batch_size: int = 8,
               max_windows: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Token-level perplexity over non-overlapping windows (the GPTQ / SparseGPT / ShortGPT recipe).

    Window i is token_ids[i*seq_len:(i+1)*seq_len]; the incomplete tail is dropped; each window predicts its
    seq_len-1 next tokens from scratch (no context carried over). ppl = exp(total NLL / predicted tokens), with the
    NLL summed in float64 so thousands of windows do not lose precision.

    Returns {"ppl", "nll" (mean NLL per predicted token), "tokens" (predicted tokens), "windows", "seq_len"}.
    """
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} is too short; a window needs at least 2 tokens to predict one")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows={max_windows} must be >= 1 or None (all windows)")
    num_windows = token_ids.numel() // seq_len
    if num_windows == 0:
        raise ValueError(f"held-out text has {token_ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    windows = token_ids[:num_windows * seq_len].long().view(num_windows, seq_len)

    was_training = model.training
    model.eval()
    device = input_device(model)
    total_nll = torch.zeros((), dtype=torch.float64)
    try:
        # disable=None: a bar on a terminal, nothing in logs and pipes.
        with tqdm(total=num_windows, desc=f"perplexity@{seq_len}", unit="window", disable=None if progress else True,
                  leave=False) as bar:
            for start in range(0, num_windows, batch_size):
                batch = windows[start:start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                # One row at a time: the float32 upcast of [batch, seq, vocab] logits is the memory peak. Targets
                # follow the logits (the last device under device_map); float64 on the CPU (MPS has none).
                for row, ids in zip(logits, batch):
                    nll = F.cross_entropy(row[:-1].float(), ids[1:].to(row.device), reduction="none")
                    total_nll += nll.cpu().double().sum()
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    tokens = num_windows * (seq_len - 1)
    mean_nll = total_nll.item() / tokens
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "tokens": tokens, "windows": num_windows, "seq_len": seq_len}


# ------------------------------------------------------------------------------------------------------ lm-eval

def materialize_local_task(template_name: str, data_file: str | Path, out_dir: str | Path) -> Path:
    """Write task template `gradmap/tasks/<template_name>` into `out_dir` with the absolute data path filled in.

    `out_dir` is then passed to lm-eval as `include_path`. Returns the written YAML.
    """
    name = template_name if template_name.endswith((".yaml", ".yml")) else f"{template_name}.yaml"
    template = TASKS_DIR / name
    if not template.is_file():
        allowed = sorted(p.name for p in TASKS_DIR.glob("*.yaml"))
        raise ValueError(f"task template {template_name!r} not found in {TASKS_DIR}; allowed: {allowed}")
    data = Path(data_file).expanduser().resolve()
    if not data.is_file():
        raise FileNotFoundError(f"data file {str(data)!r} for task template {name!r} does not exist")
    text = template.read_text()
    if text.count(DATA_PLACEHOLDER) != 1:
        raise ValueError(f"task template {template} must contain the placeholder {DATA_PLACEHOLDER} exactly once "
                         f"(found {text.count(DATA_PLACEHOLDER)})")
    # A JSON string is a valid YAML scalar: quotes and escapes any path safely.
    text = text.replace(DATA_PLACEHOLDER, json.dumps(str(data)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    target.write_text(text)
    return target


def _task_name(yaml_file: Path) -> str | None:
    import yaml

    try:
        return (yaml.safe_load(yaml_file.read_text()) or {}).get("task")
    except yaml.YAMLError:  # lm-eval tags such as !function are not safe_load-able; nothing to check then
        return None


def _check_hf_tokenizer(tokenizer: Any) -> None:
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"lm-eval needs a transformers tokenizer (PreTrainedTokenizerBase), got "
                        f"{type(tokenizer).__name__}; model=tiny_random's ByteTokenizer only supports perplexity, "
                        f"so use eval.lm_eval.tasks=[] with it")


def _check_tying_is_stable(model: nn.Module) -> None:
    """HFLM calls `model.tie_weights()`, which re-ties whatever the config says should be tied: refuse a model whose
    config asks for tying but whose weights are separate, since lm-eval would silently overwrite one of them."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if not callable(expand):
        return
    try:
        tied = expand(all_submodels=True)
    except Exception:  # private-ish transformers API: if it changes, fall back to the post-evaluation check
        return
    for target, source in tied.items():
        try:
            t, s = model.get_parameter(target), model.get_parameter(source)
        except AttributeError:
            continue
        if t is not s:
            raise ValueError(f"the config ties {target} to {source} but they are separate tensors; lm-eval's "
                             f"tie_weights() would overwrite {target}. Fix the config (tie_word_embeddings) first")


def _param_identity(model: nn.Module) -> dict[str, tuple]:
    return {n: (p.data_ptr(), p.device, p.dtype, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()}


def _compact_task_results(metrics: Mapping[str, Any]) -> dict[str, float]:
    """{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...} -> {"acc": 0.5, "acc_stderr": 0.1}.

    Only numbers are kept (stderr is the string "N/A" where lm-eval did not compute it) and "sample_len" goes
    ("n-samples" has it); the default filter's ",none" suffix is dropped, other filters keep theirs
    ("exact_match,strict-match").
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "sample_len" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = key[:-len(",none")] if key.endswith(",none") else key
        out[name] = float(value)
    return out


def run_lm_eval(model: nn.Module, tokenizer: Any, tasks: list[str], batch_size: int, limit: int | float | None,
                num_fewshot: int | None, seed: int, local_tasks: Mapping[str, str | Path] | None = None,
                ) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks on the in-memory `model` (no reload, no copy).

    `local_tasks` maps task names to task YAMLs outside lm-eval (see `materialize_local_task`); their folders are
    passed as `include_path`. Every lm-eval seed is set to `seed`. Returns
    {task: {metric: value, "<metric>_stderr": ...}, "versions": ..., "n-samples": ..., "config": {...}}.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = list(tasks)
    if not tasks:
        raise ValueError("run_lm_eval needs at least one task; got tasks=[]")
    _check_hf_tokenizer(tokenizer)
    local_tasks = {name: Path(path) for name, path in (local_tasks or {}).items()}
    for name, path in local_tasks.items():
        if not path.is_file():
            raise FileNotFoundError(f"local task {name!r}: YAML {str(path)!r} does not exist")
        found = _task_name(path)
        if found is not None and found != name:
            raise ValueError(f"local task {name!r}: {path} defines task {found!r}; the names must match")
    include = sorted({str(p.parent) for p in local_tasks.values()})
    # Indexing lm-eval's ~10k built-in task YAMLs takes seconds; skip it when every task is local.
    task_manager = TaskManager(include_path=include or None,
                               include_defaults=not set(tasks) <= set(local_tasks))

    _check_tying_is_stable(model)
    before = _param_identity(model)
    was_training = model.training
    # backend="causal": every model here is a decoder-only LM, whatever its config's model_type registry says.
    hflm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
    try:
        results = lm_eval.simple_evaluate(
            model=hflm, tasks=tasks, limit=limit, num_fewshot=num_fewshot, task_manager=task_manager,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS)
    except OSError as err:  # a task's dataset cannot be downloaded or read (no network, no datasets cache)
        raise ConfigError("eval.lm_eval.tasks", tasks, problem=f"lm-eval could not load a task's data "
                          f"({brief(err)})",
                          hint="check network access or the datasets cache (HF_DATASETS_OFFLINE)") from err
    finally:
        model.eval()
    if results is None:  # only non-zero ranks of a distributed run get None; we never launch one
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    if _param_identity(model) != before:
        raise RuntimeError("lm-eval changed the model's parameters (tensors replaced, moved or re-tied)")
    if was_training:
        print("[gradmap] model was in train mode before lm-eval; it is left in eval mode", flush=True)

    out: dict[str, Any] = {task: _compact_task_results(metrics) for task, metrics in results["results"].items()}
    out["versions"] = {k: v for k, v in results.get("versions", {}).items()}
    out["n-samples"] = results.get("n-samples", {})
    out["config"] = {"limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size, "seed": seed,
                     "bootstrap_iters": BOOTSTRAP_ITERS, "lm_eval_version": _lm_eval_version()}
    return out


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


# ----------------------------------------------------------------------------------------------- runner entry

def _local_task_files(local_cfg: Mapping[str, Any], tasks: list[str], out_dir: Path) -> dict[str, Path]:
    """Materialise the configured local tasks that are actually requested."""
    files = {}
    for name in tasks:
        if name not in local_cfg:
            continue
        spec = local_cfg[name]
        if "template" not in spec:
            raise ValueError(f"eval.lm_eval.local_tasks.{name} needs a 'template' (a file in {TASKS_DIR})")
        data = spec.get("data")
        if data is None:
            from gradmap.assets import ensure  # lazy: fetching assets is only needed when the task runs

            asset = spec.get("asset", name.removesuffix("_bigbench"))
            data = ensure(asset) / spec.get("file", "test.jsonl")
        files[name] = materialize_local_task(spec["template"], Path(data), out_dir)
    return files


def evaluate(model: nn.Module, tokenizer: Any, eval_cfg: Any, heldout: Sequence[Any] = (),
             seed: int = 0) -> dict[str, Any]:
    """Run the evaluation described by a `conf/eval/*.yaml` node.

    `heldout`: `gradmap.data.HeldoutText`s (name, corpus, split, token_ids), e.g. from `gradmap.data.load_heldout`.
    Returns {"perplexity": {name: {"corpus", "split", "seq_lens": {"<seq_len>": perplexity(...)}}},
    "lm_eval": run_lm_eval(...) or {}}; an empty or missing `lm_eval.tasks` skips lm-eval.
    """
    results: dict[str, Any] = {"perplexity": {}, "lm_eval": {}}
    ppl_cfg = eval_cfg.get("perplexity") or {}
    seq_lens = list(ppl_cfg.get("seq_lens") or [])
    if seq_lens and not heldout:
        raise ValueError(f"eval.perplexity.seq_lens={seq_lens} but no held-out text was given (eval.heldout.texts)")
    for text in heldout if seq_lens else ():
        results["perplexity"][text.name] = {"corpus": text.corpus, "split": text.split, "seq_lens": {
            str(int(seq_len)): perplexity(model, text.token_ids, int(seq_len),
                                          batch_size=int(ppl_cfg.get("batch_size", 8)),
                                          max_windows=ppl_cfg.get("max_windows"))
            for seq_len in seq_lens}}

    lm_cfg = eval_cfg.get("lm_eval") or {}
    tasks = [str(t) for t in (lm_cfg.get("tasks") or [])]
    if tasks:
        with tempfile.TemporaryDirectory(prefix="gradmap_tasks_") as tmp:
            local = _local_task_files(lm_cfg.get("local_tasks") or {}, tasks, Path(tmp))
            results["lm_eval"] = run_lm_eval(
                model, tokenizer, tasks, batch_size=int(lm_cfg.get("batch_size", 16)), limit=lm_cfg.get("limit"),
                num_fewshot=lm_cfg.get("num_fewshot"), seed=int(lm_cfg.get("seed", seed)), local_tasks=local)
    return results


def headline(results: Mapping[str, Any]) -> dict[str, float]:
    """A few flat numbers: "ppl@<seq_len>/<text>" per held-out text (e.g. `ppl@128/wiki_test`) and window length,
    and "<task>/acc", "<task>/acc_norm" per task."""
    flat: dict[str, float] = {}
    for name, text in (results.get("perplexity") or {}).items():
        for seq_len, ppl in text["seq_lens"].items():
            flat[f"ppl@{seq_len}/{name}"] = float(ppl["ppl"])
    for task, metrics in (results.get("lm_eval") or {}).items():
        if task in LM_EVAL_META_KEYS:
            continue
        for metric in ACCURACY_METRICS:
            if metric in metrics:
                flat[f"{task}/{metric}"] = float(metrics[metric])
    return flat


def retained(dense: Mapping[str, Any], pruned: Mapping[str, Any]) -> dict[str, float]:
    """Percent of the dense model's quality the pruned one keeps, per headline number; higher is better everywhere.

    Accuracies: pruned / dense * 100. Perplexity (lower is better): dense / pruned * 100, so a pruned model whose
    perplexity doubled retains 50 %. NaN where the ratio is undefined (zero or missing values).
    """
    d, p = headline(dense), headline(pruned)
    out: dict[str, float] = {}
    for key, dense_value in d.items():
        pruned_value = p.get(key)
        num, den = (dense_value, pruned_value) if key.startswith("ppl@") else (pruned_value, dense_value)
        ok = num is not None and den is not None and den != 0 and math.isfinite(num) and math.isfinite(den)
        out[key] = num / den * 100.0 if ok else float("nan")
    return out
