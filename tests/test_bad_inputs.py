"""The bad-input battery: `python run.py ...` as a user runs it, with bad values and faults of every class.

Each case asserts exit code 2, exactly one line on stderr that names the key, no traceback, the details in the
run's record.json (where a run folder exists), and that nothing outside the run's folder changed (every file and
folder under the test's tmp dir, which holds the cache, the working directory, the data and the save targets, is
snapshotted before and after). Most cases are refused at validation before torch is imported (~0.5 s each).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "tiny_text.jsonl"
BASE = ["model=tiny_random", "calibration=tiny", "eval=tiny", "logger=none", "cache_dir={cache}",
        "hydra.run.dir={run}", f"calibration.path={TEXT}", f"eval.heldout.texts.tiny.path={TEXT}"]


# ---------------------------------------------------------------------------------------------- set-ups

def _fake_model_asset(cache: Path, manifest: bool = True) -> Path:
    """An offline `smollm2_135m` folder that looks finished (marker, config, tokenizer, weights, manifest)."""
    import torch
    from safetensors.torch import save_file

    from gradmap import assets

    folder = cache / "smollm2_135m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 6,
                                                    "max_position_embeddings": 512}))
    (folder / "tokenizer.json").write_text("{}")
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(folder / "model.safetensors"))
    if manifest:
        assets.write_manifest(folder)
    (folder / ".complete").write_text(assets.marker_text(assets.ASSETS["smollm2_135m"]))
    return folder


def truncated_weights(tmp: Path) -> None:
    weights = _fake_model_asset(tmp / "cache") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])


def flipped_weights(tmp: Path) -> None:
    weights = _fake_model_asset(tmp / "cache") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


def truncated_legacy_weights(tmp: Path) -> None:  # built before manifests existed: the header says the size
    weights = _fake_model_asset(tmp / "cache", manifest=False) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])


def missing_tokenizer(tmp: Path) -> None:
    (_fake_model_asset(tmp / "cache") / "tokenizer.json").unlink()


def non_empty_folder(tmp: Path) -> None:
    (tmp / "out" / "precious").mkdir(parents=True)
    (tmp / "out" / "precious" / "notes.txt").write_text("keep me")


def a_file(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "file.txt").write_text("a file")


def a_folder(tmp: Path) -> None:
    (tmp / "out" / "dir").mkdir(parents=True)


def bad_jsonl(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "bad.jsonl").write_text('{"text": "fine"}\nnot json at all\n')


def job_running_elsewhere(tmp: Path) -> None:
    """A record.json whose job is running in a live process (this test's own)."""
    from gradmap.jobs import process_start

    run = tmp / "run"
    run.mkdir()
    (run / "record.json").write_text(json.dumps({"status": "running", "attempts": [
        {"status": "running", "pid": os.getpid(), "host": socket.gethostname(),
         "process_start": process_start(os.getpid())}]}))


def victim_file(tmp: Path) -> None:
    """A file outside the run that a hostile `_target_` would truncate or delete."""
    (tmp / "out").mkdir()
    (tmp / "out" / "victim.txt").write_text("precious")


def git_work_tree(tmp: Path) -> None:
    (tmp / "repo" / ".git").mkdir(parents=True)
    (tmp / "repo" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp / "repo" / "code.py").write_text("print('mine')\n")


def checkpoint_with_git_inside(tmp: Path) -> None:
    (tmp / "ckpt" / "sub" / ".git").mkdir(parents=True)
    (tmp / "ckpt" / "pruning_info.json").write_text("{}")


def data_folder(tmp: Path) -> None:
    """Inputs in a folder of their own (which save_dir must never replace); it looks like a checkpoint, too."""
    (tmp / "data").mkdir()
    shutil.copy(TEXT, tmp / "data" / "calib.jsonl")
    (tmp / "data" / "pruning_info.json").write_text("{}")
    (tmp / "data" / "short.jsonl").write_text('{"text": "too short"}\n')
    (tmp / "data" / "latin1.jsonl").write_bytes('{"text": "caf\u00e9 au lait, cr\u00e8me br\u00fbl\u00e9e"}\n'
                                                 .encode("latin-1") * 40)
    (tmp / "data" / "binary.jsonl").write_bytes(bytes(range(256)) * 16)


_HELD: list = []  # locks this test process holds for a case (released at the case's end)


def run_folder_locked(tmp: Path) -> None:
    """Another process owns the run folder: its lock is held (here, by this test process)."""
    import fcntl

    (tmp / "run").mkdir()
    fh = open(tmp / "run" / ".gradmap.lock", "w")
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    _HELD.append(fh)


# ------------------------------------------------------------------------------------------------ cases
# (id, class, overrides, key the line must name, set-up). Placeholders: {tmp}, {cache}, {run}; "!key" drops the
# base override of that key.

CASES = [
    # type: a value of the wrong type, named with its key (not Python's "invalid literal for int()")
    ("ratio_text", "type", ["prune_ratio=abc"], "prune_ratio", None),
    ("num_prune_fraction", "type", ["num_prune=2.5"], "num_prune", None),
    ("seed_fraction", "type", ["seed=1.5"], "seed", None),
    ("samples_text", "type", ["calibration.num_samples=many"], "calibration.num_samples", None),
    ("seq_len_fraction", "type", ["calibration.seq_len=16.5"], "calibration.seq_len", None),
    ("ppl_batch_text", "type", ["eval.perplexity.batch_size=x"], "eval.perplexity.batch_size", None),
    ("force_not_bool", "type", ["force=maybe"], "force", None),
    ("cache_selection_int", "type", ["cache_selection=2"], "cache_selection", None),
    ("seq_lens_fraction", "type", ["eval.perplexity.seq_lens=[16.5]"], "eval.perplexity.seq_lens", None),
    ("tiny_layers_text", "type", ["model.config.num_layers=six"], "model.config.num_layers", None),
    ("metric_bool_text", "type", ["metric.iterative=yes"], "metric.iterative", None),
    ("comp_alpha_text", "type", ["compensation.alpha=high"], "compensation.alpha", None),
    # range: negative sizes, zero, beyond the bounds
    ("ratio_zero", "range", ["prune_ratio=0"], "prune_ratio", None),
    ("ratio_above_one", "range", ["prune_ratio=1.5"], "prune_ratio", None),
    ("num_prune_zero", "range", ["num_prune=0"], "num_prune", None),
    ("micro_batch_negative", "range", ["calibration.batch_size=-1"], "calibration.batch_size", None),
    ("micro_batch_zero", "range", ["calibration.batch_size=0"], "calibration.batch_size", None),
    ("samples_zero", "range", ["calibration.num_samples=0"], "calibration.num_samples", None),
    ("seq_len_one", "range", ["calibration.seq_len=1"], "calibration.seq_len", None),
    ("max_tokens_zero", "range", ["eval.heldout.max_tokens=0"], "eval.heldout.max_tokens", None),
    ("max_windows_negative", "range", ["eval.perplexity.max_windows=-3"], "eval.perplexity.max_windows", None),
    ("seed_negative", "range", ["seed=-1"], "seed", None),
    ("limit_fraction_above_one", "range", ["eval.lm_eval.limit=2.5"], "eval.lm_eval.limit", None),
    ("protect_negative", "range", ["metric.protect_first=-1"], "metric.protect_first", None),
    ("alpha_negative", "range", ["compensation.alpha=-1"], "compensation.alpha", None),
    ("epochs_zero", "range", ["compensation=streamline_layer", "compensation.epochs=0"], "compensation.epochs",
     None),
    # choice: a value outside the allowed set
    ("reduction_unknown", "choice", ["metric.reduction=foo"], "metric.reduction", None),
    ("accum_dtype_unknown", "choice", ["metric=bi", "metric.accum_dtype=float8"], "metric.accum_dtype", None),
    ("sites_unknown", "choice", ["compensation.sites=nowhere"], "compensation.sites", None),
    ("dtype_unknown", "choice", ["dtype=int8"], "dtype", None),
    ("calibration_class_unknown", "choice", ["calibration._target_=gradmap.models.HubModel"], "calibration._target_",
     None),
    ("corpus_unknown", "choice", ["eval.heldout.texts.tiny.corpus=books"], "eval.heldout.texts.tiny.corpus", None),
    ("device_unknown", "choice", ["device=tpu"], "device", None),
    ("wandb_mode_unknown", "choice", ["logger=wandb", "logger.mode=sometimes"], "logger.mode", None),
    # model: consistency with the model's config (6 layers, 512 positions), protected layers vs removals
    ("num_prune_all_layers", "model", ["num_prune=6"], "num_prune", None),
    ("seq_len_beyond_model", "model", ["calibration.seq_len=1024"], "calibration.seq_len", None),
    ("ppl_window_beyond_model", "model", ["eval.perplexity.seq_lens=[4096]"], "eval.perplexity.seq_lens", None),
    ("all_layers_protected", "model", ["metric.protect_first=3", "metric.protect_last=3"], "metric.protect_first",
     None),
    ("sleb_protected_budget", "model", ["metric=sleb", "num_prune=5"], "num_prune", None),
    ("span_does_not_fit", "model", ["metric=streamline", "num_prune=5", "metric.protect_last=1"], "num_prune", None),
    ("ratio_too_high_for_protection", "model", ["metric=sleb", "prune_ratio=0.75"], "prune_ratio", None),
    ("heldout_shorter_than_window", "model", ["eval.heldout.max_tokens=8"], "eval.heldout.max_tokens", None),
    ("replaceme_too_few_tokens", "model", ["compensation=replaceme", "calibration.num_samples=1"],
     "compensation.alpha", None),
    ("tuning_reads_test", "model", ["tuning=true"], "eval.heldout.texts.tiny.split", None),
    # device: not available on this machine
    ("cuda_index_missing", "device", ["device=cuda:99"], "device", None),
    ("mps_missing", "device", ["device=mps"], "device", None),
    # task: lm-eval tasks that do not exist or cannot run
    ("lm_eval_task_unknown", "task", ["eval.lm_eval.tasks=[no_such_task_xyz]"], "eval.lm_eval.tasks", None),
    ("local_task_template_missing", "task",
     ["eval.lm_eval.tasks=[mytask]",
      "+eval.lm_eval.local_tasks.mytask={template:nosuch,data:null,asset:null,file:null}"],
     "eval.lm_eval.local_tasks.mytask.template", None),
    ("lm_eval_with_byte_tokenizer", "task", ["eval.lm_eval.tasks=[boolq]"], "eval.lm_eval.tasks", None),
    # hydra: composition and instantiation errors, the same one line and exit 2
    ("metric_option_unknown", "hydra", ["metric=nosuch"], "metric", None),
    ("compensation_option_unknown", "hydra", ["compensation=nowhere"], "compensation", None),
    ("top_key_typo", "hydra", ["prune_rato=0.3"], "prune_rato", None),
    ("metric_key_unknown", "hydra", ["+metric.foo=1"], "metric.foo", None),
    ("metric_target_unknown", "hydra", ["metric._target_=no.such.Class"], "metric._target_", None),
    ("interpolation_broken", "hydra", ["seed=${oops}"], "seed", None),
    # asset: missing (the line says the command that builds it) or corrupt (verified before loading)
    ("model_asset_missing", "asset", ["model=smollm2_135m"], "model.asset", None),
    ("wiki_asset_missing", "asset", ["!calibration.path", "calibration=wiki_offline"], "calibration.path", None),
    ("heldout_asset_missing", "asset", ["!eval.heldout.texts.tiny.path", "eval=offline"],
     "eval.heldout.texts.wiki_test.corpus", None),
    ("weights_truncated", "asset", ["model=smollm2_135m"], "model.asset", truncated_weights),
    ("weights_bit_flipped", "asset", ["model=smollm2_135m"], "model.asset", flipped_weights),
    ("weights_truncated_legacy", "asset", ["model=smollm2_135m"], "model.asset", truncated_legacy_weights),
    ("asset_file_missing", "asset", ["model=smollm2_135m"], "model.asset", missing_tokenizer),
    # path: data files that are missing, not files, or not JSONL
    ("calibration_file_missing", "path", ["calibration.path={tmp}/nope.jsonl"], "calibration.path", None),
    ("calibration_path_folder", "path", ["calibration.path={tmp}/out/dir"], "calibration.path", a_folder),
    ("heldout_file_missing", "path", ["eval.heldout.texts.tiny.path={tmp}/nope.jsonl"],
     "eval.heldout.texts.tiny.path", None),
    ("calibration_not_jsonl", "path", ["calibration.path={tmp}/out/bad.jsonl"], "calibration.path", bad_jsonl),
    # save: unsafe or unwritable save paths, checked before any work
    ("save_inside_cache", "save", ["save_dir={cache}/pruned"], "save_dir", None),
    ("save_around_cache", "save", ["save_dir={tmp}"], "save_dir", None),
    ("save_non_empty", "save", ["save_dir={tmp}/out/precious"], "save_dir", non_empty_folder),
    ("save_is_file", "save", ["save_dir={tmp}/out/file.txt"], "save_dir", a_file),
    ("save_under_file", "save", ["save_dir={tmp}/out/file.txt/model"], "save_dir", a_file),
    ("save_empty_path", "save", ["save_dir=''"], "save_dir", None),
    ("save_over_working_dir", "save", ["save_dir=.", "save_overwrite=true"], "save_dir", None),
    ("cache_dir_is_file", "save", ["cache_dir={tmp}/out/file.txt"], "cache_dir", a_file),
    # fault: the job folder belongs to a live process, or cannot be created
    ("job_running_elsewhere", "fault", [], "hydra.run.dir", job_running_elsewhere),
    ("run_dir_under_file", "fault", ["!hydra.run.dir", "hydra.run.dir={tmp}/out/file.txt/run"], "hydra.run.dir",
     a_file),
]
# Second round (issue 16): one class per rule. target: only known classes are built, refused before any import;
# save: save_dir replaces only what gradmap wrote; compose: strict composition; honest: runs that cannot be what
# they say; owner: one process per run folder; bounded/early: input read in bounded pieces, faults said early in
# one line naming the key.
CASES += [
    ("target_builtin_open", "target", ["metric._target_=builtins.open", "+metric.file={tmp}/out/victim.txt",
                                       "+metric.mode=w"], "metric._target_", victim_file),
    ("target_os_system", "target",
     ["compensation._target_=os.system", "+compensation.command='rm {tmp}/out/victim.txt'"],
     "compensation._target_", victim_file),
    ("target_rmtree_logger", "target", ["logger._target_=shutil.rmtree", "+logger.path={tmp}/out"], "logger._target_",
     victim_file),
    ("target_popen_model", "target", ["model._target_=subprocess.Popen"], "model._target_", None),
    ("target_project_function", "target", ["metric._target_=gradmap.files.atomic_write_text",
                                           "+metric.path={tmp}/out/victim.txt", "+metric.text=gone"],
     "metric._target_", victim_file),
    ("target_unlink_eval", "target", ["eval._target_=pathlib.Path.unlink"], "eval._target_", None),
    ("save_git_work_tree", "save", ["save_dir={tmp}/repo", "save_overwrite=true"], "save_dir", git_work_tree),
    ("save_inside_git_folder", "save", ["save_dir={tmp}/repo/.git/model"], "save_dir", git_work_tree),
    ("save_holds_calibration_file", "save", ["!calibration.path", "calibration.path={tmp}/data/calib.jsonl",
                                             "save_dir={tmp}/data", "save_overwrite=true"], "save_dir", data_folder),
    ("save_holds_heldout_file", "save", ["!eval.heldout.texts.tiny.path", "eval.heldout.texts.tiny.path="
                                         "{tmp}/data/calib.jsonl", "save_dir={tmp}/data", "save_overwrite=true"],
     "save_dir", data_folder),
    ("save_over_tests_folder", "save", ["save_dir={root}/tests", "save_overwrite=true"], "save_dir", None),
    ("save_over_foreign_folder", "save", ["save_dir={tmp}/out/precious", "save_overwrite=true"], "save_dir",
     non_empty_folder),
    ("save_over_cwd_parent", "save", ["save_dir=..", "save_overwrite=true"], "save_dir", None),
    ("save_checkpoint_holding_git", "save", ["save_dir={tmp}/ckpt", "save_overwrite=true"], "save_dir",
     checkpoint_with_git_inside),
    ("plus_top_level_typo", "compose", ["+prune_rato=0.9"], "prune_rato", None),
    ("plus_nested_typo", "compose", ["+eval.heldout.max_token=5"], "eval.heldout.max_token", None),
    ("experiment_misspelled", "compose", ["experiment=paper_mian"], "experiment", None),
    ("group_given_twice", "compose", ["metric=bi", "metric=gradmap"], "metric", None),
    ("value_given_twice", "compose", ["seed=1", "seed=2"], "seed", None),
    ("metric_key_deleted", "compose", ["~metric.target"], "metric.target", None),
    ("compensation_key_deleted", "compose", ["~compensation.alpha"], "compensation.alpha", None),
    ("top_key_deleted", "compose", ["~cache_selection"], "cache_selection", None),
    ("extra_keys_not_a_list", "compose", ["extra_keys=5"], "extra_keys", None),
    ("lexer_tilde", "compose", ["seed=~1"], "seed", None),
    ("lexer_zero_width", "compose", ["seed=1\u200b"], "seed", None),
    ("lexer_full_width_digit", "compose", ["num_prune=\uff11"], "num_prune", None),
    ("calibration_beyond_supply", "honest", ["calibration.num_samples=1024"], "calibration.num_samples", None),
    ("perplexity_windows_empty", "honest", ["eval.perplexity.seq_lens=[]"], "eval.perplexity.seq_lens", None),
    ("heldout_text_shorter_than_window", "honest", ["!eval.heldout.texts.tiny.path", "eval.heldout.max_tokens=null",
                                                    "eval.heldout.texts.tiny.path={tmp}/data/short.jsonl"],
     "eval.heldout.texts.tiny", data_folder),
    ("run_folder_locked", "owner", [], "hydra.run.dir", run_folder_locked),
    ("sweep_folder_locked", "owner", ["-m", "!hydra.run.dir", "hydra.sweep.dir={run}", "num_prune=1,2"],
     "hydra.sweep.dir", run_folder_locked),
    ("calibration_latin1", "bounded", ["!calibration.path", "calibration.path={tmp}/data/latin1.jsonl"],
     "calibration.path", data_folder),
    ("calibration_binary", "bounded", ["!calibration.path", "calibration.path={tmp}/data/binary.jsonl"],
     "calibration.path", data_folder),
]
# Besides Hydra's composition errors, the cases that stop before the job starts (no record.json): a run folder
# under a file, an override Hydra cannot parse, a run folder another process owns.
NO_RUN_FOLDER = {"run_dir_under_file", "lexer_tilde", "lexer_zero_width", "lexer_full_width_digit",
                 "run_folder_locked", "sweep_folder_locked"}


def snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == skip or skip in here.parents:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = here / name
            if path == skip:
                continue
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_mode, st.st_size if path.is_file() else None,
                                                st.st_mtime_ns if path.is_file() else None)
    return out


def cli_args(overrides: list[str], **places: Path) -> list[str]:
    # An override replaces the base's value of its key ("!key" drops it): the same key twice is refused.
    drop = {o[1:] for o in overrides if o.startswith("!")} | {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    flags = [o for o in overrides if o.startswith("-")]  # Hydra's own flags (-m) come before the overrides
    args = flags + [a for a in BASE if a.split("=", 1)[0] not in drop] + [o for o in overrides
                                                                         if not o.startswith(("!", "-"))]
    for name, value in places.items():
        args = [a.replace("{" + name + "}", str(value)) for a in args]
    return args


def run_cli(args: list[str], cwd: Path, env_extra: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update({"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1", **(env_extra or {})})
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_battery_covers_every_class_more_than_once():
    classes: dict[str, int] = {}
    for _, cls, *_ in CASES:
        classes[cls] = classes.get(cls, 0) + 1
    assert len(CASES) >= 40 + 33
    assert set(classes) == {"type", "range", "choice", "model", "device", "task", "hydra", "asset", "path", "save",
                            "fault", "target", "compose", "honest", "owner", "bounded"}
    assert all(n >= 2 for n in classes.values()), classes


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, tmp_path):
    name, _cls, overrides, key, setup = case
    work, cache, run = tmp_path / "work", tmp_path / "cache", tmp_path / "run"
    work.mkdir()
    (tmp_path / "home_cache").mkdir()
    if setup is not None:
        setup(tmp_path)
    args = cli_args(overrides, tmp=tmp_path, cache=cache, run=run, root=ROOT)
    record_before = (run / "record.json").read_text() if (run / "record.json").exists() else None
    before = snapshot(tmp_path, run)
    tests_before = snapshot(ROOT / "tests", ROOT / "tests" / "__pycache__")

    try:
        proc = run_cli(args, work, {"GRADMAP_CACHE": str(tmp_path / "home_cache")})
    finally:
        while _HELD:
            _HELD.pop().close()

    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:], proc.stdout[-1000:])
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert lines[0].startswith("[gradmap] error: ")
    if _cls == "hydra":  # Hydra's own message, made one line: the key is in it
        assert key in lines[0], (key, lines[0])
    else:  # ours: the line starts with the key
        assert lines[0].startswith(f"[gradmap] error: {key}"), (key, lines[0])
    assert snapshot(tmp_path, run) == before, "something outside the run folder changed"
    assert snapshot(ROOT / "tests", ROOT / "tests" / "__pycache__") == tests_before, "the project's tests/ changed"
    record = run / "record.json"
    if record_before is not None:  # the live job's record is not touched
        assert record.read_text() == record_before
    elif record.exists():  # a run folder exists: the details are in its record
        rec = json.loads(record.read_text())
        assert rec["status"] == "failed"
        assert key in rec["error"]["key"] or key in rec["error"]["message"], rec["error"]
        assert rec["attempts"][-1]["status"] == "failed" and rec["attempts"][-1]["reason"]
    else:  # only Hydra's own composition errors come before the run folder exists
        assert _cls == "hydra" or name in NO_RUN_FOLDER, name


def test_cache_dir_moves_the_asset_cache(tmp_path):
    """`cache_dir=` is where assets are looked for (not only the selection cache): the missing-asset line names it
    and the command that builds the asset there."""
    (tmp_path / "work").mkdir()
    args = cli_args(["model=smollm2_135m"], cache=tmp_path / "c", run=tmp_path / "run")
    proc = run_cli(args, tmp_path / "work")
    assert proc.returncode == 2
    assert f"GRADMAP_CACHE={tmp_path / 'c'} python -m gradmap.assets smollm2_135m" in proc.stderr
    shutil.rmtree(tmp_path / "run")
