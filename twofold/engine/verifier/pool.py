"""`verify_batch`: answer checks in worker processes, each under a hard wall-clock limit.

Why this shape: signal-based timeouts only work on the main thread;
under Ray and in worker threads they raised, the error was swallowed, and every reward was 0 (verl
PR #5635); a hung check in a ProcessPoolExecutor used up the pool for good (AReaL PR #1426). Here
the calling thread, whichever it is, waits on the workers' pipes with `select` and a deadline; a
worker that overruns is SIGKILLed and replaced, its check scores 0 and is counted. No signals, no
helper threads, no fork of the (possibly CUDA-holding) trainer: workers are fresh `python -m`
processes. A worker that cannot start raises instead of silently scoring 0.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, fields
from pathlib import Path

from twofold.engine.verifier.equivalence import MAX_ANSWER_CHARS
from twofold.engine.verifier.extract import DEFAULT_EXTRACT, ExtractConfig, extract_answer

DEFAULT_CHECK = "twofold.engine.verifier.equivalence:is_equivalent"
CHECKS = {"twofold": DEFAULT_CHECK, "math_verify": "twofold.engine.verifier.math_verify_check:is_equivalent"}
"""`verifier.check` -> the function the workers run."""
_REPO_ROOT = str(Path(__file__).resolve().parents[3])  # the folder that holds the twofold package
_STARTUP_SECONDS = 60.0


@dataclass
class VerifierStats:
    """Counters since the pool was created; `timeouts` and `over_budget` checks scored 0."""

    checks: int = 0
    """Responses scored (including cache hits and responses without an answer)."""
    timeouts: int = 0
    """Checks killed at the per-check wall-clock limit."""
    over_budget: int = 0
    """Checks not finished when the batch budget ran out."""
    errors: int = 0
    """Checks that raised in the worker, or whose worker died."""
    restarts: int = 0
    """Workers replaced after a timeout, a crash or the budget."""
    cache_hits: int = 0
    no_answer: int = 0
    """Responses with nothing to extract (or an answer over MAX_ANSWER_CHARS)."""

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Worker:
    def __init__(self, check: str, memory_mb: int, spec: dict):
        # the caller's working directory too: reward functions live in the user's own modules
        path = [_REPO_ROOT, os.getcwd(), os.environ.get("PYTHONPATH")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "twofold.engine.verifier.worker", check, str(memory_mb), json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        self.fd = self.proc.stdout.fileno()
        self.born, self.ready, self.buffer = time.monotonic(), False, b""
        self.job, self.job_started = None, 0.0

    def send(self, job_id: int, answer: str | None, gold: str, kind: str = "check",
             response: str | None = None) -> None:
        job = {"id": job_id, "answer": answer, "gold": gold, "kind": kind, "response": response}
        self.proc.stdin.write(json.dumps(job).encode() + b"\n")
        self.proc.stdin.flush()
        self.job, self.job_started = job_id, time.monotonic()

    def receive(self) -> list[dict]:
        """Complete messages available now; raises EOFError when the worker has died."""
        data = os.read(self.fd, 1 << 16)
        if not data:
            raise EOFError
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        return [json.loads(line) for line in lines]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


class VerifierPool:
    """A persistent pool of verifier workers; use one per process (it is not fork-safe).

    `check` names the function `(answer, gold, **check_kwargs) -> bool | float` the workers run (e.g.
    `check_kwargs={"numeric_tolerance": 1e-6}` for the default check); `memory_mb` caps each worker's address
    space (0: no cap). `functions` adds reward terms [("module:function", weight), ...], each
    `function(response, gold) -> float` on the whole response, run in the same workers under the same limits;
    the score is then `check_weight * check + sum(weight * function)`.
    """

    def __init__(self, num_workers: int = 2, timeout: float = 5.0, memory_mb: int = 1024,
                 check: str = DEFAULT_CHECK, extract: ExtractConfig = DEFAULT_EXTRACT, cache_size: int = 100_000,
                 check_kwargs: dict | None = None, functions: list[tuple[str, float]] = (),
                 check_weight: float = 1.0):
        if num_workers < 1 or timeout <= 0:
            raise ValueError(f"num_workers must be >= 1 and timeout > 0, got {num_workers} and {timeout}")
        self.timeout, self.memory_mb, self.check = timeout, memory_mb, check
        self.check_kwargs = dict(check_kwargs or {})
        self.functions = [(name, float(weight)) for name, weight in functions]
        self.rewarded = bool(self.functions) or check_weight != 1.0
        """Reward terms or weights: scores are not the bare check, and the whole response is part of each job."""
        self.spec = {"kwargs": self.check_kwargs, "terms": self.functions, "check_weight": float(check_weight)}
        self._timed_out: set[int] = set()
        self.extract, self.cache_size = extract, cache_size
        self.stats, self.pid = VerifierStats(), os.getpid()
        self._cache: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._workers = [_Worker(check, memory_mb, self.spec) for _ in range(num_workers)]
        _live_pools.add(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Kill the workers (idempotent). In a forked child, a pool inherited from the parent is left alone: its
        workers are the parent's."""
        self._closed = True
        if self.pid != os.getpid():
            return
        for worker in self._workers:
            worker.kill()
        self._workers = []

    def _forget(self) -> None:
        """In a forked child: drop the parent's workers without signalling them, closing the inherited pipe ends
        (a worker whose parent exits then sees end-of-file and exits too)."""
        null = os.open(os.devnull, os.O_RDWR)
        for worker in self._workers:  # dup2 closes the pipe end; no file-object lock (another thread's) is taken
            os.dup2(null, worker.proc.stdin.fileno())
            os.dup2(null, worker.fd)
        os.close(null)
        self._workers, self._closed, self._lock = [], True, threading.Lock()

    def verify_batch(self, responses: list[str], golds: list[str], *, timeout: float | None = None,
                     budget: float | None = None) -> list[float]:
        """1.0 / 0.0 per response. Each check gets `timeout` seconds (default: the pool's); the whole
        call returns within about `budget` seconds (None: no budget), scoring unfinished checks 0."""
        if len(responses) != len(golds):
            raise ValueError(f"responses and golds differ in length: {len(responses)} vs {len(golds)}")
        deadline = None if budget is None else time.monotonic() + budget
        if not self._lock.acquire(timeout=-1 if budget is None else budget):
            self.stats.over_budget += len(responses)
            return [0.0] * len(responses)
        try:
            return self._verify(responses, golds, timeout or self.timeout, deadline)
        finally:
            self._lock.release()

    def check_golds(self, golds: list[str]) -> list[str | None]:
        """Why each gold answer is unusable, or None when the verifier can parse it. Parsed in the workers under
        the pool's timeout, so that no gold answer can stall the trainer process."""
        unique = list(dict.fromkeys(golds))
        with self._lock:
            scores = self._run([("", gold, "gold") for gold in unique], self.timeout, None)
            slow = set(self._timed_out)
        reasons = {gold: None if score == 1.0 else "gold answer too slow to parse (verifier.timeout)" if k in slow
                   else "unparseable gold answer" for k, (gold, score) in enumerate(zip(unique, scores))}
        return [reasons[gold] for gold in golds]

    def _verify(self, responses, golds, timeout, deadline) -> list[float]:
        keys = [self._key(response, gold) for response, gold in zip(responses, golds)]
        todo = list(dict.fromkeys(k for k in keys if k is not None and k not in self._cache))
        self.stats.cache_hits += sum(1 for k in keys if k is not None) - len(todo)
        fresh = dict(zip(todo, self._run(todo, timeout, deadline)))
        for key, score in fresh.items():
            if score is None:
                continue  # cut off by the budget: scores 0 now, but is checked again next time
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = score
        self.stats.checks += len(keys)
        return [0.0 if k is None else fresh.get(k) or self._cache.get(k, 0.0) for k in keys]

    def _key(self, response: str, gold: str) -> tuple | None:
        answer = extract_answer(response, self.extract)
        if answer is None or len(answer) > MAX_ANSWER_CHARS:
            self.stats.no_answer += 1
            if not self.rewarded:
                return None
            answer = None
        # reward functions read the whole response, so it is part of the job (and of the cache key)
        return (answer, str(gold)) if not self.rewarded else (answer, str(gold), "check", response)

    def _run(self, jobs: list[tuple], timeout: float, deadline: float | None) -> list[float | None]:
        """Scores of (answer, gold[, kind]) jobs; the ids of those that timed out are left in `_timed_out`."""
        scores: list[float | None] = [None] * len(jobs)
        self._timed_out = set()
        queue = deque(range(len(jobs)))
        while queue or any(w.job is not None for w in self._workers):
            if self._closed:
                raise RuntimeError("the verifier pool was closed during a call")
            if deadline is not None and time.monotonic() >= deadline:
                self._abandon(queue, scores)
                break
            for worker in self._workers:
                if worker.ready and worker.job is None and queue:
                    job_id = queue.popleft()
                    worker.send(job_id, *jobs[job_id])
            self._wait(scores, timeout, deadline)
        return scores  # None where the budget cut a check off

    def _wait(self, scores: list, timeout: float, deadline: float | None) -> None:
        """Block until a message arrives or the nearest deadline passes, then enforce timeouts."""
        wakeups = [w.job_started + timeout for w in self._workers if w.job is not None]
        wakeups += [w.born + _STARTUP_SECONDS for w in self._workers if not w.ready]
        wakeups += [] if deadline is None else [deadline]
        wait = max(0.0, min(wakeups) - time.monotonic())
        readable, _, _ = select.select([w.fd for w in self._workers], [], [], wait)
        for k, worker in enumerate(self._workers):
            if worker.fd in readable:
                self._receive(k, scores)
        now = time.monotonic()
        for k, worker in enumerate(self._workers):
            if worker.job is not None and now - worker.job_started >= timeout:
                scores[worker.job] = 0.0
                self._timed_out.add(worker.job)
                self.stats.timeouts += 1
                self._replace(k)
            elif not worker.ready and now - worker.born > _STARTUP_SECONDS:
                raise RuntimeError(f"verifier worker did not start within {_STARTUP_SECONDS} s")

    def _receive(self, k: int, scores: list) -> None:
        worker = self._workers[k]
        try:
            messages = worker.receive()
        except EOFError:
            if not worker.ready:
                raise RuntimeError(f"verifier worker exited with {worker.proc.wait()} before it was ready "
                                   f"(check={self.check!r}); see its stderr above") from None
            if worker.job is not None:
                scores[worker.job] = 0.0
                self.stats.errors += 1
            self._replace(k)
            return
        for message in messages:
            if "ready" in message:
                worker.ready = True
            elif message["id"] == worker.job:
                scores[worker.job] = message["score"]
                self.stats.errors += int("error" in message)
                worker.job = None

    def _replace(self, k: int) -> None:
        if self._closed:
            raise RuntimeError("the verifier pool was closed during a call")
        self._workers[k].kill()
        self._workers[k] = _Worker(self.check, self.memory_mb, self.spec)
        self.stats.restarts += 1

    def _abandon(self, queue: deque, scores: list) -> None:
        """The budget ran out: unfinished checks score 0 (left uncached), and busy workers are replaced."""
        for k, worker in enumerate(self._workers):
            if worker.job is not None:
                self.stats.over_budget += 1
                self._replace(k)
        self.stats.over_budget += len(queue)
        queue.clear()


def build_pool(config) -> VerifierPool:
    """The pool a run's config describes: verifier.{workers, timeout, memory_mb, check, numeric_tolerance} and
    reward.functions."""
    v, r = config.verifier, config.reward
    kwargs = {"numeric_tolerance": v.numeric_tolerance} if v.check == "twofold" and v.numeric_tolerance else None
    return VerifierPool(v.workers, v.timeout, v.memory_mb, check=CHECKS[v.check], check_kwargs=kwargs,
                        functions=[(f.name, f.weight) for f in r.functions], check_weight=r.verifier_weight)


_default_pool: VerifierPool | None = None
_default_lock = threading.Lock()
_live_pools: weakref.WeakSet = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Pools (and their locks, which another thread may have held at the fork) belong to the parent."""
    global _default_lock
    _default_lock = threading.Lock()
    for pool in list(_live_pools):
        pool._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


def default_pool() -> VerifierPool:
    """The process-wide pool (2 workers), created on first use and again after a fork."""
    global _default_pool
    with _default_lock:
        if _default_pool is None or _default_pool.pid != os.getpid():
            _default_pool = VerifierPool()
            atexit.register(_default_pool.close)
        return _default_pool


def verify_batch(responses: list[str], golds: list[str], *, timeout: float | None = None,
                 budget: float | None = None, pool: VerifierPool | None = None) -> list[float]:
    """Score each response against its gold answer: 1.0 if its extracted answer is equivalent, else 0.0.

    Runs in `pool` (default: the process-wide pool), each check killed after `timeout` seconds
    (default: the pool's, 5 s);
    the call returns within about `budget` seconds. Safe from any thread and under torchrun.
    """
    return (pool or default_pool()).verify_batch(responses, golds, timeout=timeout, budget=budget)
