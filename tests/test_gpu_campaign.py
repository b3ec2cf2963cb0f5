"""bench/gpu_campaign.sh --dry-run: every stage's command line runs on CPU at tiny shapes, so the one call on a GPU
cannot fail on a typo; and the summariser judges each target from the JSON the stages write."""
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import gpu_campaign

REPO = Path(__file__).resolve().parents[1]
STAGES = ["tests", "kernels", "fused-nft", "fused-grpo", "step", "triton-suite"]


def campaign(out, *args, timeout=900):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_campaign.sh"), "--out", str(out), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("campaign")
    done = campaign(out, "--dry-run")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout, json.loads((out / "campaign.json").read_text())


def test_dry_run_runs_every_stage_and_writes_what_the_device_returns(dry_run):
    out, _, result = dry_run
    assert result["env"]["dry_run"] is True
    assert [s["stage"] for s in result["stages"]] == STAGES
    assert {s["stage"]: s["status"] for s in result["stages"]} == dict.fromkeys(STAGES, "ok")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["campaign.json", "campaign.log", "fused-grpo.json", "fused-nft.json", "kernels.json",
                     "step.json"]
    # The device returns at most 8 files, named in letters, digits, '.', '_' and '-'.
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)


def test_dry_run_stages_produce_their_results(dry_run):
    _, _, result = dry_run
    stages = {s["stage"]: s for s in result["stages"]}
    gpu_tests = stages["tests"]["tests"]
    assert gpu_tests["skipped"] >= 5 and gpu_tests["failed"] == gpu_tests["errors"] == 0  # no CUDA: skipped
    assert stages["triton-suite"]["tests"]["passed"] == 1  # one interpreted test: the suite's command line works
    kernels = stages["kernels"]["result"]["shapes"]["tiny"]["cases"]
    assert {"gemm1", "gemm3", "eager_fwd", "eager", "ours_fwd", "ours"} <= set(kernels)
    assert all(c["time_ms"] > 0 and c["output_mib"] > 0 for c in kernels.values())
    assert [stages[f"fused-{o}"]["result"]["objective"] for o in ("nft", "grpo")] == ["nft", "grpo"]
    # bench.fused's CPU memory probes are left out here (tests/test_bench.py runs them); bench.step's probe runs
    # on the GPU as here, a fresh process per head, and is what tests bench.step's memory column
    assert all(r["peak_extra_mib"] is None for o in ("nft", "grpo") for r in stages[f"fused-{o}"]["result"]["rows"])
    assert [r["head"] for r in stages["step"]["result"]] == ["fused", "eager"]
    assert all(r["attn"] == "twofold_packed_sdpa" for r in stages["step"]["result"])  # sdpa, per sequence
    assert all(r["peak_mem_gib"] >= 0 for r in stages["step"]["result"])


def test_dry_run_measures_no_target_and_prints_the_table(dry_run):
    _, stdout, result = dry_run
    assert [t["status"] for t in result["targets"]] == ["not measured"] * 5
    table = stdout[stdout.index("GPU campaign (DRY RUN"):]
    for line in ("tests ", "kernels ", "bench.fused nft", "bench.fused grpo", "bench.step fused", "targets"):
        assert line in table
    assert table.count("not measured") == 5


def test_a_spent_budget_records_the_stage_as_not_run(tmp_path):
    done = campaign(tmp_path, "--dry-run", "--only", "kernels", "--budget", "10", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = json.loads((tmp_path / "campaign.json").read_text())["stages"]
    assert [(s["stage"], s["status"]) for s in stages] == [("kernels", "not run (no time left)")]
    assert not (tmp_path / "kernels.json").exists()


def test_bad_arguments_are_refused_before_anything_runs(tmp_path):
    for args in (["--only", "kernal"], ["--bogus"]):
        done = campaign(tmp_path, "--dry-run", *args, timeout=60)
        assert done.returncode == 2 and "gpu_campaign.sh" in done.stderr
    assert not (tmp_path / "campaign.json").exists()


def test_stage_status_from_exit_codes():
    assert gpu_campaign.stage_status(0, 3, 10) == "ok"
    assert gpu_campaign.stage_status(124, 10, 10) == gpu_campaign.stage_status(137, 30, 10) == "timed out at 10 s"
    assert gpu_campaign.stage_status(1, 3, 10) == "failed (exit 1)"
    assert gpu_campaign.stage_status(None, 0, 0) == "not run (no time left)"


def as_gpu_run(result, kernels_s1, kernels_s3, liger_grpo_ms, mfu):
    """The dry run's campaign with its CPU results relabelled as GPU ones at S1 and S3 with the given figures:
    each target's arithmetic and thresholds, on the JSON layout the stages really write."""
    gpu = copy.deepcopy(result)
    stages = {s["stage"]: s for s in gpu["stages"]}
    kernels = stages["kernels"]["result"]
    kernels["bf16_matmul_peak_tflops"] = 800.0
    tiny = kernels["shapes"].pop("tiny")
    for shape, figures in (("S1", kernels_s1), ("S3", kernels_s3)):
        cases = copy.deepcopy(tiny["cases"])
        for name, (ms, frac, extra_mib) in figures.items():
            cases[name].update(time_ms=ms, frac_of_peak=frac, tflops=frac * 800, peak_extra_mib=extra_mib,
                               output_mib=0.0)
        cases["liger_grpo"] = {"time_ms": liger_grpo_ms, "frac_of_peak": 0.1, "tflops": 80.0,
                               "peak_extra_mib": 900.0, "output_mib": 0.0}
        kernels["shapes"][shape] = {**tiny, "cases": cases}
    for row in stages["step"]["result"]:
        row.update(device="cuda:0", preset="qwen2.5-1.5b-shape", mfu=mfu)
    return [t["status"] for t in gpu_campaign.judge(gpu)]


def test_targets_met_and_not_met_from_gpu_shaped_results(dry_run):
    _, _, result = dry_run
    good = {"ours_fwd": (13.0, 0.71, 10.0), "ours_ce": (22.0, 0.6, 250.0), "ours_fused_dapo": (10.0, 0.5, 200.0)}
    met = as_gpu_run(result, good, good, liger_grpo_ms=30.0, mfu=0.46)
    assert met == ["met"] * 5
    bad = {"ours_fwd": (15.0, 0.69, 10.0), "ours_ce": (23.0, 0.6, 257.0), "ours_fused_dapo": (10.1, 0.5, 10.0)}
    not_met = as_gpu_run(result, bad, bad, liger_grpo_ms=30.0, mfu=0.44)
    assert not_met == ["not met"] * 5


def test_a_timed_out_test_stage_still_reports_the_tests_that_ran(tmp_path):
    started = tmp_path / "slow_started"
    (tmp_path / "test_two.py").write_text(f"import pathlib, time\n\ndef test_fast():\n    pass\n\n"
                                          f"def test_slow():\n    pathlib.Path({str(started)!r}).touch()\n"
                                          f"    time.sleep(120)\n")
    junit = tmp_path / "junit.xml"
    cmd = ["timeout", "-k", "20", "100", sys.executable, "-m", "bench.gpu_campaign", "pytest", "-q", "-p",
           "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path / "test_two.py"), f"--junitxml={junit}"]
    stage = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and stage.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert started.exists(), "test_slow never started"
        # SIGALRM is timeout's own timer firing: the stage is cut as at its limit, once test_fast has passed
        stage.send_signal(signal.SIGALRM)
        out, _ = stage.communicate(timeout=60)
    finally:
        if stage.poll() is None:
            stage.kill()
    assert stage.returncode == 124, out[-2000:]
    counts = gpu_campaign.pytest_counts(str(junit))
    assert (counts["passed"], counts["failed"], counts["errors"]) == (1, 0, 0)
