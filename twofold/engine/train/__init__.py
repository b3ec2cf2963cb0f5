"""Training: the policy model (FSDP2), LM heads, packing, the optimizer step and the no-grad scorer, sharded
checkpoints, the distributed environment, and tiny models for tests and the demo."""
