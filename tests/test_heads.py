"""train.head=fused equals train.head=logprobs for every objective: the loss and every parameter's gradient, fp32,
two ranks (FSDP2, gloo), several packed micro-batches per rank, at a sampling temperature of 0.7; ratio objectives
both on-policy (the fused kernel supplies old = sg[logp] itself) and with old log-probs; with a rollout correction
(an importance weight on the policy-gradient term and a rejection mask); with an entropy bonus (its gradient from
the same pass).

The comparison runs on two ranks forked from the test process (tests/forked_ranks.py); under torchrun
(`torchrun --standalone --nproc_per_node=2 -m tests.test_heads`) this file runs the same check."""
import os
import random

import torch

from tests.forked_ranks import run_ranks

TEMPERATURE = 0.7
BUDGET = 80  # tokens per micro-batch: the batch below (~190 tokens) packs into several per rank

# (objective, kwargs, batch kind, with old_logp, with a correction weight)
CASES = [
    ("sft", {}, "rows", False, False),
    ("rft", {}, "rows", False, False),
    ("rft", {}, "rows", True, False),
    ("grpo", {"beta": 0.04}, "rows", False, False),
    ("grpo", {"beta": 0.04}, "rows", True, True),
    ("dapo", {}, "rows", True, False),
    ("drgrpo", {"constant": 24.0}, "rows", False, True),
    ("nft", {}, "rows", False, False),
    ("nft", {}, "rows", True, True),
    ("oreal", {}, "rows", False, True),
    ("nft", {"entropy_coef": 0.01}, "rows", False, True),
    ("cispo", {}, "rows", True, False),
    ("gspo", {"entropy_coef": 0.01}, "rows", True, False),
    ("jepo", {"beta": 0.01}, "jepo", False, True),
    ("redi", {}, "pairs", False, False),
    ("dpo", {"beta": 0.1}, "pairs", False, False),
    ("simpo", {}, "pairs", False, False),
]


def make_batch(kind: str, old: bool, corrected: bool, seed: int = 0):
    from twofold.engine.train.packing import Sequence
    from twofold.engine.rollout.correction import CORRECTION_MASK, IS_WEIGHT

    rng = random.Random(seed)
    out = []
    for i in range(12):
        length = rng.randint(6, 26)
        prompt = rng.randint(2, length // 2)
        tokens = [rng.randrange(4, 100) for _ in range(length)]
        n = length - prompt
        fields = {"group_ids": i // 4, "rewards": float(rng.random() < 0.5), "advantages": rng.uniform(-1.5, 1.5)}
        token_fields = {"ref_logp": [-rng.uniform(2.5, 6.0) for _ in range(n)],
                        "token_scores": [rng.gauss(0, 1) for _ in range(n)]}
        if old:
            token_fields["old_logp"] = [-rng.uniform(3.5, 5.5) for _ in range(n)]
        if kind == "pairs":
            fields = {"pair_id": i // 2, "chosen": int(i % 2 == 0), "ref_logp_sum": -4.0 * n}
            token_fields = {}
        if kind == "jepo":
            cot = rng.randint(1, n - 1)
            fields = {"group_ids": i // 3, "valid": float(i % 3 != 2), "extra_advantages": 0.0}
            token_fields = {"cot_mask": [1.0] * cot + [0.0] * (n - cot), "answer_mask": [0.0] * cot + [1.0] * (n - cot)}
        if corrected:
            token_fields[IS_WEIGHT] = [0.0 if rng.random() < 0.2 else rng.uniform(0.5, 2.0) for _ in range(n)]
            masks = random.Random(1000 * seed + i)  # its own stream: the batch's lengths stay those of the rest
            token_fields[CORRECTION_MASK] = [float(masks.random() > 0.1) for _ in range(n)]
        out.append(Sequence(tokens, prompt, row_id=i, fields=fields, token_fields=token_fields))
    return out


def gradients(trainer, batch):
    """Accumulated gradients of one mini-batch (every rank's micro-batches, FSDP2-reduced) and the summed loss."""
    from twofold.engine.train.distributed import all_reduce_sum
    from twofold.engine.train.trainer import batch_totals

    trainer.check_batch(batch)
    totals, loss = batch_totals(batch), 0.0
    micro = trainer.plan(batch)
    for mb in micro:
        loss += float(trainer.micro_step(mb.to(trainer.env.device), totals)[0])
    grads = {n: p.grad.full_tensor().clone() for n, p in trainer.policy.named_parameters()}
    trainer.optimizer.zero_grad(set_to_none=True)
    return all_reduce_sum([loss], trainer.env.device)[0], grads, len(micro)


def check_heads(rank: int, report: str | None = None) -> None:
    """Every case on this rank (of two); rank 0 writes one line per case to `report`. Raises on a mismatch."""
    from twofold.engine.run.schema import ModelConfig, OptimConfig
    from twofold.engine.train.distributed import init_distributed, shutdown_distributed
    from twofold.engine.train.model import build_policy
    from twofold.engine.train.trainer import Trainer

    torch.set_num_threads(1)
    env = init_distributed()
    assert env.world_size == 2
    policy = build_policy(ModelConfig(preset="tiny-qwen2", dtype="float32", activation_checkpointing=False), env)
    failures, lines = [], []
    for objective, kwargs, kind, old, corrected in CASES:
        trainer = Trainer(policy, env, OptimConfig(lr=1e-3), objective=objective, objective_kwargs=kwargs,
                          total_steps=1, max_tokens_per_microbatch=BUDGET, temperature=TEMPERATURE)
        batch = make_batch(kind, old, corrected)
        results = {}
        for head in ("fused", "logprobs"):
            trainer.head = head
            results[head] = gradients(trainer, batch)
        (loss_f, grads_f, micro), (loss_l, grads_l, _) = results["fused"], results["logprobs"]
        assert micro >= 2, micro
        worst = max(float((grads_f[k] - grads_l[k]).abs().max()) for k in grads_f)
        scale = max(float(g.abs().max()) for g in grads_l.values())
        case = f"{objective} {kwargs} old={old} corrected={corrected}"
        lines.append(f"{case}: loss {loss_f:.6g} vs {loss_l:.6g}, max |grad diff| {worst:.2e} (max |grad| {scale:.2e})")
        if env.is_main:
            print(lines[-1], flush=True)
        if abs(loss_f - loss_l) > 1e-6 * max(1.0, abs(loss_l)):
            failures.append(f"{case}: loss {loss_f} != {loss_l}")
        if not worst <= 1e-6 * max(1.0, scale) or scale == 0:
            failures.append(f"{case}: gradients differ by {worst:.3e} (scale {scale:.3e})")
    shutdown_distributed()
    if failures:
        raise AssertionError(f"rank {rank}:\n" + "\n".join(failures))
    if report and env.is_main:
        with open(report, "w") as f:
            f.write("\n".join(lines) + "\n")


def test_fused_head_equals_logprobs_head_for_every_objective_on_two_ranks(tmp_path):
    report = tmp_path / "cases.txt"
    run_ranks(check_heads, str(report))
    assert report.read_text().count("max |grad diff|") == len(CASES)  # every case ran to its comparison


if __name__ == "__main__":
    check_heads(int(os.environ["RANK"]))
