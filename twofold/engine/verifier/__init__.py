"""Math answer verification for RL rewards: extraction, safe parsing, sympy equivalence, a killable worker pool.

    from twofold.engine.verifier import verify_batch
    scores = verify_batch(["... so the answer is \\boxed{\\frac12}"], ["0.5"])   # [1.0]
"""

from twofold.engine.verifier.equivalence import is_equivalent
from twofold.engine.verifier.extract import ExtractConfig, extract_answer
from twofold.engine.verifier.parser import ParseError
from twofold.engine.verifier.pool import VerifierPool, VerifierStats, build_pool, default_pool, verify_batch
from twofold.engine.verifier.rewards import binary_reward, format_reward, math_rewards, overlong_penalty

__all__ = [
    "ExtractConfig", "ParseError", "VerifierPool", "VerifierStats", "binary_reward", "build_pool", "default_pool",
    "extract_answer", "format_reward", "is_equivalent", "math_rewards", "overlong_penalty", "verify_batch",
]
