"""gradmap: layer pruning for LLMs, centred on GradMAP (arXiv 2602.14649), with baselines and Hydra sweeps."""

__version__ = "0.1.0"
