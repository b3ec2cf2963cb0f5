"""The frozen reference policy (`model.build_reference`): a copy of the initial policy's shards, sharded by FSDP2
like the policy but stored in the compute dtype, no parameter requiring grad, in eval mode, no fp32 master copy,
its own storage; its log-probs equal the policy's before the first update, exactly (fp32 and bf16), at one rank
and at two.

The two-rank check runs on ranks forked from the test process (tests/forked_ranks.py); run as a module under
torchrun (`python -m torch.distributed.run --nproc_per_node=2 -m tests.test_reference_model`) it performs the same
check on every rank."""
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from twofold.engine.run.schema import ModelConfig
from twofold.engine.train.distributed import init_distributed, shutdown_distributed
from twofold.engine.train.model import build_policy, build_reference
from twofold.engine.train.packing import Sequence
from twofold.engine.train.trainer import sequence_logprobs

from tests.forked_ranks import run_ranks


def random_batch(n: int = 12, seed: int = 0) -> list[Sequence]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(5, 30, (1,), generator=g))
        prompt = int(torch.randint(1, length - 2, (1,), generator=g))
        out.append(Sequence(torch.randint(4, 100, (length,), generator=g).tolist(), prompt, row_id=i))
    return out


def check_reference(dtype: str) -> None:
    """Raises AssertionError unless the reference is frozen, sharded, stored in `dtype`, and scores like the
    policy at step 0 (identical floats)."""
    env = init_distributed()
    cfg = ModelConfig(preset="tiny-qwen2", dtype=dtype)
    policy = build_policy(cfg, env, seed=0)
    reference = build_reference(cfg, env, policy)
    compute = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    params = dict(reference.named_parameters())
    assert params.keys() == dict(policy.named_parameters()).keys()
    assert all(isinstance(p, DTensor) and p.device_mesh.size() == env.world_size for p in params.values())
    assert not any(p.requires_grad for p in params.values()), "a reference parameter requires grad"
    assert {p.dtype for p in params.values()} == {compute}, "the reference keeps another copy than model.dtype"
    assert not reference.training and not any(m.training for m in reference.modules())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in policy.parameters())  # the policy unchanged
    for bp, br in zip(policy.buffers(), reference.buffers()):  # rotary frequencies: fp32 in both
        assert br.dtype == bp.dtype and torch.equal(br, bp)
    batch = random_batch()
    ours = sequence_logprobs(reference, batch, env, budget=96, temperature=0.7)
    theirs = sequence_logprobs(policy, batch, env, budget=96, temperature=0.7)
    assert ours == theirs, "reference and policy log-probs differ at step 0"
    # after scoring, each rank holds only its shards (FSDP2 would keep a root's parameters gathered for backward)
    assert all(isinstance(p, DTensor) for p in reference.parameters())
    if env.world_size > 1:
        assert all(p.to_local().numel() < p.numel() for p in reference.parameters())
    assert all(len(v) == s.response_len for v, s in zip(ours, batch))
    with torch.no_grad():  # the reference owns its storage: a changed policy leaves it as it was
        for p in policy.parameters():
            p.mul_(0.5)
    assert sequence_logprobs(reference, batch, env, budget=96, temperature=0.7) == ours
    assert sequence_logprobs(policy, batch, env, budget=96, temperature=0.7) != ours


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reference_is_frozen_in_the_compute_dtype_and_scores_as_the_initial_policy(dtype, one_thread):
    try:
        check_reference(dtype)
    finally:
        shutdown_distributed()


def check_on_rank(rank: int, dtype: str, done: str) -> None:
    check_reference(dtype)
    shutdown_distributed()
    Path(done, f"rank{rank}").touch()


def test_two_ranks_shard_the_reference_and_score_as_the_policy(tmp_path):
    run_ranks(check_on_rank, "bfloat16", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1"]  # every rank ran the whole check


if __name__ == "__main__":
    check_reference(sys.argv[1])
    print("reference ok", flush=True)
    shutdown_distributed()
