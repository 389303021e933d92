"""The layer-pruning methods: GradMAP (`methods.gradmap`, the paper's metric and projection as implemented here, and
gradmap_verify beyond it) and the baselines it is compared with (`methods.baselines`). One file per metric or
compensation, each the `_target_` of one YAML in `conf/metric/` or `conf/compensation/` (the Hydra group is the
registry). Methods build on the framework (`gradmap/`); no framework module imports a method."""
