"""The run layer: the command-line entry points (`train`, `eval`, `export`, `demo`), the config schema and its
parsing, the run directory's policy, the online loop that drives rollout and training, and metrics tracking.
Everything below it (`data`, `rollout`, `train`, `verifier`) is importable without it."""
