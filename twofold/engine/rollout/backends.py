"""The sampler factory: `sampler.backend` -> the backend class. It sits above the interface (`sampler`) and the
backends (`sampler_vllm`, `sampler_hf`), which import only the interface; vLLM is imported when its backend is built."""
from __future__ import annotations

from twofold.engine.rollout.sampler import Sampler, SamplerConfig


def build_sampler(cfg: SamplerConfig, model_path: str, rank: int = 0) -> Sampler:
    """`model_path` needs config.json and the tokenizer; weights only with load_format=auto."""
    if cfg.backend == "vllm":
        from twofold.engine.rollout.sampler_vllm import VLLMSampler
        return VLLMSampler(cfg, model_path, rank)
    if cfg.backend == "transformers":
        from twofold.engine.rollout.sampler_hf import HFSampler
        return HFSampler(cfg, model_path, rank)
    raise ValueError(f"sampler.backend must be vllm or transformers, got {cfg.backend!r}")
