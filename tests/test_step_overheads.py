"""What the online step's bookkeeping relies on, exactly: `split_by_sequence` (one selection per micro-batch,
then slices) against a mask per sequence, and the trainer's foreach AdamW against the per-tensor loop."""
import torch
from torch.distributed.tensor import distribute_tensor

from bench.rollout import write_tiny_model
from twofold.engine.run.schema import ModelConfig
from twofold.engine.train.distributed import init_distributed, shutdown_distributed
from twofold.engine.train.model import build_policy
from twofold.engine.train.packing import IGNORE_INDEX, Sequence, collate
from twofold.engine.train.trainer import split_by_sequence


def test_split_by_sequence_equals_a_mask_per_sequence():
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(40):
        length = int(torch.randint(2, 30, (1,), generator=g))
        prompt = int(torch.randint(1, length, (1,), generator=g))
        seqs.append(Sequence(torch.randint(0, 50, (length,), generator=g).tolist(), prompt, row_id=i))
    indices = torch.randperm(40, generator=g)[:25].tolist()  # a micro-batch holds any subset, in any order
    mb = collate(seqs, indices)
    logp = torch.randn(mb.num_tokens, generator=g)
    expected = {index: logp[(mb.seq_index == s) & (mb.targets != IGNORE_INDEX)].tolist()
                for s, index in enumerate(mb.sequence_ids)}
    got = split_by_sequence(logp, mb)
    assert list(got) == list(expected) and got == expected
    assert all(len(got[i]) == seqs[i].response_len for i in indices)
    assert split_by_sequence(torch.zeros(1), collate(seqs, [])) == {}


def test_foreach_adamw_is_bitwise_the_per_tensor_loop_on_fsdp2_parameters(tmp_path):
    env = init_distributed()
    try:
        path, weights = write_tiny_model(tmp_path), {}
        for foreach in (False, True):
            policy = build_policy(ModelConfig(path=path, dtype="float32", attn_implementation="sdpa",
                                              activation_checkpointing=False), env, seed=0)
            start = [p.detach().full_tensor().clone() for p in policy.parameters()]
            opt = torch.optim.AdamW(policy.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1,
                                    foreach=foreach)
            g = torch.Generator().manual_seed(1)
            for _ in range(5):
                for p in policy.parameters():  # the FSDP2 parameters are DTensors, and so are their gradients
                    p.grad = distribute_tensor(torch.randn(p.shape, generator=g), p.device_mesh, p.placements)
                opt.step()
            weights[foreach] = [p.detach().full_tensor() for p in policy.parameters()]
            assert not any(torch.equal(a, b) for a, b in zip(start, weights[foreach]))
        assert all(torch.equal(a, b) for a, b in zip(weights[False], weights[True]))
    finally:
        shutdown_distributed()
