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
import logging
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path

from twofold.engine.verifier.equivalence import MAX_ANSWER_CHARS
from twofold.engine.verifier.extract import DEFAULT_EXTRACT, ExtractConfig, extract_answer

DEFAULT_CHECK = "twofold.engine.verifier.equivalence:is_equivalent"
CHECKS = {"twofold": DEFAULT_CHECK, "math_verify": "twofold.engine.verifier.math_verify_check:is_equivalent"}
"""`verifier.check` -> the function the workers run."""
_REPO_ROOT = str(Path(__file__).resolve().parents[3])  # the folder that holds the twofold package
_STARTUP_SECONDS = 60.0
MAX_OUTPUT_BYTES = 1 << 16
"""What one call may print (stdout and stderr together, passed on to ours); past it the call is killed as an
error, so that a function printing in a loop can neither flood the log nor the disk."""
log = logging.getLogger("twofold")


@dataclass
class VerifierStats:
    """Counters since the pool was created; `timeouts` and `over_budget` checks scored 0."""

    checks: int = 0
    """Responses scored (including cache hits and responses without an answer)."""
    timeouts: int = 0
    """Calls (checks or reward functions) killed at the per-call wall-clock limit."""
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


class RewardFunctionError(RuntimeError):
    """A reward function that cannot be imported, or failed on more than reward.max_error_frac of its calls (the
    message names it)."""


def _worker_env() -> dict:
    # the caller's working directory too: reward functions live in the user's own modules
    path = [_REPO_ROOT, os.getcwd(), os.environ.get("PYTHONPATH")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))


def resolve_functions(names: list[str]) -> None:
    """Import each reward function (`reward.functions[i].name`) as the workers will, in a process of its own (the
    trainer never runs user code); raises RewardFunctionError naming every one that fails. Called before the
    sampler starts, so that a typo costs a second, not an engine start."""
    if not names:
        return
    try:
        out = subprocess.run([sys.executable, "-m", "twofold.engine.verifier.worker", "--resolve", *names],
                             capture_output=True, text=True, env=_worker_env(), timeout=_STARTUP_SECONDS)
    except subprocess.TimeoutExpired:
        raise RewardFunctionError(f"importing reward.functions ({', '.join(names)}) took over "
                                  f"{_STARTUP_SECONDS:g} s") from None
    if out.returncode:
        failed = (out.stdout.strip().splitlines() or out.stderr.strip().splitlines()[-1:]
                  or [f"exit code {out.returncode}"])
        where = {name: i for i, name in reversed(list(enumerate(names)))}
        lines = [f"reward.functions[{where.get(line.split(': ')[0], '?')}] {line}" for line in failed]
        raise RewardFunctionError(f"{'; '.join(lines)} (name: package.module:function, importable from PYTHONPATH "
                                  "or the working directory, or path/to/file.py:function)")


class _Worker:
    def __init__(self, check: str, memory_mb: int, spec: dict):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "twofold.engine.verifier.worker", check, str(memory_mb), json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_worker_env(),
            close_fds=True)
        self.fd, self.err_fd = self.proc.stdout.fileno(), self.proc.stderr.fileno()
        self.born, self.ready, self.buffer = time.monotonic(), False, b""
        self.job, self.job_started, self.printed, self.fatal = None, 0.0, 0, None

    def send(self, job_id: int, job: dict) -> None:
        self.proc.stdin.write(json.dumps({"id": job_id, **job}).encode() + b"\n")
        self.proc.stdin.flush()
        self.job, self.job_started, self.printed = job_id, time.monotonic(), 0

    def relay_output(self) -> bool:
        """Pass what the worker printed on to our stderr, up to MAX_OUTPUT_BYTES per call; False past the cap."""
        data = os.read(self.err_fd, 1 << 16)
        room = MAX_OUTPUT_BYTES - self.printed
        self.printed += len(data)
        if room > 0 and data:
            sys.stderr.write(data[:room].decode(errors="replace"))
        return self.printed <= MAX_OUTPUT_BYTES

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
        self.proc.stderr.close()


@dataclass
class RewardBatch:
    """What `VerifierPool.reward_batch` found for each response."""

    scores: list[float]
    """check_weight * correct + sum of weight * value over the reward functions (a failed call adds 0)."""
    correct: list[float | None]
    """The answer check's verdict (0/1), None where it was not run (reward.verifier_weight=0 with reward terms)."""
    values: dict[str, list[float | None]] = field(default_factory=dict)
    """Per reward function (by `reward_names`): its value on each response, None where the call failed."""
    errors: dict[str, list[str]] = field(default_factory=dict)
    """Per reward function: the error line of each call that failed (raised, bad value, timeout, crash, output)."""
    calls: dict[str, int] = field(default_factory=dict)
    """Per reward function: calls made (cache hits excluded)."""


def reward_names(functions: list[str]) -> list[str]:
    """Metric names of reward functions: the function's name, or its full spec where two share a name."""
    short = [name.rpartition(":")[2] for name in functions]
    return [s if short.count(s) == 1 else full for s, full in zip(short, functions)]


class VerifierPool:
    """A persistent pool of verifier workers; use one per process (it is not fork-safe).

    `check` names the function `(answer, gold, **check_kwargs) -> bool | float` the workers run (e.g.
    `check_kwargs={"numeric_tolerance": 1e-6}` for the default check); `memory_mb` caps each worker's address
    space (0: no cap). `functions` adds reward terms [("module:function" or "path/file.py:function", weight), ...],
    each `function(response, gold) -> float` on the whole response; every call, of the check or of a function,
    is a job of its own in the workers, under the same timeout, memory cap and output cap (MAX_OUTPUT_BYTES), and
    its value must be one finite number. The score is `check_weight * check + sum(weight * function)`; a failed
    call of a function adds 0 and is counted for that function (`reward_batch`), the rest of the score stands.
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
        self.names = reward_names([name for name, _ in self.functions])
        self.check_weight = float(check_weight)
        self.rewarded = bool(self.functions) or check_weight != 1.0
        """Reward terms or weights: scores are not the bare check."""
        self.spec = {"kwargs": self.check_kwargs, "terms": self.functions}
        self._timed_out: set[int] = set()
        self._reported: set[str] = set()  # functions whose first failure was logged with its traceback
        self.extract, self.cache_size = extract, cache_size
        self.stats, self.pid = VerifierStats(), os.getpid()
        self._cache: dict[tuple, float] = {}
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
        """The score of each response (1.0 / 0.0 with the bare check). Each call gets `timeout` seconds (default:
        the pool's); the whole call returns within about `budget` seconds (None: no budget), scoring unfinished
        checks 0."""
        return self.reward_batch(responses, golds, timeout=timeout, budget=budget).scores

    def reward_batch(self, responses: list[str], golds: list[str], *, timeout: float | None = None,
                     budget: float | None = None) -> RewardBatch:
        """`verify_batch` with the parts: the check's verdicts and each reward function's values and errors."""
        if len(responses) != len(golds):
            raise ValueError(f"responses and golds differ in length: {len(responses)} vs {len(golds)}")
        deadline = None if budget is None else time.monotonic() + budget
        if not self._lock.acquire(timeout=-1 if budget is None else budget):
            self.stats.over_budget += len(responses)
            return RewardBatch([0.0] * len(responses), [None] * len(responses))
        try:
            return self._verify(responses, golds, timeout or self.timeout, deadline)
        finally:
            self._lock.release()

    def check_golds(self, golds: list[str]) -> list[str | None]:
        """Why each gold answer is unusable, or None when the verifier can parse it. Parsed in the workers under
        the pool's timeout, so that no gold answer can stall the trainer process."""
        unique = list(dict.fromkeys(golds))
        with self._lock:
            results = self._run([{"kind": "gold", "gold": gold} for gold in unique], self.timeout, None)
            slow = set(self._timed_out)
        reasons = {gold: None if result and result.get("value") == 1.0
                   else "gold answer too slow to parse (verifier.timeout)" if k in slow
                   else "unparseable gold answer" for k, (gold, result) in enumerate(zip(unique, results))}
        return [reasons[gold] for gold in golds]

    def _verify(self, responses, golds, timeout, deadline) -> RewardBatch:
        answers = [self._answer(response) for response in responses]
        checked = not self.rewarded or self.check_weight != 0  # the verdict is part of the score
        keys = [("check", a, str(g)) if a is not None and checked else None for a, g in zip(answers, golds)]
        keys += [("term", k, r, str(g)) for k in range(len(self.functions)) for r, g in zip(responses, golds)]
        todo = list(dict.fromkeys(k for k in keys if k is not None and k not in self._cache))
        self.stats.cache_hits += sum(1 for k in keys[:len(responses)] if k is not None) - sum(
            1 for k in todo if k[0] == "check")
        jobs = [{"kind": "check", "answer": k[1], "gold": k[2]} if k[0] == "check" else
                {"kind": "term", "fn": k[1], "response": k[2], "gold": k[3]} for k in todo]
        fresh = dict(zip(todo, self._run(jobs, timeout, deadline)))
        errors: dict[str, list[str]] = {name: [] for name in self.names}
        for key, result in fresh.items():
            if result is None:
                continue  # cut off by the budget: scores 0 now, but is checked again next time
            if key[0] == "term" and "error" in result:
                errors[self.names[key[1]]].append(result["error"])
                self._report(self.names[key[1]], result)
                continue  # a failed call is counted, never cached
            if key[0] == "check" and "error" in result:
                self.stats.errors += not result.get("timeout")
            self._remember(key, result.get("value", 0.0))
        self.stats.checks += len(responses)
        value = {key: self._cache.get(key) if key not in fresh else (fresh[key] or {}).get("value")
                 for key in keys if key is not None}
        n = len(responses)
        correct = [None if not checked else 0.0 if k is None else float(value[k] or 0.0) for k in keys[:n]]
        values = {name: [value[k] for k in keys[n * (i + 1):n * (i + 2)]] for i, name in enumerate(self.names)}
        scores = [self.check_weight * (c or 0.0) for c in correct]
        for (_, weight), name in zip(self.functions, self.names):
            scores = [s + weight * (v or 0.0) for s, v in zip(scores, values[name])]
        calls = {name: sum(1 for k in todo if k[0] == "term" and self.names[k[1]] == name) for name in self.names}
        return RewardBatch(scores, correct, values, errors, calls)

    def _remember(self, key: tuple, value: float) -> None:
        if len(self._cache) >= self.cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = value

    def _report(self, name: str, result: dict) -> None:
        """The first failure of each function goes to the log with its traceback; later ones are counted."""
        if name in self._reported:
            return
        self._reported.add(name)
        log.warning("reward function %s failed: %s (the call adds 0 to the sample's reward; its other terms and "
                    "the verifier's verdict stand; later failures are counted in reward/%s/errors)\n%s", name,
                    result["error"], name, result.get("trace", "").rstrip())

    def _answer(self, response: str) -> str | None:
        answer = extract_answer(response, self.extract)
        if answer is None or len(answer) > MAX_ANSWER_CHARS:
            self.stats.no_answer += 1
            return None
        return answer

    def _run(self, jobs: list[dict], timeout: float, deadline: float | None) -> list[dict | None]:
        """Results of jobs ({"value"} or {"error"}); the ids of those that timed out are left in `_timed_out`."""
        results: list[dict | None] = [None] * len(jobs)
        self._timed_out = set()
        queue = deque(range(len(jobs)))
        while queue or any(w.job is not None for w in self._workers):
            if self._closed:
                raise RuntimeError("the verifier pool was closed during a call")
            if deadline is not None and time.monotonic() >= deadline:
                self._abandon(queue)
                break
            for worker in self._workers:
                if worker.ready and worker.job is None and queue:
                    job_id = queue.popleft()
                    worker.send(job_id, jobs[job_id])
            self._wait(results, timeout, deadline)
        return results  # None where the budget cut a call off

    def _wait(self, results: list, timeout: float, deadline: float | None) -> None:
        """Block until a message arrives or the nearest deadline passes, then enforce timeouts."""
        wakeups = [w.job_started + timeout for w in self._workers if w.job is not None]
        wakeups += [w.born + _STARTUP_SECONDS for w in self._workers if not w.ready]
        wakeups += [] if deadline is None else [deadline]
        wait = max(0.0, min(wakeups) - time.monotonic())
        fds = [fd for w in self._workers for fd in (w.fd, w.err_fd)]
        readable, _, _ = select.select(fds, [], [], wait)
        for k, worker in enumerate(self._workers):
            if worker.err_fd in readable and not worker.relay_output() and worker.job is not None:
                self._fail(k, results, f"printed more than {MAX_OUTPUT_BYTES} bytes in one call")
            elif worker.fd in readable:
                self._receive(k, results)
        now = time.monotonic()
        for k, worker in enumerate(self._workers):
            if worker.job is not None and now - worker.job_started >= timeout:
                self._timed_out.add(worker.job)
                self._fail(k, results, f"timed out after {timeout:g} s (verifier.timeout)", timeout=True)
            elif not worker.ready and now - worker.born > _STARTUP_SECONDS:
                raise RuntimeError(f"verifier worker did not start within {_STARTUP_SECONDS} s")

    def _fail(self, k: int, results: list, error: str, timeout: bool = False) -> None:
        """The worker's current call failed from outside (timeout, output, death): record it, replace the worker."""
        worker = self._workers[k]
        if worker.job is not None:
            results[worker.job] = {"error": error, "timeout": timeout}
            self.stats.timeouts += timeout
        self._replace(k)

    def _receive(self, k: int, results: list) -> None:
        worker = self._workers[k]
        try:
            messages = worker.receive()
        except EOFError:
            if not worker.ready:
                what = worker.fatal or f"see its stderr above (check={self.check!r})"
                raise RuntimeError(f"verifier worker exited with {worker.proc.wait()} before it was ready: "
                                   f"{what}") from None
            self._fail(k, results, f"the worker process exited with code {worker.proc.wait()} during the call")
            return
        for message in messages:
            if "fatal" in message:
                worker.fatal = message["fatal"]
            elif "ready" in message:
                worker.ready = True
            elif message["id"] == worker.job:
                results[worker.job] = message
                worker.job = None

    def _replace(self, k: int) -> None:
        if self._closed:
            raise RuntimeError("the verifier pool was closed during a call")
        self._workers[k].kill()
        self._workers[k] = _Worker(self.check, self.memory_mb, self.spec)
        self.stats.restarts += 1

    def _abandon(self, queue: deque) -> None:
        """The budget ran out: unfinished calls score 0 (left uncached), and busy workers are replaced."""
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
