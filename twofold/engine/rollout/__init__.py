"""Rollouts: the sampler interface and its backends (in-process vLLM, transformers), weight sync into the sampler,
turning verified samples into training sequences, rollout corrections, and OREAL's token reward model."""
