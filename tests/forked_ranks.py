"""Ranks forked from the test process with torchrun's environment, for checks of what two ranks compute (FSDP2
shards, reduced gradients): each rank inherits the imported modules, so a check costs seconds instead of a launcher
and two fresh interpreters. `init_distributed` joins through env:// as under torchrun. torchrun itself is tested
where it is the point: the CLI (test_engine_distributed, test_online), rank faults, the sampler, the verifier."""
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 gives torchrun's ranks: they share the cores
    fn(rank, *args)


def run_ranks(fn, *args, world: int = 2, timeout_s: float = 300) -> None:
    """fn(rank, *args) on `world` forked ranks; raises with a rank's traceback if one fails, or after timeout_s."""
    assert not dist.is_initialized(), "the test process holds a process group: forked ranks would inherit it"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = mp.start_processes(_rank, args=(world, port, fn, args), nprocs=world, join=False, start_method="fork")
    deadline = time.monotonic() + timeout_s
    try:
        while not ranks.join(timeout=1.0):  # raises ProcessRaisedException / ProcessExitedException on a failure
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} forked ranks still running after {timeout_s:g} s")
    finally:
        for process in ranks.processes:
            if process.is_alive():
                process.kill()
