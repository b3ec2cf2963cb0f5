"""`verifier.check: math_verify`: Hugging Face's Math-Verify as the answer check (pip install 'twofold[math]').

Runs inside the verifier's worker processes like the built-in check. Math-Verify's own timeouts use SIGALRM; they
are turned off (parsing_timeout=None, timeout_seconds=None) because the pool already kills a worker at
`verifier.timeout`, from outside and on any thread.
"""
from __future__ import annotations

import logging

logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" is expected here: ours applies


def is_equivalent(answer: str, gold: str) -> bool:
    """Whether the extracted answer (the content of the last \\boxed{}) equals the gold answer for Math-Verify."""
    from math_verify import parse, verify
    parsed_gold = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    parsed_answer = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    return bool(parsed_gold and parsed_answer and verify(parsed_gold, parsed_answer, timeout_seconds=None))
