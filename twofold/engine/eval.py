"""Held-out evaluation: pass@1 with greedy decoding and the sampled avg@k (mean correctness of k samples at the
rollout temperature), scored by the verifier. Fixed seeds: the same weights always give the same numbers."""
from __future__ import annotations

import time

from twofold.engine.config import Config
from twofold.engine.rollout import RolloutStats, verify_groups
from twofold.engine.sampler import GenerationParams, Sampler, sample_distributed
from twofold.engine.tasks import Problem
from twofold.engine.verifier import VerifierPool

EVAL_SEED = 1234


def pass_rate(sampler: Sampler, pool: VerifierPool, problems: list[Problem], params: GenerationParams,
              timeout: float, threshold: float = 0.5) -> float:
    """Mean over problems of the fraction of samples whose score is >= `threshold` (reward.positive_threshold)."""
    groups = sample_distributed(sampler, [list(p.prompt_ids) for p in problems], params)
    scores = verify_groups(pool, problems, groups, timeout, RolloutStats())
    return sum(sum(x >= threshold for x in s) / len(s) for s in scores) / len(scores)


def evaluate(sampler: Sampler, pool: VerifierPool, problems: list[Problem], config: Config) -> dict[str, float]:
    """{"eval/pass1_greedy": ..., "eval/avg@k": ..., "eval/time_s": ...} on the held-out problems."""
    start = time.perf_counter()
    ev, rollout = config.eval, config.rollout
    max_new = ev.max_new_tokens or rollout.max_new_tokens
    timeout, threshold = config.verifier.timeout, config.reward.positive_threshold
    out = {"eval/pass1_greedy": pass_rate(sampler, pool, problems, GenerationParams(
        temperature=0.0, max_new_tokens=max_new, seed=EVAL_SEED), timeout, threshold)}
    if ev.samples:
        sampled = GenerationParams(n=ev.samples, temperature=rollout.temperature, top_p=rollout.top_p,
                                   max_new_tokens=max_new, seed=EVAL_SEED)
        out[f"eval/avg@{ev.samples}"] = pass_rate(sampler, pool, problems, sampled, timeout, threshold)
    out["eval/time_s"] = time.perf_counter() - start
    return out
