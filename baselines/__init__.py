"""Baseline layer-importance metrics, one file per paper, each a `gradmap.metric.LayerMetric`.

Each has a config in `conf/metric/` (`python run.py metric=<name>`): bi (ShortGPT), taylor / taylor_plus and ppl
(Shortened LLaMA), sleb (SLEB), streamline (LLM-Streamline), angular (Gromov et al.), random.
"""
