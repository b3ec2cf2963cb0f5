"""`twofold.verifier`, the public reward API: torch-free, and one shared pool that is safe from 8 threads, from an
asyncio loop and from forked workers, with a hung check among them, leaving no process behind."""
import asyncio
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import twofold.verifier as tv
from twofold.engine.verifier.service import shared_service

REPO = Path(__file__).resolve().parents[1]
HANG = "tests.verifier_functions:hang_marked_check"
OPTIONS = dict(check=HANG, timeout=1.0, workers=2, memory_mb=0)


def _service(**extra):
    return tv._service(**{**OPTIONS, **extra})


def _worker_pids(service) -> list[int]:
    return [w.proc.pid for w in service._pool._workers]


def _gone(pids, seconds: float = 20.0) -> bool:
    """Every pid exited (or is a zombie of a process that is itself gone) within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and "State:\tZ" not in _status(p)]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""


def _batch(k: int):
    """A right answer and a wrong one, and for k = 0 a hung one; golds distinct per k (no cache hits)."""
    completions = [f"so \\boxed{{{k}}}", f"\\boxed{{{k + 1}}}", "\\boxed{HANG}" if k == 0 else "no answer"]
    return completions, [str(k), str(k), str(k)], [1.0, 0.0, 0.0]


@pytest.fixture
def fresh():
    """Each test gets its own services, shut down after it; no worker may outlive that."""
    tv.shutdown()
    yield
    services = [s for s in list(tv.shutdown.__globals__["_services"].values())]
    pids = [p for s in services if s._pool is not None for p in _worker_pids(s)]
    tv.shutdown()
    assert _gone(pids), "verifier workers left behind"


def test_importing_and_using_twofold_verifier_loads_neither_torch_nor_vllm(tmp_path):
    code = ("import sys, twofold.verifier as v\n"
            "assert v.verify(['so \\\\boxed{\\\\frac12}'], ['0.5']) == [1.0]\n"
            "assert v.compute_score('any', '\\\\boxed{2}', '2') == 1.0\n"
            "print(sorted(m for m in ('torch', 'vllm', 'transformers', 'numpy', 'trl') if m in sys.modules))\n"
            "print(*[w.proc.pid for s in v.shutdown.__globals__['_services'].values() for w in s._pool._workers])\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert run.returncode == 0, run.stderr
    imported, pids = run.stdout.splitlines()
    assert imported == "[]"
    assert len(pids.split()) == 2 and _gone([int(p) for p in pids.split()])  # shut down at exit


def test_eight_threads_with_a_hung_check_each_get_their_own_right_scores(fresh):
    reward = tv.MathReward(**OPTIONS)
    prompts = ["p"] * 3

    def call(k):
        completions, golds, expected = _batch(k)
        return reward(prompts=prompts, completions=completions, solution=golds), expected

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))
    assert [got for got, _ in results] == [expected for _, expected in results]
    stats = tv.stats(**OPTIONS)
    assert stats["timeouts"] == 1 and stats["late"] == 0  # the hung check was killed at its 1 s timeout


def test_a_call_returns_within_its_budget_even_while_checks_hang(fresh):
    slow = dict(OPTIONS, timeout=60.0)
    start = time.monotonic()
    scores = tv.verify(["\\boxed{HANG}", "\\boxed{1}"], ["1", "1"], budget=1.0, **slow)
    assert scores == [0.0, 0.0]  # the budget cut both off: zeros, counted as late
    assert time.monotonic() - start < 30  # far below the 60 s check timeout
    assert _service(timeout=60.0).stats()["late"] == 2


def test_an_asyncio_loop_keeps_running_while_eight_coroutines_wait(fresh):
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1
        tick = asyncio.ensure_future(ticker())
        calls = [tv.verify_async(*_batch(k)[:2], **OPTIONS) for k in range(8)]
        results = await asyncio.gather(*calls)
        tick.cancel()
        return results, ticks

    results, ticks = asyncio.run(main())
    assert results == [_batch(k)[2] for k in range(8)]
    assert ticks >= 5  # the hung check takes >= 1 s: the loop ran meanwhile


def _forked_task(k):
    completions, golds, expected = _batch(k)
    scores = [tv.compute_score("math", c, g, None, **dict(OPTIONS, workers=1)) for c, g in zip(completions, golds)]
    return scores, expected, os.getpid(), _worker_pids(_service(workers=1))


def test_forked_workers_each_use_their_own_pool_and_leave_no_process_behind(fresh):
    assert tv.verify(["\\boxed{1}"], ["1"], **OPTIONS) == [1.0]  # the parent's pool and thread exist at the fork
    parent_workers = _worker_pids(_service())
    with multiprocessing.get_context("fork").Pool(2) as pool:  # how a DataLoader's workers start
        results = pool.map(_forked_task, range(4), chunksize=1)
        pool.close()
        pool.join()
    assert all(scores == expected for scores, expected, _, _ in results)
    child_workers = {p for *_, pids in results for p in pids}
    assert child_workers.isdisjoint(parent_workers)
    assert _gone(child_workers)  # closed by multiprocessing's finalizers as each worker exited
    assert _worker_pids(_service()) == parent_workers  # the parent's pool was not touched by its children
    assert tv.verify(["\\boxed{2}"], ["2"], **OPTIONS) == [1.0]


def test_a_forked_child_that_dies_mid_check_leaves_no_worker_behind(fresh):
    tv.verify(["\\boxed{1}"], ["1"], **OPTIONS)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # a hung check in flight, then os._exit: no atexit, no finalizer runs
        try:
            service = _service(timeout=60.0)
            service.submit(["\\boxed{HANG}"], ["1"])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (service._pool is None or
                                                   all(w.job is None for w in service._pool._workers)):
                time.sleep(0.01)
            os.write(write, " ".join(map(str, _worker_pids(service))).encode())
        finally:
            os._exit(0)
    os.close(write)
    pids = [int(p) for p in os.read(read, 1000).split()]
    os.close(read)
    os.waitpid(child, 0)
    assert len(pids) == 2 and _gone(pids)  # each worker noticed its parent was gone and exited


def test_trl_signature_conversational_completions_and_a_clear_error_for_a_missing_column(fresh):
    chat = [[{"role": "assistant", "content": "so \\boxed{4}"}],
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text", "text": "\\boxed{5}"}]}]]
    reward = tv.MathReward(negative=-1.0, name="acc")
    assert reward.__name__ == "acc"
    assert reward(prompts=["a", "b"], completions=chat, answer=["4", "4"], completion_ids=[[1], [2]]) == [1.0, -1.0]
    with pytest.raises(KeyError, match="no gold-answer column.*MathReward\\(column=...\\)"):
        reward(prompts=["a"], completions=["\\boxed{1}"], problem=["1"])
    with pytest.raises(ValueError, match="check must be one of"):
        tv.MathReward(check="sympy")


@pytest.mark.slow
def test_twofold_verifier_runs_where_only_twofold_and_sympy_are_installed(twofold_wheel, tmp_path):
    """The wheel with the `verifier` extra's packages alone, and no site-packages at all (`python -S`): no torch."""
    from tests.pip_target import pip_target
    site = pip_target(tmp_path / "site", str(twofold_wheel), "sympy==1.14.0", "mpmath==1.3.0")
    code = ("import sys, twofold.verifier as v\n"
            "assert v.math_reward(prompts=['q'], completions=['\\\\boxed{\\\\sqrt[3]{-8}}'], answer=['-2']) == [1.0]\n"
            "assert 'torch' not in sys.modules and v.__file__.startswith(sys.argv[1])\n")
    run = subprocess.run([sys.executable, "-S", "-c", code, str(site)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(site), PYTHONNOUSERSITE="1"))
    assert run.returncode == 0, run.stderr
    probe = subprocess.run([sys.executable, "-S", "-c", "import torch"], capture_output=True, text=True,
                           cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(site)))
    assert probe.returncode != 0  # torch really is absent there
