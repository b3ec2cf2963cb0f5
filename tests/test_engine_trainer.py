"""The training step on one rank: exact aggregation over micro-batches, the NaN guard, objective binding."""
import functools

import pytest
import torch

from twofold.engine.rollout.correction import CORRECTION_MASK
from twofold.engine.run.schema import ModelConfig, OptimConfig
from twofold.engine.train.distributed import init_distributed, shutdown_distributed
from twofold.engine.train.model import build_policy
from twofold.engine.train.packing import Sequence
from twofold.engine.train.trainer import Trainer, batch_totals
from twofold.objectives import sft_loss


@pytest.fixture
def env():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs: one thread is faster, and the CI cores are shared
    yield init_distributed()
    shutdown_distributed()
    torch.set_num_threads(threads)


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 30, (1,), generator=g))
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        tokens = torch.randint(4, 100, (length,), generator=g).tolist()
        out.append(Sequence(tokens, prompt, row_id=i, fields={"rewards": float(i % 2), "advantages": i / 4 - 1.0}))
    return out


def _pair_batch(n_pairs=5, seed=0):
    """Preference pairs: each pair shares a prompt; sequences carry pair_id, chosen and a reference sum."""
    out = []
    for i, seq in enumerate(_batch(2 * n_pairs, seed)):
        pair, chosen = i // 2, int(i % 2 == 0)
        out.append(Sequence(seq.tokens, seq.prompt_len, row_id=pair,
                            fields={"pair_id": pair, "chosen": chosen, "ref_logp_sum": -3.0 * seq.response_len}))
    return out


def _trainer(env, budget, objective="sft", **kwargs):
    policy = build_policy(ModelConfig(preset="tiny-qwen2", dtype="float32"), env, seed=0)
    return Trainer(policy, env, OptimConfig(lr=1e-2), objective=objective, objective_kwargs=kwargs, total_steps=4,
                   max_tokens_per_microbatch=budget)


def _jepo_batch(n_groups=5, size=4, seed=0):
    """JEPO sequences: prompt, CoT, answer; one badly formatted sample in two of the groups."""
    out = []
    for i, seq in enumerate(_batch(n_groups * size, seed)):
        seq = Sequence(seq.tokens[:max(seq.prompt_len + 2, 14)], seq.prompt_len)  # a group fits a micro-batch
        response = seq.response_len
        answer = min(2, response - 1) if response > 1 else 1
        cot = response - answer
        bad = i in (1, 2 * size + 3)
        out.append(Sequence(seq.tokens, seq.prompt_len, row_id=i,
                            fields={"group_ids": i // size, "valid": float(not bad) if cot else 0.0,
                                    "format_rewards": -10.0 if bad else 0.0},
                            token_fields={"cot_mask": [1.0] * cot + [0.0] * answer,
                                          "answer_mask": [0.0] * cot + [1.0] * answer}))
    return out


def _accumulated_grads(trainer, batch):
    micro = trainer.plan(batch)
    totals = batch_totals(batch) | trainer.batch_statistics(micro)
    for mb in micro:
        trainer.micro_step(mb, totals)
    grads = {n: p.grad.full_tensor().clone() for n, p in trainer.policy.named_parameters()}
    trainer.optimizer.zero_grad(set_to_none=True)
    return len(micro), grads


@pytest.mark.parametrize("objective, kwargs, make_batch", [
    ("sft", {}, _batch),
    ("grpo", {"agg": "token_mean", "beta": 0.0}, _batch),
    ("grpo", {"agg": "seq_mean_token_mean", "beta": 0.0}, _batch),
    ("redi", {"alpha": 0.8}, _pair_batch),
    ("dpo", {"beta": 0.1}, _pair_batch),
    ("jepo", {"beta_sup": 0.5, "entropy_coef": 0.01}, _jepo_batch),
    ("gspo", {"entropy_coef": 0.01}, _batch),
])
def test_accumulated_gradient_equals_the_one_microbatch_gradient(env, objective, kwargs, make_batch):
    batch = make_batch()
    trainer = _trainer(env, budget=512, objective=objective, **kwargs)
    one, whole = _accumulated_grads(trainer, batch)
    trainer.budget = 60
    many, split = _accumulated_grads(trainer, batch)
    assert one == 1 and many >= 2
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=1e-5, msg=name)


def _prepared_grads(trainer, batch):
    """The gradient of one update as `Trainer.step` forms it from a packed mini-batch (pack, prepare, statistics)."""
    packed = trainer.pack(batch)
    totals = dict(trainer.prepare(packed)) | trainer.batch_statistics(packed.micro)
    for mb in packed.micro:
        trainer.micro_step(mb, totals)
    grads = {n: p.grad.full_tensor().clone() for n, p in trainer.policy.named_parameters()}
    trainer.optimizer.zero_grad(set_to_none=True)
    return packed, grads


@pytest.mark.parametrize("budget", [512, 60])
def test_a_sequence_a_correction_drops_entirely_leaves_the_packed_mini_batch(env, budget):
    """Its tokens and its fields leave the micro-batch it was packed in (no second plan): JEPO's groups, bounds and
    normalisers then see the batch without it, as if it had never been sampled."""
    batch = _jepo_batch()
    for i, seq in enumerate(batch):
        seq.token_fields[CORRECTION_MASK] = [0.0 if i == 2 else 1.0] * seq.response_len
    trainer = _trainer(env, budget=budget, objective="jepo", beta_sup=0.5)
    packed, dropped = _prepared_grads(trainer, batch)
    assert 2 not in [i for mb in packed.micro for i in mb.sequence_ids] and packed.lengths[2] == 0
    assert packed.totals["num_seqs"] == len(batch) - 1
    _, without = _prepared_grads(trainer, batch[:2] + batch[3:])
    for name in without:
        torch.testing.assert_close(dropped[name], without[name], atol=1e-6, rtol=1e-5, msg=name)


def test_non_finite_loss_skips_the_step_and_leaves_weights_and_optimizer_untouched(env):
    trainer = _trainer(env, budget=128)
    trainer.step(_batch(seed=1))  # a normal step first, so the optimizer has state
    before = {n: p.full_tensor().clone() for n, p in trainer.policy.named_parameters()}
    state_before = {k: v["exp_avg"].full_tensor().clone() for k, v in enumerate(trainer.optimizer.state.values())}

    @functools.wraps(sft_loss)
    def exploding(*args, **kw):  # a NaN normaliser: NaN weights, so both heads' loss and gradient are NaN
        return sft_loss(*args, **{**kw, "num_tokens": torch.tensor(float("nan"))})

    trainer.loss_fn = exploding
    metrics = trainer.step(_batch(seed=2))
    assert metrics["skipped"] == 1.0 and trainer.skipped_steps == 1 and metrics["step"] == 2
    for name, param in trainer.policy.named_parameters():
        assert torch.equal(param.full_tensor(), before[name]), name
    for k, v in enumerate(trainer.optimizer.state.values()):
        assert torch.equal(v["exp_avg"].full_tensor(), state_before[k])
    trainer.loss_fn = sft_loss
    assert trainer.step(_batch(seed=3))["skipped"] == 0.0


def test_objective_missing_a_field_names_it(env):
    trainer = _trainer(env, budget=128, objective="nft")
    batch = [Sequence(s.tokens, s.prompt_len, s.row_id, {"rewards": s.fields["rewards"]}) for s in _batch()]
    with pytest.raises(ValueError, match=r"objective 'nft' needs \['group_ids'\]"):
        trainer.step(batch)


def test_bad_sequence_in_a_batch_is_reported_by_row_id(env):
    trainer = _trainer(env, budget=128)
    batch = _batch()
    batch[3] = Sequence([5, 6, 7], prompt_len=3, row_id="prompt-17")
    with pytest.raises(ValueError, match="row 'prompt-17': empty response"):
        trainer.step(batch)


def test_step_reports_throughput_memory_and_schedule(env):
    metrics = _trainer(env, budget=128).step(_batch())
    assert metrics["tokens_per_s"] > 0 and metrics["peak_mem_gib"] > 0
    assert metrics["lr"] == pytest.approx(1e-2) and metrics["loss_tokens"] == sum(s.response_len for s in _batch())


def test_pairs_are_packed_together_and_a_broken_pair_is_named(env):
    trainer = _trainer(env, budget=60, objective="redi")
    batch = _pair_batch()
    for mb in trainer.plan(batch):
        pairs = mb.seq_fields["pair_id"].tolist()
        assert all(pairs.count(p) == 2 for p in pairs)
    batch[1].fields["chosen"] = 1
    with pytest.raises(ValueError, match=r"pair_id 0 must have exactly one chosen \(1\) and one rejected"):
        trainer.step(batch)


def test_schedule_warms_up_linearly_then_follows_the_cosine_to_its_floor():
    from twofold.engine.train.trainer import lr_lambda
    sched = dict(warmup_steps=4, total_steps=12, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_lambda(s, **sched) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_lambda(8, **sched) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(12, **sched) == pytest.approx(0.1)
    assert lr_lambda(7, warmup_steps=0, total_steps=12, schedule="constant", min_lr_ratio=0.0) == 1.0
