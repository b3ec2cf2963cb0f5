"""Rollout sampler: one interface, two backends (vLLM in-process, transformers `generate`), fed by weight sync.

A sampler generates n samples per prompt and returns, per prompt, a group of `Sample`s: token ids, text, why the
sample ended and, on request, the sampler's log-prob of every sampled token. Prompts are strings (as a user message
through the tokenizer's chat template when it has one, else the text itself) or token ids (used as given; the
training loops pass ids, formatted once by `data.prompt_template`, so that there is one knob for prompts).
Token ids go to the backend, never text, so the trainer scores exactly the tokens that were sampled.

Semantics shared by both backends (tests hold them to it):
- a sample ends at the EOS token, a stop token id or a stop string (`finish_reason` "eos" / "stop"), and its
  token ids include the token that ended it; `text` excludes special tokens and the stop string;
- the response is capped at `max_new_tokens` and at `max_model_len - prompt_len`; a capped sample has
  `finish_reason == "length"` (`truncated`);
- `logprobs` are those of the distribution the token was drawn from: log-softmax(logits / temperature), restricted
  and renormalised to the kept set (top-k, then the top-p nucleus of what top-k kept) when top_k > 0 or top_p < 1;
  greedy (temperature 0) scores at temperature 1;
- with `GenerationParams.kept`, `Sample.kept` holds each sampled token's kept set K_t, the ids the sampler's own
  top-k / top-p step left finite (vLLM: read from its processed log-probs; transformers: from its processed
  scores), so the trainer can renormalise to exactly that set (`twofold.kernels.kept`);
- seeds: with `GenerationParams.seed`, prompt i of the global batch uses seed + i * n (a sample does not depend on
  how prompts are split over ranks); without it, each engine draws from its own stream seeded by
  `SamplerConfig.seed + rank`.
- bad input (empty prompt, prompt that fills the context, n < 1, a stop token id outside the vocabulary, an empty
  stop string, out-of-range temperature/top-p) raises ValueError naming the prompt or field.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from twofold.engine.train.packing import KeptSets

FinishReason = Literal["eos", "stop", "length"]
Bucket = list[tuple[str, Tensor]]  # (Hugging Face parameter name, full tensor) pairs pushed in one update call


@dataclass(kw_only=True)
class SamplerConfig:
    backend: Literal["vllm", "transformers"] = "vllm"
    """vllm: in-process `vllm.LLM` (one engine per rank); transformers: `model.generate` with KV cache."""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    max_model_len: int = 4096
    """Prompt + response tokens per sample; prompts must be shorter, responses are capped to fit."""
    load_format: Literal["dummy", "auto"] = "dummy"
    """dummy: random weights until the first `sync_weights` (nothing is read from disk; generating before a sync
    raises); auto: load the checkpoint at the model path once at start."""
    kv_cache_gib: float | None = None
    """KV-cache size in GiB. None (default): sized from the workload, room for `max_num_seqs` sequences of
    `max_model_len` tokens each in whole blocks of the engine's block size (the most one engine step can hold; the
    prefix cache is reset at every weight sync, so more blocks would stay unused), never more than
    `AUTO_KV_CACHE_MAX_GIB` (1 GiB) and never less than one sequence of `max_model_len`. A number sets the size
    (on CPU vLLM's own default, a fraction of RAM, would count the trainer's memory); 0 on GPU means
    `gpu_memory_utilization` decides, and on CPU, which has no such fraction, is taken as None (with a warning)."""
    gpu_memory_utilization: float = 0.3
    """Fraction of GPU memory for vLLM when kv_cache_gib is 0; leave room for training."""
    sleep_mode: bool = True
    """GPU only: release vLLM's memory between rollouts (level 1: weights to host, KV cache dropped). The order is
    wake weights -> load -> wake KV cache -> generate -> sleep. Ignored on CPU, where vLLM has no sleep mode."""
    max_num_seqs: int = 256
    enforce_eager: bool = True
    """No CUDA graphs / torch.compile: faster start, no recompiles after weight updates."""
    sync_bucket_mb: int = 512
    """Weight sync sends at most this many MiB per update call (a larger single tensor goes alone)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings for every call, in addition to GenerationParams.stop."""
    seed: int = 0
    canary_every: int = 1
    """Online runs: every N weight syncs (and after the first), the sampler and the trainer score a few fixed
    prompts (the first `canary_prompts` training prompts, `canary_tokens` sampled tokens each); 0 disables."""
    canary_prompts: int = 2
    canary_tokens: int = 16
    canary_warn: float = 1.0
    """Warn when the canary's largest per-token |log p_sampler - log p_trainer| exceeds this (bf16 sampler and
    trainer on the CPU demo, 20 steps: the canary at most 0.27, any rollout token at most 0.61)."""
    canary_stop: float = 3.0
    """Stop the run above this: the sampler's weights are stale or half loaded (one layer left at random
    weights: 6.7)."""


@dataclass(frozen=True, kw_only=True)
class GenerationParams:
    n: int = 1
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 means no top-k."""
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    kept: bool = False
    """Record each sampled token's kept set (`Sample.kept`); needs temperature > 0."""


@dataclass
class Sample:
    prompt_index: int
    """Index of the prompt in the global batch."""
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[float] | None = None
    kept: KeptSets | None = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class Sampler(ABC):
    """Common front end: prompt formatting, input checks, seeds; backends implement `_generate` and
    `load_weights`."""

    def __init__(self, cfg: SamplerConfig, model_path: str, rank: int = 0):
        check_config(cfg)
        self.cfg, self.model_path, self.rank = cfg, model_path, rank
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model_path)
        self.vocab_size = len(self.tokenizer)
        self.weight_version = 0 if cfg.load_format == "dummy" else 1
        self.last_generate_s = 0.0

    def generate(self, prompts: Sequence[str | list[int]], params: GenerationParams,
                 prompt_offset: int = 0) -> list[list[Sample]]:
        """n samples for each prompt; `prompt_offset` is the index of prompts[0] in the global batch."""
        if self.weight_version == 0:
            raise RuntimeError("the sampler holds dummy weights: call twofold.engine.rollout.weight_sync.sync_weights(policy, "
                               "sampler) before the first rollout (or set load_format=auto)")
        stop = tuple(self.cfg.stop) + tuple(params.stop)
        self.check_params(params, stop)
        prompt_ids = [self.prompt_ids(p, prompt_offset + i) for i, p in enumerate(prompts)]
        seeds = None if params.seed is None else [params.seed + (prompt_offset + i) * params.n
                                                   for i in range(len(prompts))]
        start = time.perf_counter()
        groups = self._generate(prompt_ids, params, stop, seeds)
        self.last_generate_s = time.perf_counter() - start
        for i, group in enumerate(groups):
            for sample in group:
                sample.prompt_index = prompt_offset + i
        return groups

    def prompt_ids(self, prompt: str | list[int], index: int) -> list[int]:
        ids = self.format_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        if not (prompt if isinstance(prompt, str) else ids):
            raise ValueError(f"prompt {index} is empty")
        if len(ids) >= self.cfg.max_model_len:
            raise ValueError(f"prompt {index} has {len(ids)} tokens; sampler.max_model_len={self.cfg.max_model_len} "
                             "leaves no room for a response")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"prompt {index} holds token ids outside the vocabulary [0, {self.vocab_size})")
        return ids

    def format_prompt(self, prompt: str) -> list[int]:
        from twofold.engine.data.loading import CHAT, prompt_ids
        return prompt_ids(self.tokenizer, prompt, CHAT if self.tokenizer.chat_template else "{prompt}")

    def check_params(self, params: GenerationParams, stop: tuple[str, ...]) -> None:
        if params.n < 1:
            raise ValueError(f"GenerationParams.n must be >= 1, got {params.n}")
        if params.max_new_tokens < 1:
            raise ValueError(f"GenerationParams.max_new_tokens must be >= 1, got {params.max_new_tokens}")
        if params.temperature < 0:
            raise ValueError(f"GenerationParams.temperature must be >= 0 (0 is greedy), got {params.temperature}")
        if not 0 < params.top_p <= 1:
            raise ValueError(f"GenerationParams.top_p must be in (0, 1], got {params.top_p}")
        if params.top_k < 0:
            raise ValueError(f"GenerationParams.top_k must be >= 0 (0 is no top-k), got {params.top_k}")
        if params.kept and params.temperature == 0:
            raise ValueError("GenerationParams.kept needs temperature > 0: greedy decoding has no kept set")
        unknown = [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]
        if unknown:
            raise ValueError(f"stop token ids {unknown} are not in the vocabulary [0, {self.vocab_size})")
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")

    def max_new_tokens(self, prompt_len: int, params: GenerationParams) -> int:
        return min(params.max_new_tokens, self.cfg.max_model_len - prompt_len)

    @abstractmethod
    def _generate(self, prompt_ids: list[list[int]], params: GenerationParams, stop: tuple[str, ...],
                  seeds: list[int] | None) -> list[list[Sample]]:
        """Backend sampling of checked prompts; Sample.prompt_index is set by the caller."""

    @abstractmethod
    def load_weights(self, buckets: Iterable[Bucket]) -> None:
        """Load full trained tensors, bucket by bucket, in place; the next `generate` uses them."""

    def close(self) -> None:
        """Release the backend (tests create several samplers in one process)."""


def fit_to_model(cfg: SamplerConfig, hf_config, model: str) -> SamplerConfig:
    """`cfg` with max_model_len at most the model's positions (`max_position_embeddings`), with a warning naming
    both when it is lowered: a recipe's context for a 7B model given a small one (vLLM would refuse it, at engine
    start, in a ~50-line error)."""
    positions = getattr(hf_config, "max_position_embeddings", None)
    if not positions or cfg.max_model_len <= positions:
        return cfg
    logging.getLogger("twofold").warning(
        "sampler.max_model_len=%d is more than the model's max_position_embeddings=%d (%s): using %d",
        cfg.max_model_len, positions, model, positions)
    return replace(cfg, max_model_len=positions)


def check_config(cfg: SamplerConfig) -> None:
    if cfg.max_model_len < 2:
        raise ValueError(f"sampler.max_model_len must be >= 2, got {cfg.max_model_len}")
    if cfg.kv_cache_gib is not None and cfg.kv_cache_gib < 0:
        raise ValueError(f"sampler.kv_cache_gib must be >= 0, got {cfg.kv_cache_gib}")
    if cfg.sync_bucket_mb < 1:
        raise ValueError(f"sampler.sync_bucket_mb must be >= 1, got {cfg.sync_bucket_mb}")


AUTO_KV_CACHE_MAX_GIB = 1.0
"""The most a workload-sized KV cache (`SamplerConfig.kv_cache_gib=None`) takes."""


def workload_kv_blocks(max_num_seqs: int, max_model_len: int, block_size: int, block_bytes: int) -> int:
    """KV-cache blocks for `max_num_seqs` sequences of `max_model_len` tokens, plus the null block vLLM's block
    pool holds back, within `AUTO_KV_CACHE_MAX_GIB` but never below one whole sequence."""
    per_sequence = -(-max_model_len // block_size)
    cap = int(AUTO_KV_CACHE_MAX_GIB * 2**30) // block_bytes
    return max(per_sequence, min(max_num_seqs * per_sequence, cap - 1)) + 1


def quiet_vllm() -> None:
    """vLLM logs ~35 INFO lines per engine start (config, platform, KV cache, ...) and, on CPU, ~15 warnings about
    its own environment (tcmalloc/iomp not preloaded, no triton-cpu, thread binding, settings this engine sets on
    purpose such as whole-prompt prefill), none of which the run can act on: keep its errors only, unless
    log.verbose. The environment variable is read when vLLM is first imported, the logger level afterwards; the
    Python warnings vLLM's own modules raise (deprecations of the torch APIs it calls) are filtered by module."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    logging.getLogger("vllm").setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"vllm(\.|$)")


def rank_share(num_prompts: int, rank: int, world_size: int) -> range:
    """Contiguous share of the global prompt list for one rank (sizes differ by at most one)."""
    base, extra = divmod(num_prompts, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def sample_distributed(sampler: Sampler, prompts: Sequence[str | list[int]],
                       params: GenerationParams) -> list[list[Sample]]:
    """Each rank samples its share of the global prompts; every rank returns all groups, in prompt order."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    share = rank_share(len(prompts), rank, world)
    local = sampler.generate([prompts[i] for i in share], params, prompt_offset=share.start) if share else []
    if world == 1:
        return local
    gathered: list[list[list[Sample]] | None] = [None] * world
    dist.all_gather_object(gathered, local)
    return [group for part in gathered for group in part]


def write_model_dir(hf_config, tokenizer: PreTrainedTokenizerBase, directory) -> str:
    """config.json + tokenizer, no weights: enough for a sampler with load_format=dummy (a preset model)."""
    hf_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)

