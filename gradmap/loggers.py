"""The logger group (`conf/logger/*.yaml`): experiment loggers. `record.json` is the source of truth; a logger only
mirrors it (W&B, or nothing).

`NullLogger` and `WandbLogger` are the YAMLs' `_target_`s: their fields are the YAML's keys, without defaults.
Validation builds one (cheap: no import of wandb); the run calls its `start`, which opens the W&B run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from gradmap.record import RunRecord
from gradmap.schema import WANDB_MODES, option


def decision_row(decision: Any, cached: bool = False) -> dict[str, Any]:
    """One pruning decision as a flat W&B step: its chosen layer(s) and every layer's score."""
    d = decision if isinstance(decision, dict) else vars(decision)
    row: dict[str, Any] = {"decision/step": d["step"], "decision/cached": cached,
                           "decision/removed_layer": d["removed"][0] if len(d["removed"]) == 1 else None,
                           "decision/num_removed": len(d["removed"]), "decision/seconds": d.get("seconds", 0.0)}
    row.update({f"decision/score/layer_{i:03d}": s for i, s in enumerate(d["scores"]) if s is not None})
    return row


@dataclass
class NullLogger:
    """No experiment logger (conf/logger/none.yaml): record.json is still written."""

    def start(self, config: Mapping[str, Any], out_dir: Path, choices: dict[str, str]) -> NullLogger:
        return self

    def log_decision(self, decision: Any, cached: bool = False) -> None:
        pass

    def log_run(self, rec: RunRecord, plot: Path | None) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


@dataclass
class WandbLogger:
    """Mirrors config, stage times, the per-layer score chart and the results to Weights & Biases
    (conf/logger/wandb.yaml). `mode: offline` needs no login; `wandb sync <dir>` uploads later."""

    project: str = option()
    entity: Optional[str] = option()
    mode: str = option(choices=WANDB_MODES)
    group: Optional[str] = option()  # e.g. the experiment name, to group a sweep's runs
    tags: list[str] = option()
    name: Optional[str] = option()  # null: <model>-<metric>-<compensation>, then -r<prune_ratio>

    def start(self, config: Mapping[str, Any], out_dir: Path, choices: dict[str, str]) -> WandbLogger:
        """Open the W&B run; `config`: the run's resolved config (`Checked.config`)."""
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.wandb = wandb
        name = self.name or "-".join(f"{choices.get(g)}" for g in ("model", "metric", "compensation"))
        self.run = wandb.init(
            project=self.project, entity=self.entity, mode=self.mode, group=self.group, tags=list(self.tags or []),
            name=f"{name}-r{config.get('prune_ratio')}", dir=str(out_dir),
            config={**config, "choices": choices}, reinit="finish_previous")
        return self

    def log_decision(self, decision: Any, cached: bool = False) -> None:
        """Each pruning decision as its own step, as soon as it is made (`cached`: replayed from the cache)."""
        self.run.log(decision_row(decision, cached))

    def log_run(self, rec: RunRecord, plot: Path | None) -> None:
        wandb, t = self.wandb, rec.timings
        summary: dict[str, Any] = {f"time/{k}": v for k, v in t["seconds"].items()}
        summary["time/pruning"] = t["pruning_seconds"]
        summary.update({f"cost/{k}": v for k, v in t["pruning_cost"].items()})
        for side in ("dense", "pruned"):
            summary.update({f"{side}/{k}": v for k, v in rec.results["headline"][side].items()})
        summary.update({f"retained_pct/{k}": v for k, v in rec.results["retained_pct"].items()})
        summary["removed_layers"] = rec.removed_layers
        self.run.summary.update(summary)
        first = rec.selection["decisions"][0]
        table = wandb.Table(columns=["layer", "score"],
                            data=[[i, s] for i, s in enumerate(first["scores"]) if s is not None])
        log = {"scores/first_decision": wandb.plot.bar(table, "layer", "score", title="per-layer importance")}
        if plot is not None:
            log["scores/all_decisions"] = wandb.Image(str(plot))
        self.run.log(log)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "done" else 1)
