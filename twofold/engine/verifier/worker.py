"""A verifier worker process: JSON-line jobs on stdin, JSON-line verdicts on a private copy of stdout.

Started by `VerifierPool` as `python -m twofold.engine.verifier.worker <module:function> <memory_mb> [<spec JSON>]`,
the spec holding the check's keyword arguments ("kwargs") and, optionally, reward terms ("terms": [module:function,
weight] pairs from `reward.functions`, called on the whole response) with the check's weight ("check_weight"); a
job with `"kind": "gold"` asks whether a gold answer parses instead (`equivalence.gold_parses`). Only JSON
crosses the pipe (no pickles), the address space is capped with RLIMIT_AS so a runaway sympy
computation raises MemoryError here instead of swapping the machine, and the wall-clock limit is
enforced from outside by killing the process, so nothing here relies on signals.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import resource
import sys
import threading
import time


def load_check(path: str):
    """`package.module:function` from the engine's configuration (never from model output)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def run_check(check, job: dict, terms: list = (), check_weight: float = 1.0) -> dict:
    """score = check_weight * check(answer, gold) (0 without an answer) + sum of weight * fn(response, gold); a
    "gold" job only asks whether the gold answer parses."""
    if job.get("kind") == "gold":
        from twofold.engine.verifier.equivalence import gold_parses
        check, terms, check_weight = gold_parses, (), 1.0
    try:
        score = 0.0
        if job.get("answer") is not None and check_weight:
            score = check_weight * float(check(job["answer"], job["gold"]))
        for fn, weight in terms:
            score += weight * float(fn(job["response"], job["gold"]))
        return {"id": job["id"], "score": score}
    except Exception as error:  # noqa: BLE001  any failure of one check is a 0 for that check only
        return {"id": job["id"], "score": 0.0, "error": type(error).__name__}


def exit_with_parent(poll_seconds: float = 0.5) -> None:
    """Exit when the parent process is gone (killed, or `os._exit` in a forked DataLoader worker), even in the middle
    of a check that never returns: a daemon thread watches the parent's pid. No process is left behind."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(0)
    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def main(argv: list[str]) -> None:
    exit_with_parent()
    check_path, memory_mb = argv[1], int(argv[2])
    spec = json.loads(argv[3]) if len(argv) > 3 else {}
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (library warnings) must not corrupt the protocol
    check = functools.partial(load_check(check_path), **spec.get("kwargs", {}))
    terms = [(load_check(name), float(weight)) for name, weight in spec.get("terms", [])]
    if memory_mb > 0:
        limit = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    channel.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        channel.write(json.dumps(run_check(check, json.loads(line), terms, spec.get("check_weight", 1.0))) + "\n")


if __name__ == "__main__":
    main(sys.argv)
