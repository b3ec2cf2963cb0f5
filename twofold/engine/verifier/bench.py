"""Throughput of verify_batch on synthetic responses: `python -m twofold.engine.verifier.bench --n 10000`.

Responses are distinct (no cache hits) and mix the answer kinds of the MATH benchmark; a share of
them is wrong, and `--pathological` adds exponent towers and deep nesting. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from twofold.engine.verifier.pool import VerifierPool

_KINDS = (
    lambda r, k: (f"{k}", f"{k}"),
    lambda r, k: (f"\\frac{{{k}}}{{{2 * k + 1}}}", f"{k}/{2 * k + 1}"),
    lambda r, k: (f"{k}.25", f"{4 * k + 1}/4"),
    lambda r, k: (f"{k}\\sqrt{{2}}", f"\\sqrt{{{2 * k * k}}}"),
    lambda r, k: (f"({k}, {k + 1}]", f"({k},{k + 1}]"),
    lambda r, k: (f"({k}, -{k})", f"({k},-{k})"),
    lambda r, k: (f"x^2 + {2 * k}x + {k * k}", f"(x+{k})^2"),
    lambda r, k: (f"\\frac{{{k}\\pi}}{{3}}", f"{k}\\pi/3"),
)
_PATHOLOGICAL = ("9^{9^{9^{9}}}", "(" * 5000 + "1" + ")" * 5000, "e^{e^{e^{e^{100}}}}", "x^{x^{x^{x}}}")


def synthetic(n: int, seed: int = 0, wrong: float = 0.5, pathological: int = 0):
    """(responses, golds, expected scores) with the pathological ones expected to score 0."""
    rng = random.Random(seed)
    responses, golds, expected = [], [], []
    for i in range(n):
        answer, gold = _KINDS[i % len(_KINDS)](rng, i + 1)
        is_wrong = rng.random() < wrong
        if is_wrong:
            gold = f"{gold}+1" if i % len(_KINDS) not in (4, 5) else gold.replace(",", ",1+")
        responses.append(f"Step by step ... therefore the answer is \\boxed{{{answer}}}.")
        golds.append(gold)
        expected.append(0.0 if is_wrong else 1.0)
    for j, at in enumerate(rng.sample(range(n), pathological)):
        responses[at], expected[at] = f"\\boxed{{{_PATHOLOGICAL[j % len(_PATHOLOGICAL)]}}}", 0.0
    return responses, golds, expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--pathological", type=int, default=0)
    args = parser.parse_args()
    responses, golds, expected = synthetic(args.n, pathological=args.pathological)
    with VerifierPool(num_workers=args.workers, timeout=args.timeout) as pool:
        pool.verify_batch(["\\boxed{1}"], ["1"])  # start-up is not throughput
        start = time.monotonic()
        scores = pool.verify_batch(responses, golds)
        seconds = time.monotonic() - start
        print(json.dumps({"n": args.n, "workers": args.workers, "seconds": round(seconds, 2),
                          "responses_per_s": round(args.n / seconds, 1), "correct": sum(scores),
                          "agreement": sum(s == e for s, e in zip(scores, expected)) / args.n,
                          **pool.stats.as_dict()}))


if __name__ == "__main__":
    main()
