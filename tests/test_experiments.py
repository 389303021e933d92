"""Every job of every `conf/experiment/*.yaml` sweep composes and builds its metric and compensation (seconds, no
model): an experiment that only fails when a researcher launches it costs them a whole sweep."""

from __future__ import annotations

import itertools
from pathlib import Path

import hydra.utils
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import run  # noqa: F401  (registers the `split` resolver the experiments use)
from gradmap.compensation import Compensation
from gradmap.metric import LayerMetric

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def sweep_jobs(name: str) -> list[list[str]]:
    """The override lists of every job the experiment's sweep launches (the basic sweeper's cartesian product)."""
    params = OmegaConf.load(CONF / "experiment" / f"{name}.yaml").hydra.sweeper.params
    axes = [[f"{key}={v.strip()}" for v in str(values).split(",")] for key, values in params.items()]
    return [list(job) for job in itertools.product(*axes)]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_job_of_the_experiment_builds(name):
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert f"python run.py -m experiment={name}" in text  # the header gives the command
    jobs = sweep_jobs(name)
    assert len(jobs) > 1
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for job in jobs:
            cfg = compose("config", overrides=[f"experiment={name}", *job])
            metric = hydra.utils.instantiate(cfg.metric)
            compensation = hydra.utils.instantiate(cfg.compensation)
            assert isinstance(metric, LayerMetric), (job, type(metric))
            assert isinstance(compensation, Compensation), (job, type(compensation))
            assert cfg.logger.get("group") == name
            for override in job:  # each swept value really reaches the config
                key, value = override.lstrip("+").split("=", 1)
                if "." in key:
                    assert str(OmegaConf.select(cfg, key)).lower() == value.lower(), override


def test_speed_experiment_times_uncompensated_uncached_scoring():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=speed"])
    assert cfg.compensation._target_.endswith("NoCompensation")
    assert cfg.cache_selection is False
    assert list(cfg.eval.lm_eval.tasks) == []


TUNING = ("ablation_gradmap", "ablation_projection", "choose_verify_k", "choose_verify_budget", "choose_verify_kl",
          "choose_verify_4k", "choose_postnorm_projection")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_tuning_experiments_read_validation_only_and_reports_read_test(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}"])
    splits = {spec.split for spec in cfg.eval.heldout.texts.values()}
    if name in TUNING:  # experiments that choose defaults: validation only, and the loader refuses test
        assert cfg.tuning is True and splits == {"validation"}
    else:  # report tables: test text only
        assert cfg.tuning is False and splits == {"test"}
