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


# ---- reward functions that break the contract (one finite float per call), one per way of breaking it ----------

def raises(response: str, gold: str) -> float:
    return 1 / 0


def hangs(response: str, gold: str) -> float:
    while True:
        pass


def nan(response: str, gold: str) -> float:
    return float("nan")


def infinite(response: str, gold: str) -> float:
    return float("-inf")


def text(response: str, gold: str):
    return "good"


def several(response: str, gold: str):
    return [1.0, 0.0]  # a batch's worth, as TRL's reward functions return


def nothing(response: str, gold: str):
    return None


def huge(response: str, gold: str):
    return 10 ** 400


def exits(response: str, gold: str) -> float:
    import sys
    sys.exit(3)


def dies(response: str, gold: str) -> float:
    import os
    os._exit(3)


def hog(response: str, gold: str) -> float:
    return float(len(bytearray(4 << 30)))  # over the workers' address-space cap


def chatty(response: str, gold: str) -> float:
    import sys
    while True:
        print("x" * 4096, file=sys.stderr)
