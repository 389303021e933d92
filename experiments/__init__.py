"""Experiment tooling that reads finished sweeps (not part of the installed `gradmap` package)."""
