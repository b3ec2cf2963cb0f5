"""Split invariance of every objective: 1, 2 or 3 micro-batches, and 2 ranks, give the one-batch gradient.

Objective-level and cheap: the log-probs (and per-token entropies) of a packed mini-batch are synthetic float64
leaves, one per response token, and each part of the batch goes through exactly what the trainer does with a
micro-batch: `packing.collate`, `trainer.batch_totals` over the whole mini-batch, the objective's batch statistics
summed over the parts (and over ranks: `trainer.sum_statistics`, gloo), `trainer.objective_args`. The 2-rank case
runs two real gloo processes that all-reduce their statistics and their gradients.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from twofold.engine.train.distributed import DistEnv
from twofold.engine.train.packing import Sequence, collate
from twofold.engine.train.trainer import WHOLE_GROUPS, batch_totals, objective_args, sum_statistics
from twofold.objectives import BATCH_STATISTICS, OBJECTIVES, group_advantages

DT = torch.float64
ONLINE = ("rft", "grpo", "dapo", "drgrpo", "gspo", "cispo", "nft", "oreal", "jepo")
PAIRS = ("redi", "dpo", "simpo")
KWARGS = {"drgrpo": {"constant": 8.0}, "grpo": {"beta": 0.04}, "oreal": {"beta": 0.01}, "jepo": {"beta": 0.1},
          "dpo": {"beta": 0.1}, "gspo": {"eps_low": 0.05, "eps_high": 0.08}}


def make_batch(name: str, groups: int = 4, size: int = 3, seed: int = 0) -> list[Sequence]:
    """`groups` x `size` sequences with random prompt / response lengths and the fields `name` reads."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.rand(n, generator=g, dtype=DT).tolist()  # noqa: E731
    batch = []
    for i in range(groups * size):
        prompt, response = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(3, 7, (1,), generator=g))
        tokens = torch.randint(1, 50, (prompt + response,), generator=g).tolist()
        gid, correct = i // size, float(i % size == 0 or (i % size == 2 and i % 2 == 0))
        seq = Sequence(tokens, prompt, row_id=i, fields={"group_ids": gid, "rewards": correct})
        seq.token_fields = {"old_logp": [-0.3 - 2 * r for r in rand(response)],
                            "ref_logp": [-0.3 - 2 * r for r in rand(response)],
                            "token_scores": [2 * r - 1 for r in rand(response)]}
        batch.append(seq)
    ids = torch.tensor([s.fields["group_ids"] for s in batch])
    rewards = torch.tensor([s.fields["rewards"] for s in batch], dtype=DT)
    rloo = group_advantages(2 * rewards - 1, ids, "rloo")
    grpo = group_advantages(rewards, ids, "grpo")
    rate = {gid: float(rewards[ids == gid].mean()) for gid in ids.tolist()}
    for i, seq in enumerate(batch):
        fields = seq.fields
        if name in PAIRS:
            seq.fields = {"pair_id": i // 2, "chosen": int(i % 2 == 0), "ref_logp_sum": -2.0 * seq.response_len}
        elif name == "jepo":
            bad = i in (1, 2 * size)  # one badly formatted sample in two groups
            answer = 2
            seq.fields = {"group_ids": fields["group_ids"], "valid": float(not bad),
                          "format_rewards": -10.0 if bad else 0.0}
            seq.token_fields |= {"cot_mask": [1.0] * (seq.response_len - answer) + [0.0] * answer,
                                 "answer_mask": [0.0] * (seq.response_len - answer) + [1.0] * answer}
        elif name in ("nft", "rft"):
            fields["correct_rate"] = rate[fields["group_ids"]]
        else:
            fields["advantages"] = float((rloo if name == "oreal" else grpo)[i])
    return batch


def units(name: str, batch: list[Sequence]) -> list[int]:
    """What must stay in one micro-batch: a pair, a JEPO group, else a sequence."""
    if name in PAIRS:
        return [s.fields["pair_id"] for s in batch]
    if name in WHOLE_GROUPS:
        return [s.fields["group_ids"] for s in batch]
    return list(range(len(batch)))


def split(name: str, batch: list[Sequence], parts: int) -> list[list[int]]:
    """`parts` micro-batches of consecutive units."""
    keys = list(dict.fromkeys(units(name, batch)))
    chunks = [set(keys[k * len(keys) // parts:(k + 1) * len(keys) // parts]) for k in range(parts)]
    of = units(name, batch)
    return [[i for i in range(len(batch)) if of[i] in chunk] for chunk in chunks]


def token_view(batch: list[Sequence], indices: list[int], leaf: torch.Tensor) -> tuple:
    """(micro-batch, its [N] log-probs and entropies gathered from the per-response-token leaves)."""
    mb = collate(batch, indices)
    start = torch.tensor([0] + [s.response_len for s in batch]).cumsum(0)
    source = torch.cat([torch.arange(start[i], start[i + 1]) for i in indices])
    where = mb.loss_mask.nonzero().squeeze(1)
    logp = torch.zeros(mb.num_tokens, dtype=DT).index_copy(0, where, leaf[0, source])
    entropy = torch.zeros(mb.num_tokens, dtype=DT).index_copy(0, where, leaf[1, source])
    return mb, logp, entropy


def leaves(batch: list[Sequence]) -> torch.Tensor:
    """[2, tokens] leaf: row 0 log-probs in (-2.3, -0.05), row 1 entropies in (0.5, 2.5)."""
    n = sum(s.response_len for s in batch)
    g = torch.Generator().manual_seed(7)
    logp = -(0.05 + 2.25 * torch.rand(n, generator=g, dtype=DT))
    return torch.stack([logp, 0.5 + 2 * torch.rand(n, generator=g, dtype=DT)]).requires_grad_()


def local_gradient(name: str, batch: list[Sequence], plan: list[list[int]], env: DistEnv) -> torch.Tensor:
    """This rank's accumulated gradient over its micro-batches `plan`, as the trainer forms it."""
    fn = OBJECTIVES[name]
    kwargs = KWARGS.get(name, {}) | ({"entropy_coef": 0.01} if name in ONLINE else {})
    leaf = leaves(batch)
    totals = batch_totals(batch)
    stats_fn = BATCH_STATISTICS.get(name)
    if stats_fn is not None:
        parts = [stats_fn(**objective_args(stats_fn, name, logp.detach(), mb, {}, False, kwargs, strict=False))
                 for mb, logp, _ in (token_view(batch, p, leaf) for p in plan)]
        totals |= sum_statistics(parts, env)
    for indices in plan:
        mb, logp, entropy = token_view(batch, indices, leaf)
        args = objective_args(fn, name, logp, mb, totals, False, kwargs, entropy if name in ONLINE else None)
        fn(**args)[0].backward()
    return leaf.grad


def one_rank(name: str, parts: int) -> torch.Tensor:
    batch = make_batch(name)
    return local_gradient(name, batch, split(name, batch, parts), DistEnv(0, 1, torch.device("cpu")))


NAMES = sorted(OBJECTIVES)


@pytest.mark.parametrize("name", NAMES)
def test_every_objective_gives_the_one_batch_gradient_at_any_micro_batch_split(name):
    whole = one_rank(name, 1)
    assert whole[0].abs().sum() > 0
    for parts in (2, 3):
        torch.testing.assert_close(one_rank(name, parts), whole, rtol=1e-12, atol=1e-15, msg=f"{parts} parts")


def _two_rank_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    env, results = DistEnv(rank, 2, torch.device("cpu")), {}
    for name in NAMES:
        batch = make_batch(name)
        for per_rank in (1, 2):  # 2 or 4 micro-batches in all, dealt alternately to the ranks
            plan = split(name, batch, 2 * per_rank)[rank::2]
            grad = local_gradient(name, batch, plan, env)
            dist.all_reduce(grad)  # FSDP2 sums gradients over ranks
            results[f"{name}/{per_rank}"] = grad
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_two_ranks_give_the_one_batch_gradient_for_every_objective(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "grads.pt"
    # fork: the ranks inherit the imported modules, so the test costs seconds, not two fresh interpreters
    mp.start_processes(_two_rank_worker, args=(port, str(out)), nprocs=2, join=True, start_method="fork")
    got = torch.load(out)
    for name in NAMES:
        whole = one_rank(name, 1)
        for per_rank in (1, 2):
            torch.testing.assert_close(got[f"{name}/{per_rank}"], whole, rtol=1e-12, atol=1e-15,
                                       msg=f"{name}, {per_rank} micro-batch(es) per rank")
