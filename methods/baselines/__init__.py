"""Baseline layer-pruning methods: metrics and compensations from earlier papers, one file per method."""
