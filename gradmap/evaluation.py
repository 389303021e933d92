"""The eval group (`conf/eval/*.yaml`): evaluation of a (dense or pruned) in-memory model, held-out perplexity and
lm-evaluation-harness tasks.

`Evaluation` is the YAMLs' `_target_`: its fields (and those of `Heldout`, `Perplexity`, `LmEval`, `LocalTask`,
nested) are the YAML's keys, without defaults. `evaluate` is what the runner calls; `headline` flattens its result
to the few numbers a summary table shows, and `retained` compares pruned to dense on those numbers. Evaluation
never changes the model: no weights, hooks or `requires_grad` are touched, and it stays in eval mode. torch is
imported where it is used, so validation can read the config classes without it.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from gradmap.data import TextSource
from gradmap.errors import ConfigError, brief
from gradmap.lm_tasks import materialize_local_task, task_name
from gradmap.models import model_device
from gradmap.schema import option
from gradmap.windows import cut_windows

if TYPE_CHECKING:
    import torch
    from torch import nn

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


def perplexity(model: nn.Module, token_ids: torch.Tensor, seq_len: int, batch_size: int = 8,
               max_windows: int | None = None, progress: bool = True, bos_id: int | None = None) -> dict[str, Any]:
    """Token-level perplexity over non-overlapping windows (the GPTQ / SparseGPT / ShortGPT recipe).

    Window i is token_ids[i*seq_len:(i+1)*seq_len]; the incomplete tail is dropped; each window predicts its
    seq_len-1 next tokens from scratch (no context carried over). ppl = exp(total NLL / predicted tokens), with the
    NLL summed in float64 so thousands of windows do not lose precision. `bos_id` (`gradmap.windows`): window i is
    [BOS] + token_ids[i*(seq_len-1):(i+1)*(seq_len-1)]; the BOS is input only, so a window still predicts seq_len-1
    tokens (all of its stream tokens).

    Returns {"ppl", "nll" (mean NLL per predicted token), "tokens" (predicted tokens), "windows", "seq_len", "bos"}.
    """
    import torch

    with torch.no_grad():
        return _perplexity(model, token_ids, seq_len, batch_size, max_windows, progress, bos_id)


def _perplexity(model: nn.Module, token_ids: torch.Tensor, seq_len: int, batch_size: int, max_windows: int | None,
                progress: bool, bos_id: int | None = None) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} is too short; a window needs at least 2 tokens to predict one")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows={max_windows} must be >= 1 or None (all windows)")
    windows = cut_windows(token_ids, seq_len, bos_id, max_windows)
    num_windows = windows.shape[0]
    if num_windows == 0:
        raise ValueError(f"held-out text has {token_ids.numel()} tokens, fewer than one window of seq_len={seq_len}"
                         + (" after a BOS" if bos_id is not None else ""))

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
                for row, ids in zip(logits, batch):  # labels ids[1:]: a BOS at position 0 is never one
                    nll = F.cross_entropy(row[:-1].float(), ids[1:].to(row.device), reduction="none")
                    total_nll += nll.cpu().double().sum()
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    tokens = num_windows * (seq_len - 1)
    mean_nll = total_nll.item() / tokens
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "tokens": tokens, "windows": num_windows, "seq_len": seq_len,
            "bos": bos_id is not None}


# ------------------------------------------------------------------------------------------------------ lm-eval

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
        found = task_name(path)
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


# ------------------------------------------------------------------------------------------ the config classes

@dataclass
class Heldout:
    """`eval.heldout`: the texts perplexity is measured on (each a `gradmap.data.TextSource`), cut to `max_tokens`."""

    max_tokens: Optional[int] = option(ge=2)  # tokens per text; null: all
    texts: dict = option(values=TextSource)  # name -> {corpus, split[, path]}; recorded as ppl@<seq_len>/<name>


@dataclass
class Perplexity:
    """`eval.perplexity`: non-overlapping windows of each length, `batch_size` windows per forward."""

    seq_lens: list[int] = option(items={"ge": 2})
    batch_size: int = option(ge=1)
    max_windows: Optional[int] = option(ge=1)  # null: every window of the text


@dataclass
class LocalTask:
    """`eval.lm_eval.local_tasks.<name>`: a task template shipped in `gradmap/tasks/` and its data: the JSONL file
    `data`, or (`data: null`) the file `file` of the offline asset `asset`."""

    template: str = option()
    data: Optional[str] = option()
    asset: Optional[str] = option()
    file: Optional[str] = option()


@dataclass
class LmEval:
    """`eval.lm_eval`: lm-evaluation-harness tasks on the in-memory model; every lm-eval seed is `seed`."""

    tasks: list[str] = option()
    limit: Optional[float] = option(gt=0, allowed="an integer >= 1 (questions), a fraction in (0, 1], or null (all)")
    batch_size: int = option(ge=1)  # fixed, so results do not depend on auto batch sizing
    num_fewshot: Optional[int] = option(ge=0)
    local_tasks: dict = option(values=LocalTask)  # name -> LocalTask
    seed: int = option(ge=0, le=2**32 - 1)

    def __post_init__(self) -> None:
        self.local_tasks = {str(k): v if isinstance(v, LocalTask) else LocalTask(**v)
                            for k, v in (self.local_tasks or {}).items()}


@dataclass
class Evaluation:
    """What to evaluate the dense and the pruned model on (conf/eval/*.yaml); `cache_dense`: evaluate the dense
    model once per (model, eval config) and reuse it (`gradmap.cache.dense_cache_key`)."""

    heldout: Heldout = option()
    perplexity: Perplexity = option()
    lm_eval: LmEval = option()
    cache_dense: bool = option()

    def __post_init__(self) -> None:
        for name, cls in (("heldout", Heldout), ("perplexity", Perplexity), ("lm_eval", LmEval)):
            value = getattr(self, name)
            if not isinstance(value, cls):
                setattr(self, name, cls(**value))


def _local_task_files(local: Mapping[str, LocalTask], tasks: list[str], out_dir: Path) -> dict[str, Path]:
    """Materialise the configured local tasks that are actually requested."""
    files = {}
    for name in tasks:
        if name not in local:
            continue
        spec = local[name]
        data = spec.data
        if data is None:
            from gradmap.assets import ensure  # lazy: fetching assets is only needed when the task runs

            data = ensure(spec.asset) / spec.file
        files[name] = materialize_local_task(spec.template, Path(data), out_dir)
    return files


def evaluate(model: nn.Module, tokenizer: Any, evaluation: Evaluation, heldout: Sequence[Any] = (),
             bos_id: int | None = None) -> dict[str, Any]:
    """Run `evaluation` on the model.

    `heldout`: `gradmap.data.HeldoutText`s (name, corpus, split, token_ids), e.g. from `gradmap.data.load_heldout`.
    `bos_id`: perplexity windows start with this BOS token (`gradmap.windows`). lm-eval encodes its requests with
    the tokenizer's own special tokens (Gemma's adds `<bos>`: the record's `windows.tokenizer_adds_bos`).
    Returns {"perplexity": {name: {"corpus", "split", "seq_lens": {"<seq_len>": perplexity(...)}}},
    "lm_eval": run_lm_eval(...) or {}}; an empty `lm_eval.tasks` skips lm-eval.
    """
    results: dict[str, Any] = {"perplexity": {}, "lm_eval": {}}
    ppl = evaluation.perplexity
    seq_lens = list(ppl.seq_lens)
    if seq_lens and not heldout:
        raise ValueError(f"eval.perplexity.seq_lens={seq_lens} but no held-out text was given (eval.heldout.texts)")
    for text in heldout if seq_lens else ():  # all checked before any is evaluated
        if text.token_ids.numel() < max(seq_lens):
            raise ConfigError(f"eval.heldout.texts.{text.name}", f"{text.corpus}/{text.split}", f"a text of at least "
                              f"max(eval.perplexity.seq_lens) = {max(seq_lens)} tokens",
                              problem=f"it has {text.token_ids.numel()} tokens, fewer than one window")
    for text in heldout if seq_lens else ():
        results["perplexity"][text.name] = {"corpus": text.corpus, "split": text.split, "seq_lens": {
            str(int(seq_len)): perplexity(model, text.token_ids, int(seq_len), batch_size=int(ppl.batch_size),
                                          max_windows=ppl.max_windows, bos_id=bos_id)
            for seq_len in seq_lens}}

    lm = evaluation.lm_eval
    tasks = [str(t) for t in lm.tasks]
    if tasks:
        with tempfile.TemporaryDirectory(prefix="gradmap_tasks_") as tmp:
            local = _local_task_files(lm.local_tasks, tasks, Path(tmp))
            results["lm_eval"] = run_lm_eval(model, tokenizer, tasks, batch_size=int(lm.batch_size), limit=lm.limit,
                                             num_fewshot=lm.num_fewshot, seed=int(lm.seed), local_tasks=local)
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
