"""Checks and reward terms that tests run in verifier workers. A worker imports the module a function lives in, and
restarts after every timeout: here it imports nothing, where a test module would import torch, transformers and
the engine in each worker (seconds per start)."""


def hanging_check(answer: str, gold: str) -> bool:
    """An answer check that never returns (what a pathological sympy input does)."""
    while True:
        pass


def boxed_bonus(response: str, gold: str) -> float:
    """A custom reward term: 1 for a response that starts with its boxed answer."""
    return float(response.startswith("\\boxed{"))


def hang_marked_check(answer: str, gold: str) -> bool:
    """`is_equivalent`, except that the answer `HANG` never returns."""
    if answer == "HANG":
        while True:
            pass
    from twofold.engine.verifier.equivalence import is_equivalent
    return is_equivalent(answer, gold)
