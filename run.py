"""Entry point: one Hydra job = one pruning run (see README). Examples:

    python run.py                                   # offline default: SmolLM2-135M, GradMAP, projection
    python run.py -m metric=gradmap,bi prune_ratio=0.25,0.375
    python run.py model=llama3_8b calibration=hub eval=zeroshot7 device=cuda

Exit codes: 0 done (or skipped: already done), 2 a refused value or a fault the user can fix (one line on stderr,
the details in the run's record.json; Hydra's own composition errors too), 1 an unexpected error (its traceback in
record.json) or a sweep with failed jobs, 130 / 143 interrupted by Ctrl-C / SIGTERM.
"""

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

# `${split:a-b,1}` -> "b": lets one sweep axis set two coupled options (see conf/experiment/ablation_gradmap.yaml).
OmegaConf.register_new_resolver("split", lambda value, index: str(value).split("-")[int(index)], replace=True)
# A sweep job's folder name: one path component whatever the values (gradmap.overrides.safe_dirname).
OmegaConf.register_new_resolver("safe_dirname", lambda text: __import__("gradmap.overrides").overrides.safe_dirname(
    text), replace=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from gradmap.jobs import install_signal_handlers, report, run_job
    from gradmap.validation import GROUPS

    install_signal_handlers()  # Ctrl-C and SIGTERM end the job with a recorded reason
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    choices = {g: hc.runtime.choices.get(g) for g in GROUPS}
    choices["experiment"] = hc.runtime.choices.get("experiment")
    sweep_dir = hc.sweep.dir if multirun else None
    overrides = OmegaConf.to_container(hc.overrides.task, resolve=False)  # as typed: `seed=${oops}` is a value
    result = run_job(cfg, hc.runtime.output_dir, choices, overrides=overrides, sweep_dir=sweep_dir)
    report(result, multirun)
    if result.status == "interrupted":
        raise SystemExit(result.exit_code)  # stops a sweep too: the remaining jobs are not started
    if result.exit_code and not multirun:  # in a sweep the other jobs still run; the summary lists this one
        raise SystemExit(result.exit_code)
    return result.status


def hydra_error_line(err: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line composition errors as one line (the key is in the message)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    from gradmap.errors import one_line
    from gradmap.overrides import lexer_error_line

    if isinstance(err, OverrideParseException):
        line = lexer_error_line([a for a in sys.argv[1:] if not a.startswith("-")])
        if line is not None:
            return one_line(line)
    if isinstance(err, MissingConfigException) and getattr(err, "options", None):
        first = str(err).strip().splitlines()[0]
        return one_line(f"{first}; allowed: {', '.join(err.options)}")
    parts = [str(err)]
    cause = err.__cause__
    if cause is not None and str(cause) not in parts[0]:
        parts.append(str(cause))
    text = ""
    for part in parts:
        for line in part.splitlines():
            line = line.strip()
            if not line or line.startswith(("object_type=", "full_key:", "Set the environment variable")):
                continue
            text += ("" if not text else " " if text.endswith((".", ":", ";")) else "; ") + line
    return one_line(text)


def cli() -> int:
    """Run Hydra with its errors raised to us (HYDRA_FULL_ERROR), so a bad override is one line and exit 2, and a
    sweep's exit code says whether every job finished."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    import gradmap.sweep
    from gradmap.jobs import quiet_broken_pipe
    from gradmap.runfolder import FolderTaken

    user_wants_traces = bool(os.environ.get("HYDRA_FULL_ERROR"))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    quiet_broken_pipe()  # `run.py | head -1`: the run goes on, its output to /dev/null once the reader is gone
    try:
        main()
    except KeyboardInterrupt as err:  # outside a job (e.g. during Hydra's set-up)
        print(f"[gradmap] interrupted: {err or 'Ctrl-C'}", file=sys.stderr)
        return 130
    except FolderTaken as taken:  # the run (or sweep) folder belongs to another process: refused before any write
        print(f"[gradmap] error: {taken.error}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as err:
        if user_wants_traces:
            raise
        print(f"[gradmap] error: {hydra_error_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # Hydra could not create or write the output folder
        if user_wants_traces:
            raise
        key = "hydra.sweep.dir" if any(a in ("-m", "--multirun") for a in sys.argv[1:]) else "hydra.run.dir"
        print(f"[gradmap] error: {key}: the output folder cannot be written ({err})", file=sys.stderr)
        return 2
    summary = gradmap.sweep.LAST_SUMMARY
    if summary is not None and summary.failed:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
