"""Two ranks under torchrun: FSDP2 policy sharded over both, one in-process vLLM engine per rank
(external_launcher), weights synced from the shards, each rank sampling its share of the prompts.

The test runs this file under torchrun; rank 0 writes what the ranks saw to a JSON file that the test checks.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [f"{i}+{i}=" for i in range(5)]  # odd count: the ranks get 3 and 2


def worker(out_path: str, model_dir: str) -> None:
    import torch

    from twofold.engine.run.schema import ModelConfig
    from twofold.engine.train.distributed import init_distributed, shutdown_distributed
    from twofold.engine.train.model import build_policy
    from twofold.engine.rollout.backends import build_sampler
    from twofold.engine.rollout.sampler import GenerationParams, SamplerConfig, rank_share, sample_distributed
    from twofold.engine.rollout.weight_sync import sync_weights

    torch.set_num_threads(1)
    env = init_distributed()
    policy = build_policy(ModelConfig(path=model_dir, dtype="float32", attn_implementation="sdpa"), env)
    sampler = build_sampler(SamplerConfig(dtype="float32", max_model_len=64, kv_cache_gib=1 / 64, seed=11),
                            model_dir, rank=env.rank)
    stats = sync_weights(policy, sampler)
    params = GenerationParams(n=3, temperature=1.0, max_new_tokens=8, logprobs=True)
    groups = sample_distributed(sampler, PROMPTS, params)  # unseeded: each engine's own stream
    same_prompt = sampler.generate(PROMPTS[:1], params)[0]  # both ranks, same prompt, per-rank seeds
    seeded = GenerationParams(n=2, temperature=1.0, max_new_tokens=8, seed=5)
    split = sample_distributed(sampler, PROMPTS, seeded)
    whole = sampler.generate(PROMPTS, seeded)  # every rank alone on the whole batch
    mine = list(rank_share(len(PROMPTS), env.rank, env.world_size))
    report = {"rank": env.rank, "share": mine, "sync_bytes": stats.bytes,
              "same_prompt": [s.token_ids for s in same_prompt],
              "groups": [[(s.prompt_index, s.token_ids, len(s.logprobs)) for s in g] for g in groups],
              "seeded_split": [[s.token_ids for s in g] for g in split],
              "seeded_whole": [[s.token_ids for s in g] for g in whole]}
    reports = [None] * env.world_size
    dist.all_gather_object(reports, report)
    if env.is_main:
        Path(out_path).write_text(json.dumps(reports))
    sampler.close()
    shutdown_distributed()


def test_two_ranks_sample_their_shares_with_per_rank_seeds(tmp_path):
    from bench.rollout import write_tiny_model

    model_dir = write_tiny_model(tmp_path / "model")
    out = tmp_path / "reports.json"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2", __file__,
           str(out), model_dir]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r0, r1 = json.loads(out.read_text())
    assert r0["share"] == [0, 1, 2] and r1["share"] == [3, 4]
    assert r0["sync_bytes"] == r1["sync_bytes"] > 0  # each engine got the full model from the shards
    for report in (r0, r1):  # every rank holds every group, complete and in prompt order
        assert [[s[0] for s in g] for g in report["groups"]] == [[i] * 3 for i in range(len(PROMPTS))]
        assert all(n_logp == len(ids) > 0 for g in report["groups"] for _, ids, n_logp in g)
    assert r0["groups"] == r1["groups"]
    assert r0["same_prompt"] != r1["same_prompt"]  # per-rank engine seeds
    # a request seed makes a sample a function of its global prompt index, not of the rank that drew it
    assert r0["seeded_split"] == r0["seeded_whole"] == r1["seeded_whole"]


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    worker(*sys.argv[1:])
