"""bench.step runs end to end on CPU and reports throughput and peak memory for each head."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _bench(*args):
    cmd = [sys.executable, "-m", "bench.step", *args]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_step_benchmark_reports_tokens_per_second_on_cpu():
    # The memory probe (a fresh process per variant) is tested by the GPU campaign's dry run, which runs it as the
    # GPU does (tests/test_gpu_campaign.py); here the three heads are timed and compared without it.
    results = _bench("--preset", "tiny-qwen2", "--batch-tokens", "256", "--max-len", "64", "--budget", "128",
                     "--steps", "1", "--warmup", "1", "--head-repeats", "1", "--objective", "nft", "--no-memory")
    assert [r["head"] for r in results] == ["fused", "logprobs", "eager"]
    for r in results:
        assert r["tokens_per_s"] > 0 and "peak_mem_gib" not in r and r["microbatches"] >= 2 and "mfu" not in r
        assert 0 < r["head_s"]["min"] <= r["head_s"]["median"] <= r["head_s"]["max"] and 0 < r["head_share"]
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)  # one step, same model and batch
    assert results[0]["loss"] == pytest.approx(results[2]["loss"], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_benchmark_reports_mfu_on_gpu():
    results = _bench("--device", "cuda", "--steps", "2")
    assert all(0 < r["mfu"] < 1 for r in results)
