"""verify_batch: hard per-check wall-clock limits, a batch budget, recovery, and any-thread use.

The pool runs `faulty_check` from this module: it behaves like `is_equivalent` except for marker
answers that hang, crash the worker, raise, or allocate memory without bound.
"""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from twofold.engine.verifier import VerifierPool, is_equivalent, verify_batch

REPO = Path(__file__).resolve().parents[1]
CHECK = "tests.test_verifier_pool:faulty_check"
TIMEOUT = 1.0
SLACK = 8.0  # a replaced worker re-imports sympy; generous for loaded 2-core CI machines, still far from a hang


def faulty_check(answer: str, gold: str) -> bool:
    if answer == "HANG":
        while True:
            pass
    if answer == "CRASH":
        os._exit(3)
    if answer == "BOOM":
        raise ValueError("boom")
    if answer == "SLOW":
        time.sleep(1.0)
        return True
    if answer == "HOG":
        return len(bytearray(4 << 30)) > 0  # over the 512 MB address-space cap
    return is_equivalent(answer, gold)


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(num_workers=2, timeout=TIMEOUT, memory_mb=512, check=CHECK) as p:
        p.verify_batch(["\\boxed{1}"], ["1"])  # wait until the workers are up
        yield p


def _batch(n: int):
    """n distinct responses, alternately right and wrong."""
    responses = [f"so the answer is \\boxed{{\\frac{{{k}}}{{2}}}}" for k in range(n)]
    golds = [str(k / 2) if k % 2 == 0 else str(k) for k in range(n)]
    return responses, golds, [1.0 if k % 2 == 0 else 0.0 for k in range(n)]


def test_verify_batch_scores_right_and_wrong_answers(pool):
    start = time.monotonic()
    responses, golds, expected = _batch(20)
    assert pool.verify_batch(responses, golds) == expected
    assert time.monotonic() - start < 10


def test_hanging_check_is_killed_at_its_timeout_and_does_not_delay_the_others(pool):
    responses, golds, expected = _batch(40)
    start = time.monotonic()
    assert pool.verify_batch(responses, golds) == expected
    baseline = time.monotonic() - start
    timeouts, restarts = pool.stats.timeouts, pool.stats.restarts
    responses, golds, expected = _batch(41)
    responses[20], expected[20] = "\\boxed{HANG}", 0.0
    golds = [g + " " for g in golds]  # new cache keys: every check runs again
    start = time.monotonic()
    assert pool.verify_batch(responses, golds) == expected
    elapsed = time.monotonic() - start
    assert elapsed < baseline + TIMEOUT + SLACK
    assert (pool.stats.timeouts, pool.stats.restarts) == (timeouts + 1, restarts + 1)


def test_pool_recovers_after_a_timeout(pool):
    start = time.monotonic()
    assert pool.verify_batch(["\\boxed{HANG}", "\\boxed{2}"], ["1", "2"]) == [0.0, 1.0]
    assert pool.verify_batch(["\\boxed{3}", "\\boxed{4}"], ["3", "5"]) == [1.0, 0.0]
    assert time.monotonic() - start < TIMEOUT + 2 * SLACK


def test_verify_batch_from_a_non_main_thread_enforces_the_timeout(pool):
    out = {}
    start = time.monotonic()
    thread = threading.Thread(target=lambda: out.update(
        scores=pool.verify_batch(["\\boxed{HANG}", "\\boxed{7}"], ["0", "7"], timeout=TIMEOUT)))
    thread.start()
    thread.join(timeout=30)
    assert out["scores"] == [0.0, 1.0]
    assert time.monotonic() - start < TIMEOUT + SLACK


def test_budget_bounds_the_whole_call_and_counts_unfinished_checks(pool):
    over = pool.stats.over_budget
    responses = ["\\boxed{HANG}"] * 3 + ["\\boxed{1}"]
    start = time.monotonic()
    scores = pool.verify_batch(responses, ["a", "b", "c", "1"], timeout=30.0, budget=1.5)
    assert time.monotonic() - start < 1.5 + SLACK
    assert scores[:3] == [0.0, 0.0, 0.0]
    assert pool.stats.over_budget - over >= 2  # two hung in workers, the rest queued or finished
    assert pool.verify_batch(["\\boxed{5}"], ["5"]) == [1.0]


def test_check_cut_off_by_the_budget_is_not_cached_as_wrong(pool):
    assert pool.verify_batch(["\\boxed{SLOW}"], ["x"], budget=0.3) == [0.0]
    assert pool.verify_batch(["\\boxed{SLOW}"], ["x"], timeout=5.0) == [1.0]


def test_crashing_worker_scores_zero_and_is_replaced(pool):
    start = time.monotonic()
    errors = pool.stats.errors
    assert pool.verify_batch(["\\boxed{CRASH}", "\\boxed{6}"], ["1", "6"]) == [0.0, 1.0]
    assert pool.stats.errors == errors + 1
    assert pool.verify_batch(["\\boxed{6}"], ["6 "]) == [1.0]
    assert time.monotonic() - start < SLACK * 2


def test_exception_in_a_check_scores_zero_and_is_counted(pool):
    start = time.monotonic()
    errors = pool.stats.errors
    assert pool.verify_batch(["\\boxed{BOOM}"], ["1"]) == [0.0]
    assert pool.stats.errors == errors + 1
    assert time.monotonic() - start < SLACK


def test_memory_cap_turns_a_memory_hog_into_a_zero_without_a_timeout(pool):
    start = time.monotonic()
    timeouts, errors = pool.stats.timeouts, pool.stats.errors
    assert pool.verify_batch(["\\boxed{HOG}"], ["1"]) == [0.0]
    assert (pool.stats.timeouts, pool.stats.errors) == (timeouts, errors + 1)  # MemoryError, not a kill
    assert time.monotonic() - start < TIMEOUT


def test_duplicate_and_repeated_checks_hit_the_cache(pool):
    start = time.monotonic()
    hits = pool.stats.cache_hits
    assert pool.verify_batch(["\\boxed{11}"] * 8, ["11"] * 8) == [1.0] * 8
    assert pool.stats.cache_hits - hits == 7
    assert time.monotonic() - start < SLACK


def test_responses_without_an_answer_score_zero_without_a_worker(pool):
    start = time.monotonic()
    missing = pool.stats.no_answer
    assert pool.verify_batch(["no box here", "<think>unfinished \\boxed{1}"], ["1", "1"]) == [0.0, 0.0]
    assert pool.stats.no_answer == missing + 2
    assert time.monotonic() - start < 0.5


def test_concurrent_callers_both_get_their_own_results(pool):
    results = {}
    start = time.monotonic()

    def call(name, k):
        responses, golds, expected = _batch(10 + k)
        results[name] = pool.verify_batch(responses, [g + "  " for g in golds]) == expected

    threads = [threading.Thread(target=call, args=(n, k)) for k, n in enumerate(("a", "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == {"a": True, "b": True}
    assert time.monotonic() - start < 15


def test_mismatched_lengths_raise_a_value_error(pool):
    start = time.monotonic()
    with pytest.raises(ValueError, match="responses and golds"):
        pool.verify_batch(["\\boxed{1}"], [])
    assert time.monotonic() - start < 0.5


def test_a_worker_that_cannot_start_raises_instead_of_scoring_zero():
    start = time.monotonic()
    with VerifierPool(num_workers=1, check="twofold.engine.verifier.no_such_module:check") as broken:
        with pytest.raises(RuntimeError, match="before it was ready"):
            broken.verify_batch(["\\boxed{1}"], ["1"])
    assert time.monotonic() - start < 10


TORCHRUN_SCRIPT = r"""
import os, threading
from twofold.engine.verifier import verify_batch
out = {}
worker = threading.Thread(target=lambda: out.update(s=verify_batch(["\\boxed{2}", "\\boxed{3}"], ["2", "2"], timeout=5)))
worker.start(); worker.join()
print(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: {out['s']}", flush=True)
"""


@pytest.mark.slow
def test_verify_batch_under_torchrun_from_a_thread_on_each_rank(tmp_path):
    start = time.monotonic()
    script = tmp_path / "rank.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
                             str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for rank in (0, 1):
        assert f"rank {rank} of 2: [1.0, 0.0]" in result.stdout
    assert time.monotonic() - start < 60


def test_module_level_verify_batch_uses_one_default_pool():
    start = time.monotonic()
    assert verify_batch(["\\boxed{0.25}"], ["\\frac14"]) == [1.0]
    assert verify_batch(["\\boxed{x=2}"], ["2"], timeout=2.0) == [1.0]
    assert time.monotonic() - start < 10
