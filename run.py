"""Entry point: one Hydra job = one pruning run (see README). Examples:

    python run.py                                   # offline default: SmolLM2-135M, GradMAP, projection
    python run.py -m metric=gradmap,bi prune_ratio=0.25,0.375
    python run.py model=llama3_8b calibration=hub eval=zeroshot7 device=cuda
"""

import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

# `${split:a-b,1}` -> "b": lets one sweep axis set two coupled options (see conf/experiment/ablation_gradmap.yaml).
OmegaConf.register_new_resolver("split", lambda value, index: str(value).split("-")[int(index)], replace=True)


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f"received signal {signum}")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from gradmap.compensation import IncompatibleCompensationError
    from gradmap.runner import GROUPS, run

    signal.signal(signal.SIGTERM, _interrupt)  # a killed job still records status=failed
    hc = HydraConfig.get()
    choices = {g: hc.runtime.choices.get(g) for g in GROUPS}
    try:
        run(cfg, hc.runtime.output_dir, choices)
    except (IncompatibleCompensationError, ValueError) as err:
        # A bad pairing or value: one clear line, not a traceback. record.json keeps the details.
        print(f"[gradmap] error: {err}", file=sys.stderr)
        if hc.mode != RunMode.MULTIRUN:  # in a sweep, the other jobs still run
            sys.exit(2)
    except Exception as err:  # noqa: BLE001
        if hc.mode != RunMode.MULTIRUN:
            raise
        print(f"[gradmap] job failed ({type(err).__name__}: {err}); see record.json", file=sys.stderr)


if __name__ == "__main__":
    main()
