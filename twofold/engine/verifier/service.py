"""A verifier pool shared by every thread, coroutine and forked process of a program (what `twofold.verifier`'s TRL
and verl rewards run on).

One dispatcher thread per process owns a `VerifierPool`, both started on the first call, so importing costs
nothing. Callers put requests on its queue and wait on a `concurrent.futures.Future` with their own deadline, so any
number of threads, and asyncio code through `asyncio.wrap_future`, call it at once; requests that arrive while a
batch runs are merged into the next one. Each check is killed at `timeout` seconds by the pool, from outside (no
signals, so any thread works); a call's `budget` bounds the whole call, its unfinished checks scoring 0 (counted
in `stats()["late"]`).

Processes: after a fork (a DataLoader worker) the child starts its own service on first use; the parent's thread
and workers stay the parent's (the pool's at-fork hook drops its pipe ends in the child). Services shut down at
exit: atexit in the main process, multiprocessing's finalizers in a forked worker, and a worker whose parent dies
anyway exits by itself (`worker.exit_with_parent`), so no process is left behind.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import multiprocessing.util
import os
import queue
import threading

from twofold.engine.verifier.pool import VerifierPool

_STOP = object()


class VerifierService:
    """A lazily started `VerifierPool(**pool_kwargs)` behind a request queue; see the module docstring."""

    def __init__(self, **pool_kwargs):
        self.pool_kwargs, self.pid = pool_kwargs, os.getpid()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pool: VerifierPool | None = None
        self._closed, self._late = False, 0

    def submit(self, responses: list[str], golds: list[str]) -> concurrent.futures.Future:
        """A Future of the scores (1.0 / 0.0 per response); starts the service on first use."""
        responses, golds = [str(r) for r in responses], [str(g) for g in golds]
        if len(responses) != len(golds):
            raise ValueError(f"responses and golds differ in length: {len(responses)} vs {len(golds)}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the verifier service is closed (twofold.verifier.shutdown was called)")
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, daemon=True, name="twofold-verifier")
                self._thread.start()
        self._queue.put((responses, golds, future))
        return future

    def verify(self, responses: list[str], golds: list[str], budget: float | None = None) -> list[float]:
        """Scores, returned within `budget` seconds when given (unfinished checks then score 0)."""
        if not responses:
            return []
        future = self.submit(responses, golds)
        try:
            return future.result(timeout=budget)
        except concurrent.futures.TimeoutError:
            return self._too_late(future, len(responses))

    async def verify_async(self, responses: list[str], golds: list[str], budget: float | None = None) -> list[float]:
        """`verify` for asyncio code: the event loop keeps running while the workers check."""
        if not responses:
            return []
        future = self.submit(responses, golds)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), budget)
        except asyncio.TimeoutError:
            return self._too_late(future, len(responses))

    def _too_late(self, future: concurrent.futures.Future, n: int) -> list[float]:
        future.cancel()  # skipped if it has not started; a running batch finishes and its result is dropped
        with self._lock:
            self._late += n
        return [0.0] * n

    def stats(self) -> dict:
        """The pool's counters (VerifierStats) and `late`: scores returned as 0 because a call's budget ran out."""
        pool = self._pool
        return {**(pool.stats.as_dict() if pool is not None else {}), "late": self._late}

    def close(self) -> None:
        """Stop the thread and kill the workers (idempotent; a copy inherited through fork is left alone)."""
        with self._lock:
            if self._closed:
                return
            self._closed, thread = True, self._thread
        if os.getpid() != self.pid or thread is None:
            return
        self._queue.put(_STOP)
        thread.join(timeout=1.0)  # a batch still running is cut off by closing its pool
        if self._pool is not None:
            self._pool.close()

    def _serve(self) -> None:
        try:
            self._pool = VerifierPool(**self.pool_kwargs)
        except Exception as error:  # noqa: BLE001  e.g. a check that does not import: every caller hears of it
            self._fail_all(error)
            return
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in batch)
            live = [item for item in batch if item is not _STOP and item[2].set_running_or_notify_cancel()]
            if live:
                self._score(live)
            if stop:
                self._fail_all(RuntimeError("the verifier service was closed"))
                return

    def _score(self, live: list) -> None:
        responses = [r for item in live for r in item[0]]
        golds = [g for item in live for g in item[1]]
        try:
            scores = self._pool.verify_batch(responses, golds)
        except Exception as error:  # noqa: BLE001  the pool failed (a worker that cannot start): say so
            for *_, future in live:
                future.set_exception(error)
            return
        at = 0
        for item_responses, _, future in live:
            future.set_result(scores[at:at + len(item_responses)])
            at += len(item_responses)

    def _fail_all(self, error: Exception) -> None:
        """Fail what is queued now (and, after a start-up failure, every later request)."""
        with self._lock:
            self._closed = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item[2].set_running_or_notify_cancel():
                item[2].set_exception(error)


_services: dict[tuple, VerifierService] = {}
_services_lock = threading.Lock()


def shared_service(**pool_kwargs) -> VerifierService:
    """The process's service for this pool configuration (one per configuration, created on first use and again
    in a forked child)."""
    key = tuple(sorted((k, repr(v)) for k, v in pool_kwargs.items()))
    with _services_lock:
        service = _services.get(key)
        if service is None or service.pid != os.getpid():
            service = _services[key] = VerifierService(**pool_kwargs)
            atexit.register(service.close)
            # a forked multiprocessing worker (a DataLoader worker) leaves through os._exit, after these finalizers
            multiprocessing.util.Finalize(service, service.close, exitpriority=100)
        return service


def shutdown() -> None:
    """Close every service of this process now (they are closed at exit anyway)."""
    with _services_lock:
        services = list(_services.values())
        _services.clear()
    for service in services:
        service.close()


def _after_fork_in_child() -> None:
    global _services_lock
    _services_lock = threading.Lock()
    _services.clear()  # the parent's: their threads do not exist here


os.register_at_fork(after_in_child=_after_fork_in_child)
