"""A verifier worker process: JSON-line jobs on stdin, JSON-line results on a private copy of stdout.

Started by `VerifierPool` as `python -m twofold.engine.verifier.worker <module:function> <memory_mb> [<spec JSON>]`,
the spec holding the check's keyword arguments ("kwargs") and the reward functions ("terms": [[name, weight], ...]
from `reward.functions`, each called as fn(response, gold) on the whole response). A job is ONE call: "check"
(the answer check on the extracted answer), "term" with "fn" (the index of a reward function) or "gold" (does a gold
answer parse, `equivalence.gold_parses`). Its result is {"id", "value"} or {"id", "error": one line, "trace": the
traceback}; a value that is not one finite real number is an error too, so that no NaN, string or list ever reaches
a reward. Only JSON crosses the pipe (no pickles), the address space is capped with RLIMIT_AS so a runaway
computation raises MemoryError here instead of swapping the machine, and the wall-clock limit and the output cap
are enforced from outside (the pool kills the process), so nothing here relies on signals.

    python -m twofold.engine.verifier.worker --resolve NAME ...   import each function, print one line per failure
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import os
import resource
import sys
import threading
import time
import traceback
from pathlib import Path


class RewardValueError(ValueError):
    """A reward function returned something that is not one finite real number."""


def load_check(path: str):
    """`package.module:function` or `path/to/file.py:function` from the engine's configuration (never from model
    output); a relative file path is relative to the working directory."""
    module, _, name = path.rpartition(":")
    if module.endswith(".py"):
        file = Path(module).resolve()
        if not file.is_file():
            raise FileNotFoundError(f"no file {file}")
        spec = importlib.util.spec_from_file_location(f"_twofold_reward_{file.stem}", file)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = loaded  # pickling, dataclasses and typing look the module up by name
        spec.loader.exec_module(loaded)
    else:
        loaded = importlib.import_module(module)
    fn = getattr(loaded, name, None)
    if not callable(fn):
        raise AttributeError(f"{module} has no function {name!r}")
    return fn


def as_reward(value) -> float:
    """`value` as a finite float: a bool, int or float (numpy and 0-d tensor scalars included), never a string,
    a sequence, None, NaN, an infinity or an int too large for a float."""
    if isinstance(value, (str, bytes)) or not hasattr(type(value), "__float__"):
        raise RewardValueError(f"returned {type(value).__name__} {_short(value)}, not a number (one float per "
                               "sample)")
    try:
        number = float(value)
    except (OverflowError, TypeError, ValueError, RuntimeError) as err:
        raise RewardValueError(f"returned {type(value).__name__} {_short(value)}: {err}") from None
    if not math.isfinite(number):
        raise RewardValueError(f"returned {number}, not a finite number")
    return number


def _short(value) -> str:
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 256 else f"of {value.bit_length()} bits"
    return text if len(text) <= 60 else text[:57] + "..."


def call(fn, *args) -> dict:
    """One call: {"value"} or {"error", "trace"}. BaseException: a function's sys.exit is its error, not the
    worker's end."""
    try:
        return {"value": as_reward(fn(*args))}
    except BaseException as error:  # noqa: BLE001
        line = f"{type(error).__name__}: {error}"[:500].splitlines()[0] if str(error) else type(error).__name__
        return {"error": line, "trace": traceback.format_exc(limit=-8)[-4000:]}


def run_job(check, terms: list, job: dict) -> dict:
    if job["kind"] == "gold":
        from twofold.engine.verifier.equivalence import gold_parses
        return {"id": job["id"], **call(gold_parses, None, job["gold"])}
    if job["kind"] == "term":
        return {"id": job["id"], **call(terms[job["fn"]], job["response"], job["gold"])}
    return {"id": job["id"], **call(check, job["answer"], job["gold"])}


def resolve(names: list[str]) -> int:
    """Import each reward function as the workers will; one line per one that fails."""
    failed = 0
    for name in names:
        try:
            load_check(name)
        except BaseException as error:  # noqa: BLE001
            failed += 1
            print(f"{name}: {type(error).__name__}: {error}".splitlines()[0], flush=True)
    return int(failed > 0)


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
    if argv[1] == "--resolve":
        sys.exit(resolve(argv[2:]))
    exit_with_parent()
    check_path, memory_mb = argv[1], int(argv[2])
    spec = json.loads(argv[3]) if len(argv) > 3 else {}
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (library warnings) must not corrupt the protocol
    terms = []
    for name in [check_path] + [name for name, _ in spec.get("terms", [])]:
        try:
            terms.append(load_check(name))
        except BaseException as error:  # noqa: BLE001  named to the pool, which stops with it
            channel.write(json.dumps({"fatal": f"cannot load {name!r}: {type(error).__name__}: {error}"}) + "\n")
            raise
    check, terms = functools.partial(terms[0], **spec.get("kwargs", {})), terms[1:]
    if memory_mb > 0:
        limit = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    channel.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        channel.write(json.dumps(run_job(check, terms, json.loads(line))) + "\n")


if __name__ == "__main__":
    main(sys.argv)
