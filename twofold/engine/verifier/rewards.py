"""Rewards built on the verifier: binary correctness, DAPO overlong shaping, and a format check."""

from __future__ import annotations

from twofold.engine.verifier.extract import THINK_CLOSE, THINK_OPEN, last_boxed


def binary_reward(correct: float | bool, *, negative: float = 0.0) -> float:
    """1 for a correct answer, else `negative`: 0.0 for GRPO-style 0/1, -1.0 for the +-1 of DAPO and NFT."""
    return 1.0 if correct else negative


def overlong_penalty(length: int, max_length: int, cache_length: int) -> float:
    """DAPO eq. 13 soft overlong punishment, added to the correctness reward (docs/objectives.md):

    0 up to L_max - L_cache, then falling linearly to -1 at L_max, and -1 beyond it.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"cache_length must be in (0, max_length={max_length}], got {cache_length}")
    free = max_length - cache_length
    if length <= free:
        return 0.0
    if length <= max_length:
        return (free - length) / cache_length
    return -1.0


def format_reward(response: str, *, require_think: bool = True) -> float:
    """1.0 when the response has a closed boxed answer and, if `require_think`, exactly one
    `<think>...</think>` block that comes first and ends before the answer; else 0.0."""
    answer_part = response
    if require_think:
        if response.count(THINK_OPEN) != 1 or response.count(THINK_CLOSE) != 1:
            return 0.0
        opened, closed = response.find(THINK_OPEN), response.find(THINK_CLOSE)
        if response[:opened].strip() or closed < opened:
            return 0.0
        answer_part = response[closed + len(THINK_CLOSE):]
    return 1.0 if last_boxed(answer_part) else 0.0


def math_rewards(correct: list[float], *, negative: float = 0.0, lengths: list[int] | None = None,
                 max_length: int | None = None, cache_length: int | None = None) -> list[float]:
    """Per-response rewards from `verify_batch` scores, with DAPO overlong shaping when `lengths` are given."""
    rewards = [binary_reward(c, negative=negative) for c in correct]
    if lengths is None:
        return rewards
    if len(lengths) != len(rewards) or max_length is None or cache_length is None:
        raise ValueError("lengths must match correct, and then max_length and cache_length are required")
    return [r + overlong_penalty(n, max_length, cache_length) for r, n in zip(rewards, lengths)]
