"""Rank faults under real torchrun (two gloo ranks on CPU): a stopped rank ends the job within the collective
timeout with a message naming it, and ranks do not outlive their launcher."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 10


def _launch(run_dir: Path, timeout_s: float) -> subprocess.Popen:
    """A two-rank offline run long enough to be interrupted (it is never let finish)."""
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2", "-m",
           "twofold.engine.run.train", "--config", str(REPO / "configs" / "tiny_sft.yaml"), f"run_dir={run_dir}",
           "model.dtype=float32", "train.steps=100000", "checkpoint.every=0", "log.progress_bar=false",
           "log.plot=false", f"train.collective_timeout_s={timeout_s}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _ranks(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the launcher's worker processes, read from /proc."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = next((v for v in environ if v.startswith(b"RANK=")), None)
        if ppid == launcher.pid and rank is not None:
            ranks[int(rank[5:])] = int(entry.name)
    return ranks


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent (here: init) has not reaped it yet


def _wait_until_training(launcher: subprocess.Popen, run_dir: Path) -> dict[int, int]:
    deadline = time.monotonic() + 240
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert launcher.poll() is None, launcher.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the two-rank run did not start training"
        time.sleep(0.2)
    ranks = _ranks(launcher)
    assert sorted(ranks) == [0, 1]
    return ranks


def _end(launcher: subprocess.Popen, ranks: dict[int, int]) -> str:
    for pid in ranks.values():
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGKILL)
    out, _ = launcher.communicate(timeout=60)
    return out


def test_a_stopped_rank_ends_the_job_within_the_timeout_and_is_named(tmp_path):
    launcher = _launch(tmp_path, TIMEOUT_S)
    ranks = {}
    try:
        ranks = _wait_until_training(launcher, tmp_path)
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        while _alive(ranks[0]) and time.monotonic() - stopped < TIMEOUT_S + 60:
            time.sleep(0.2)
        waited = time.monotonic() - stopped
    finally:
        out = _end(launcher, ranks)
    assert not _alive(ranks[0]), out[-3000:]
    assert waited < TIMEOUT_S + 20, f"rank 0 took {waited:.0f} s to give up"
    assert f"rank 1 (pid {ranks[1]} on " in out, out[-3000:]
    assert "did not answer for 6 s: stopped, hung or dead" in out  # 3 heartbeats of min(5, 10 / 5) s
    assert f"a collective timed out after {TIMEOUT_S} s (train.collective_timeout_s)" in out


def test_ranks_exit_when_their_launcher_is_killed(tmp_path):
    launcher = _launch(tmp_path, 600)
    ranks = {}
    try:
        ranks = _wait_until_training(launcher, tmp_path)
        os.kill(launcher.pid, signal.SIGKILL)  # the torchrun agent only: its ranks are left on their own
        killed = time.monotonic()
        while any(_alive(pid) for pid in ranks.values()) and time.monotonic() - killed < 30:
            time.sleep(0.2)
        left = [rank for rank, pid in ranks.items() if _alive(pid)]
    finally:
        out = _end(launcher, ranks)
    assert left == [], out[-3000:]
    assert "its launcher (pid" in out or not out  # the message goes to the dead launcher's pipe, when it can


def test_a_killed_rank_is_named_in_the_engines_words(tmp_path):
    """A SIGKILLed rank: its peer's collective fails at once (gloo: connection reset); the peer names the dead rank
    in one line instead of ending on gloo's traceback."""
    launcher = _launch(tmp_path, 600)
    ranks = {}
    try:
        ranks = _wait_until_training(launcher, tmp_path)
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        while _alive(ranks[0]) and time.monotonic() - killed < 60:
            time.sleep(0.2)
    finally:
        out = _end(launcher, ranks)
    rank0 = [line for line in out.splitlines() if line.startswith("[rank0]:") or line.startswith("error: rank 0")]
    assert f"rank 0: a peer closed its connection in the middle of a collective: rank 1 (pid {ranks[1]} on " in out, \
        out[-3000:]
    assert "has exited (its own output says why). Ending the job." in out
    assert not rank0 or "Connection reset by peer" not in rank0[-1], rank0[-3:]
