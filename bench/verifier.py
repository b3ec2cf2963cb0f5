"""Verifier error rates: twofold's verifier vs Math-Verify on the same cases, in one run.

    python -m bench.verifier [--workers 2] [--timeout 5] [--throughput 1000] [--out bench/results/verifier.json]

Suites: `math_verify_tests` (125 cases vendored from Math-Verify's own tests, bench/data/math_verify_cases.NOTICE.md),
`twofold_tricky` (bench/verifier_cases.py: the tricky classes, matches and near-misses) and `hostile` (inputs
built to be expensive: towers, huge factorials, deep nesting; all must score 0 without hanging). Both verifiers run
the same way: in a `VerifierPool` of `--workers` processes, each check killed at `--timeout` seconds (a timeout
scores 0 and is counted). twofold extracts the answer itself (last box, else "The answer is ...") and compares;
Math-Verify gets the whole response and the gold answer and does what its README shows:
`verify(parse(gold), parse(response))`, with its own extraction (a gold answer without math delimiters is wrapped
in `$...$`, which its LaTeX extraction needs; its signal-based timeouts are off: the pool's apply). Throughput: `--throughput` distinct synthetic responses (twofold.engine.verifier.bench) scored at once.
Prints a markdown table (false positives separately: a wrong answer that scores 1) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

from bench.verifier_cases import all_cases, response
from twofold.engine.verifier.bench import synthetic
from twofold.engine.verifier.extract import extract_answer, last_boxed
from twofold.engine.verifier.pool import VerifierPool

DATA = Path(__file__).resolve().parent / "data" / "math_verify_cases.jsonl"
HOSTILE = ["9^{9^{9^{9}}}", "x^{x^{x^{x}}}", "e^{e^{e^{e^{100}}}}", "(10^{100})!", "1000000!", "\\sqrt[10^{30}]{2}",
           "\\binom{10^{9}}{5\\cdot10^8}", "(x+1)^{10^{6}}", "\\sin(10^{300})", "2^{2^{2^{2^{2^{2}}}}}",
           "(" * 300 + "1" + ")" * 300, "\\frac{" * 200 + "1" + "}{2}" * 200, "10^{10^{100}}", "i^{10^{20}}"]


def math_verify_score(response_text: str, gold: str) -> float:
    """Math-Verify as its README uses it, on the whole response (run in the pool's workers)."""
    import logging

    from math_verify import parse, verify
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": the pool's timeout applies
    if not any(mark in gold for mark in ("$", "\\boxed", "\\[", "\\(")):
        gold = f"${gold}$"  # its LaTeX extraction needs math delimiters: a bare `\\frac{1}{2}` parses to nothing
    return float(verify(parse(gold, parsing_timeout=None), parse(response_text, parsing_timeout=None),
                        timeout_seconds=None))


def suites() -> dict[str, list[tuple[str, str, bool]]]:
    """suite -> [(response, gold, equal)]."""
    vendored = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return {
        "math_verify_tests": [(r["response"], r["gold"], r["equal"]) for r in vendored],
        "twofold_tricky": [(response(a), g, e) for _, a, g, e in all_cases()],
        "hostile": [(f"The answer is $\\boxed{{{h}}}$.", "1", False) for h in HOSTILE],
    }


VERIFIERS = {
    "twofold": {},
    "math_verify": {"functions": [("bench.verifier:math_verify_score", 1.0)], "check_weight": 0.0},
}


def score(verifier: str, cases: list, workers: int, timeout: float) -> dict:
    """Error counts of one verifier on one suite, in a fresh pool (the workers' start-up is not timed)."""
    with VerifierPool(num_workers=workers, timeout=timeout, **VERIFIERS[verifier]) as pool:
        pool.verify_batch(["\\boxed{1}"], ["1"])
        start, cpu = time.monotonic(), time.process_time()
        # twofold.verifier's rewards read a gold answer with a box (a worked solution) as its last box
        golds = [g if verifier == "math_verify" else last_boxed(g) or g for _, g, _ in cases]
        scores = pool.verify_batch([r for r, _, _ in cases], golds)
        wall, cpu = time.monotonic() - start, time.process_time() - cpu
        stats = pool.stats.as_dict()
    wrong = [(r, g, e) for (r, g, e), s in zip(cases, scores) if (s == 1.0) != e]
    unanswered = sum(1 for r, _, e in wrong if e and extract_answer(r) is None) if verifier == "twofold" else None
    return {"cases": len(cases), "right": len(cases) - len(wrong),
            "false_positives": sum(1 for _, _, e in wrong if not e), "false_negatives": sum(1 for _, _, e in wrong if e),
            "false_negatives_without_box_or_phrase": unanswered,
            "positives": sum(1 for _, _, e in cases if e), "negatives": sum(1 for _, _, e in cases if not e),
            "timeouts": stats["timeouts"], "errors": stats["errors"], "seconds": round(wall, 2),
            "parent_cpu_s": round(cpu, 2), "fp_cases": [(r, g) for r, g, e in wrong if not e],
            "fn_cases": [(r, g) for r, g, e in wrong if e]}


def throughput(verifier: str, n: int, workers: int, timeout: float) -> dict:
    responses, golds, _ = synthetic(n)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with VerifierPool(num_workers=workers, timeout=timeout, **VERIFIERS[verifier]) as pool:
        pool.verify_batch(["\\boxed{1}"], ["1"])
        start = time.monotonic()
        pool.verify_batch(responses, golds)
        wall = time.monotonic() - start
        timeouts = pool.stats.timeouts
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, reaped when the pool closed
    return {"responses": n, "seconds": round(wall, 2), "responses_per_s": round(n / wall, 1),
            "workers_cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2),
            "timeouts": timeouts}


def _unanswered(r: dict) -> str:
    n = r["false_negatives_without_box_or_phrase"]
    return f" ({n} with no box or answer phrase)" if n else ""


def table(results: dict) -> str:
    lines = ["| verifier | suite | cases | right | false positives (of wrong answers) | false negatives "
             "(of right answers) | timeouts | seconds |", "|---|---|---|---|---|---|---|---|"]
    for verifier, per_suite in results["suites"].items():
        for suite, r in per_suite.items():
            lines.append(f"| {verifier} | {suite} | {r['cases']} | {r['right']} | **{r['false_positives']}** of "
                         f"{r['negatives']} | {r['false_negatives']} of {r['positives']}{_unanswered(r)} | {r['timeouts']} | "
                         f"{r['seconds']} |")
    lines += ["", "| verifier | responses | seconds | responses/s | workers' CPU s | timeouts |", "|---|---|---|---|---|---|"]
    for verifier, t in results["throughput"].items():
        lines.append(f"| {verifier} | {t['responses']} | {t['seconds']} | {t['responses_per_s']} | "
                     f"{t['workers_cpu_s']} | {t['timeouts']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--throughput", type=int, default=1000, help="synthetic responses for responses/s (0: skip)")
    parser.add_argument("--verifiers", default="twofold,math_verify")
    parser.add_argument("--suites", default=",".join(suites()))
    parser.add_argument("--limit", type=int, default=None, help="only the first LIMIT cases of each suite")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    chosen = {name: cases[:args.limit] for name, cases in suites().items() if name in args.suites.split(",")}
    verifiers = args.verifiers.split(",")
    if "math_verify" in verifiers:
        try:
            import math_verify  # noqa: F401
        except ImportError:
            print("math_verify is not installed (pip install 'twofold[math]'): twofold only")
            verifiers.remove("math_verify")
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    results = {"machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
               "load_before": load, "workers": args.workers, "timeout": args.timeout,
               "suites": {v: {s: score(v, c, args.workers, args.timeout) for s, c in chosen.items()} for v in verifiers},
               "throughput": {v: throughput(v, args.throughput, args.workers, args.timeout)
                              for v in verifiers if args.throughput}}
    results["load_after"] = Path("/proc/loadavg").read_text().split()[0] if load != "?" else "?"
    print(table(results))
    print(f"load average {results['load_before']} before, {results['load_after']} after")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, ensure_ascii=False))
    return results


if __name__ == "__main__":
    main()
