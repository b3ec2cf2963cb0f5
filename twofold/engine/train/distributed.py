"""Process group setup: torchrun (NCCL on GPU, gloo on CPU) or one process without torchrun.

A single process still gets a one-rank process group, so FSDP2, DCP checkpoints and the gradient reduction run the
same code at every world size (and a checkpoint written by one process resumes on many, and back).

Bounded hangs: every collective times out after `train.collective_timeout_s` (gloo's default is 30 minutes; a
stopped or deadlocked rank would otherwise hold the job that long). Each rank of a multi-rank job runs a
supervisor thread that publishes a heartbeat in the rendezvous store, so that a rank whose collective timed out
can name the rank that stopped answering, and that ends the rank when its launcher (the torchrun agent) is gone.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("twofold")
HEARTBEAT_KEY = "twofold/heartbeat/{rank}"


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = 600.0) -> DistEnv:
    """Join (or create) the default process group, every collective bounded by `timeout_s`, and pick this rank's
    device; under torchrun also start the supervisor (heartbeat, launcher watch)."""
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "RANK" in os.environ:  # launched by torchrun: env:// rendezvous
            dist.init_process_group(backend, device_id=device if use_cuda else None,
                                    timeout=timedelta(seconds=timeout_s))
            if dist.get_world_size() > 1:
                Supervisor(dist.get_rank(), timeout_s).start()
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistEnv(dist.get_rank(), dist.get_world_size(), device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks in one collective (fp64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _store_client(timeout_s: float) -> dist.TCPStore:
    """A private client of the rendezvous store (MASTER_ADDR:MASTER_PORT), usable from any thread."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def heartbeat_interval(timeout_s: float) -> float:
    return min(5.0, timeout_s / 5)


class Supervisor(threading.Thread):
    """Every few seconds: publish this rank's heartbeat; end the process if the launcher that started it died
    (then nothing would stop or restart it, and its peers are gone or about to be)."""

    def __init__(self, rank: int, timeout_s: float):
        super().__init__(name="twofold-supervisor", daemon=True)
        self.rank, self.interval = rank, heartbeat_interval(timeout_s)
        self.launcher = os.getppid()
        self.key = HEARTBEAT_KEY.format(rank=rank)
        self.store = _store_client(max(10.0, timeout_s))

    def run(self) -> None:
        me, beats = {"pid": os.getpid(), "host": socket.gethostname()}, 0
        while True:
            if os.getppid() != self.launcher:
                log.error("rank %d: its launcher (pid %d) has exited; ending this rank", self.rank, self.launcher)
                os._exit(1)  # the main thread may be blocked in a collective: no clean shutdown is possible
            beats += 1
            try:
                self.store.set(self.key, json.dumps({**me, "beats": beats}))
            except Exception:  # noqa: BLE001  the store lives in the launcher: gone means the launcher is dying
                pass
            time.sleep(self.interval)


def is_timeout(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and "timed out" in str(err).lower()


PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
"""gloo's words for a peer whose process is gone (its sockets closed by the kernel)."""


def is_peer_lost(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and any(words in str(err) for words in PEER_LOST)


def _exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def describe_lost_peer() -> str:
    """Which ranks died, for the message of a collective that lost its peer: each rank's last heartbeat names its
    pid and host, and a pid on this host that is gone is a rank that exited."""
    rank, world = dist.get_rank(), dist.get_world_size()
    head = f"rank {rank}: a peer closed its connection in the middle of a collective"
    try:
        store = _store_client(5.0)
        keys = {r: HEARTBEAT_KEY.format(rank=r) for r in range(world) if r != rank}
        beats = {r: json.loads(store.get(k)) for r, k in keys.items() if store.check([k])}
    except Exception:  # noqa: BLE001
        beats = {}
    here = socket.gethostname()
    dead = [f"rank {r} (pid {b['pid']} on {b['host']})" for r, b in sorted(beats.items())
            if b["host"] == here and _exited(b["pid"])]
    if dead:
        return f"{head}: {', '.join(dead)} has exited (its own output says why). Ending the job."
    return f"{head}: another rank of this job died or lost its network (see the logs of the other hosts). " \
           "Ending the job."


def describe_hang(timeout_s: float) -> str:
    """Which ranks stopped publishing heartbeats, for the message of a timed-out collective: the store is read twice,
    three heartbeat intervals apart (beat counters, not clocks, so hosts' clock skew does not matter)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    head = f"rank {rank}: a collective timed out after {timeout_s:g} s (train.collective_timeout_s)"
    wait = 3 * heartbeat_interval(timeout_s)
    try:
        store = _store_client(min(10.0, timeout_s))
        keys = {r: HEARTBEAT_KEY.format(rank=r) for r in range(world) if r != rank}
        before = {r: json.loads(store.get(k)) if store.check([k]) else None for r, k in keys.items()}
        time.sleep(wait)
        after = {r: json.loads(store.get(k)) if store.check([k]) else None for r, k in keys.items()}
    except Exception as err:  # noqa: BLE001
        return f"{head}; the rendezvous store does not answer either ({type(err).__name__}): the launcher or " \
               f"the store's host is gone"
    silent = [f"rank {r} never answered" if after[r] is None else
              f"rank {r} (pid {after[r]['pid']} on {after[r]['host']}) did not answer for {wait:g} s"
              for r in sorted(keys) if after[r] is None or after[r] == before[r]]
    if not silent:
        return f"{head}; every rank is alive, so one is stuck in its own work or in a different collective"
    return f"{head}; {', '.join(silent)}: stopped, hung or dead. Ending the job."
