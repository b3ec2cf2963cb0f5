"""Rollout corrections against the peers' definitions, re-implemented here in float64 from their public code's
semantics (verl rollout_corr_helper, TRL GRPOTrainer's vLLM importance sampling, OpenRLHF PolicyLoss): the weights
token by token, and the loss value and every parameter gradient through `Trainer` (both heads) against a GRPO loss
written the way those trainers assemble it (the weight on the policy-gradient term, the KL term unweighted,
rejected tokens out of the normaliser). The mismatch metrics and the config's checks."""
import inspect
import math
import random

import pytest
import torch

from twofold.engine.run.config import correction_mode, load_config
from twofold.engine.run.schema import ModelConfig, OptimConfig
from twofold.engine.rollout.correction import (CORRECTION_MASK, CORRECTIONS, DEFAULT_BOUNDS, IS_WEIGHT, MASKS, WEIGHTS,
                                       correct_sequences, correction_weights, log_ratios, mismatch_metrics)
from twofold.engine.train.distributed import init_distributed, shutdown_distributed
from twofold.engine.train.model import build_policy
from twofold.engine.train.packing import IGNORE_INDEX, Sequence, collate
from twofold.engine.train.trainer import Trainer, batch_totals, drop_corrected, sequence_logprobs
from twofold.objectives import OBJECTIVES, names

INF = math.inf


# ---- the peers' definitions (r: one sequence's log rho_t = log p_train - log p_rollout, as Python floats) --------
def verl_is(r, rollout_is, rollout_is_threshold=2.0):
    """verl rollout_is: exp(r_t) ("token") or exp(sum r) ("sequence"), truncated above at the threshold."""
    rho = [math.exp(x) for x in r] if rollout_is == "token" else [math.exp(sum(r))] * len(r)
    return [min(x, rollout_is_threshold) for x in rho]


def verl_rs(r, rollout_rs, rollout_rs_threshold):
    """verl rollout_rs with k1 = -log rho and "lower_upper" ratio bounds: keep iff log(lower) <= k1 <= log(upper)
    for the token (token_k1), the sequence sum (seq_sum_k1) or the sequence mean (seq_mean_k1)."""
    lower, upper = (math.log(float(v)) for v in rollout_rs_threshold.split("_"))
    if rollout_rs == "token_k1":
        return [float(lower <= -x <= upper) for x in r]
    k1 = -sum(r) if rollout_rs == "seq_sum_k1" else -sum(r) / len(r)
    return [float(lower <= k1 <= upper)] * len(r)


def trl_is(r, vllm_importance_sampling_mode, clip_min=None, clip_max=3.0):
    """TRL: rho per token or exp(sum r) per sequence; *_truncate clamps to [min, max], *_mask zeroes rho outside
    (an unset bound is no bound)."""
    level, constraint = vllm_importance_sampling_mode.split("_")
    rho = [math.exp(x) for x in r] if level == "token" else [math.exp(sum(r))] * len(r)
    low, high = -INF if clip_min is None else clip_min, INF if clip_max is None else clip_max
    if constraint == "truncate":
        return [min(max(x, low), high) for x in rho]
    return [x if low <= x <= high else 0.0 for x in rho]


def openrlhf_is(r, vllm_is_correction_type, low=0.5, high=5.0):
    """OpenRLHF PolicyLoss: tis clamps rho_t to [low, high]; icepop keeps rho_t inside [low, high], 0 outside."""
    rho = [math.exp(x) for x in r]
    if vllm_is_correction_type == "tis":
        return [min(max(x, low), high) for x in rho]
    return [x if low <= x <= high else 0.0 for x in rho]


# (peer setting, its function, twofold mode, c_low, c_high): the equivalences docs/objectives.md tabulates
PORTS = [
    ("verl rollout_is=token threshold 2", lambda r: verl_is(r, "token", 2.0), "token_tis", None, None),
    ("verl rollout_is=sequence threshold 2", lambda r: verl_is(r, "sequence", 2.0), "seq_tis", None, None),
    ("verl rollout_rs=token_k1 0.8_1.25", lambda r: verl_rs(r, "token_k1", "0.8_1.25"), "token_mask", 0.8, 1.25),
    ("verl rollout_rs=seq_sum_k1 0.5_2.0", lambda r: verl_rs(r, "seq_sum_k1", "0.5_2.0"), "seq_mask", 0.5, 2.0),
    ("verl rollout_rs=seq_mean_k1 0.9_1.1", lambda r: verl_rs(r, "seq_mean_k1", "0.9_1.1"), "geo_mask",
     1 / 1.1, 1 / 0.9),
    ("TRL token_truncate [0.5, 3]", lambda r: trl_is(r, "token_truncate", 0.5, 3.0), "token_tis", 0.5, 3.0),
    ("TRL token_mask [0.5, 3]", lambda r: trl_is(r, "token_mask", 0.5, 3.0), "icepop", 0.5, 3.0),
    ("TRL sequence_truncate max 3", lambda r: trl_is(r, "sequence_truncate", None, 3.0), "seq_tis", None, 3.0),
    ("TRL sequence_mask max 3 (TRL's default)", lambda r: trl_is(r, "sequence_mask", None, 3.0), "seq_icepop",
     None, None),
    ("OpenRLHF tis [0.5, 5]", lambda r: openrlhf_is(r, "tis", 0.5, 5.0), "token_tis", 0.5, 5.0),
    ("OpenRLHF icepop [0.5, 5] (its default)", lambda r: openrlhf_is(r, "icepop"), "icepop", None, None),
]


def _ratios(seed=0, n_seqs=16):
    """Per sequence, (trainer, behaviour) log-probs whose gap scale varies by sequence, so every mode sees both
    sides of its bounds (at the token and at the sequence level)."""
    rng = random.Random(seed)
    trainer, behavior = [], []
    for i in range(n_seqs):
        length, scale = rng.randint(1, 9), [0.02, 0.15, 0.5, 1.2][i % 4]
        b = [-rng.uniform(0.05, 4.0) for _ in range(length)]
        trainer.append([x + rng.gauss(0.0, scale) for x in b])
        behavior.append(b)
    return trainer, behavior


@pytest.mark.parametrize("port", PORTS, ids=[p[0] for p in PORTS])
def test_every_mode_equals_the_peer_setting_it_ports(port):
    _, peer, mode, c_low, c_high = port
    trainer, behavior = _ratios(seed=len(port[0]))
    got = correction_weights(mode, log_ratios(trainer, behavior), c_low, c_high)
    want = [peer([x - y for x, y in zip(t, b)]) for t, b in zip(trainer, behavior)]
    for g, w in zip(got, want):
        assert g.tolist() == pytest.approx(w, rel=1e-12, abs=0)
    flat = [x for w in want for x in w]
    low, high = c_low or DEFAULT_BOUNDS[mode][0], c_high or DEFAULT_BOUNDS[mode][1]
    if mode in MASKS or "icepop" in mode:  # the inputs exercise both sides of every band
        assert 0 < sum(x > 0 for x in flat) < len(flat)
    if mode in WEIGHTS:  # rho itself is the weight where it is not truncated or zeroed
        assert any(low < x < high and x != 1.0 for x in flat)


def test_every_mode_has_bounds_and_every_online_objective_takes_the_weight():
    assert set(DEFAULT_BOUNDS) == set(CORRECTIONS) - {"none"} == set(WEIGHTS) | set(MASKS)
    for name in names("online"):
        assert IS_WEIGHT in inspect.signature(OBJECTIVES[name]).parameters, name


# ---- the loss and its parameter gradients through the trainer ------------------------------------------------------
BETA, EPS = 0.04, 0.2


def reference_grpo(logp, batch, weights, keeps):
    """GRPO as verl/TRL/OpenRLHF assemble it, float64: per token -w_t min(R A, clip(R) A) + beta k3_t over the kept
    tokens, mean over each sequence's kept tokens, then over sequences that keep any."""
    terms = []
    for seq, lp, w, keep in zip(batch, logp, weights, keeps):
        old, ref, adv = seq.token_fields["old_logp"], seq.token_fields["ref_logp"], seq.fields["advantages"]
        kept = [t for t in range(len(lp)) if keep[t] > 0]
        if not kept:
            continue
        total = 0.0
        for t in kept:
            ratio = torch.exp(lp[t] - old[t])
            surrogate = -torch.minimum(ratio * adv, ratio.clamp(1 - EPS, 1 + EPS) * adv)
            d = ref[t] - lp[t]
            total = total + w[t] * surrogate + BETA * (torch.exp(d) - d - 1)
        terms.append(total / len(kept))
    return sum(terms) / len(terms)


@pytest.fixture(scope="module")
def env(one_thread):
    yield init_distributed()
    shutdown_distributed()


@pytest.fixture(scope="module")
def policy(env):
    return build_policy(ModelConfig(preset="tiny-qwen2", dtype="float32", activation_checkpointing=False), env, seed=0)


def _batch(policy, env, seed=0):
    """GRPO sequences whose old log-probs are near the policy's (some ratios clip), a reference, and behaviour
    log-probs off by a per-sequence scale."""
    rng = random.Random(seed)
    batch = []
    for i in range(10):
        length = rng.randint(8, 20)
        prompt = rng.randint(2, 5)
        batch.append(Sequence([rng.randrange(4, 100) for _ in range(length)], prompt, row_id=i,
                              fields={"advantages": rng.uniform(-1.5, 1.5)}))
    current = sequence_logprobs(policy, batch, env, 4096)
    for i, (seq, lp) in enumerate(zip(batch, current)):
        old = [x + rng.gauss(0.0, 0.15) for x in lp]
        scale = [0.02, 0.1, 0.4, 1.0][i % 4]
        seq.token_fields = {"old_logp": old, "ref_logp": [x + rng.gauss(0.0, 0.3) for x in lp],
                            "behavior_logp": [x + rng.gauss(0.0, scale) for x in old]}
    return batch


@pytest.mark.parametrize("port", PORTS, ids=[p[0] for p in PORTS])
def test_loss_and_parameter_gradients_equal_the_peer_definition(env, policy, port):
    _, peer, mode, c_low, c_high = port
    batch = _batch(policy, env)
    correct_sequences(batch, [s.token_fields["old_logp"] for s in batch], mode, c_low, c_high)
    ratios = [[o - b for o, b in zip(s.token_fields["old_logp"], s.token_fields["behavior_logp"])] for s in batch]
    peer_values = [peer(r) for r in ratios]
    is_mask = mode in MASKS
    weights = [[1.0] * len(v) if is_mask else v for v in peer_values]
    keeps = [v if is_mask else [1.0] * len(v) for v in peer_values]
    assert (CORRECTION_MASK if is_mask else IS_WEIGHT) in batch[0].token_fields

    trainer = Trainer(policy, env, OptimConfig(lr=1e-3), objective="grpo", objective_kwargs={"beta": BETA},
                      total_steps=1, max_tokens_per_microbatch=4096)
    mb = collate(batch, list(range(len(batch))))  # every token, rejected or not: the reference applies its own mask
    logp = policy(mb.input_ids, mb.position_ids, mb.targets)
    positions = mb.targets != IGNORE_INDEX
    per_seq = [logp[positions & (mb.seq_index == i)].double() for i in range(len(batch))]
    want = reference_grpo(per_seq, batch, weights, keeps)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)

    trainer.check_batch(batch)
    totals = batch_totals(batch)
    for head in ("fused", "logprobs"):
        trainer.head = head
        loss, _ = trainer.micro_step(drop_corrected(mb), totals)
        grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
        policy.zero_grad(set_to_none=True)
        assert float(loss) == pytest.approx(float(want), rel=1e-5, abs=1e-7), head
        scale = max(float(g.abs().max()) for g in want_grads.values())
        worst = max(float((grads[n] - want_grads[n].float()).abs().max()) for n in grads)
        assert scale > 0 and worst <= 2e-5 * scale, (head, worst, scale)


def test_the_kl_term_is_not_weighted():
    """Inside the loss: with the weight at 0 the token keeps exactly its KL gradient (and its normaliser share)."""
    from twofold.objectives import grpo_loss

    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    old, ref = logp.detach() + torch.tensor([0.05, -0.1, 0.0], dtype=torch.float64), logp.detach() - 0.3
    mask, adv = torch.ones(3, dtype=torch.bool), torch.tensor([1.0], dtype=torch.float64)
    args = dict(ref_logp=ref, beta=BETA, seq_index=torch.zeros(3, dtype=torch.int64))
    loss, _ = grpo_loss(logp, old, adv, mask, is_weight=torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64), **args)
    loss.backward()
    d = ref - logp.detach()
    assert logp.grad.tolist() == pytest.approx((BETA * -torch.expm1(d) / 3).tolist(), rel=1e-12)


def test_mismatch_metrics_match_their_formulas():
    trainer, behavior = _ratios(seed=3)
    sampled = [[float(i % 3 != 0) for i in range(len(t))] for t in trainer]
    sampled[0] = [1.0] * len(trainer[0])
    ratios = log_ratios(trainer, behavior, sampled)
    weights = correction_weights("icepop", ratios)
    got = mismatch_metrics(ratios, weights)
    r = [[x - y for x, y, s in zip(t, b, m) if s] for t, b, m in zip(trainer, behavior, sampled)]
    tokens = [x for seq in r for x in seq]
    seq = sorted(abs(sum(s)) for s in r)
    position = 0.99 * (len(seq) - 1)  # linear interpolation between order statistics (torch.quantile's default)
    lo = int(position)
    p99 = seq[lo] + (seq[min(lo + 1, len(seq) - 1)] - seq[lo]) * (position - lo)
    masked = sum(not (0.5 <= math.exp(x) <= 5.0) for x in tokens) / len(tokens)
    assert got["mismatch/k3_kl"] == pytest.approx(sum(math.exp(x) - x - 1 for x in tokens) / len(tokens), rel=1e-12)
    assert got["mismatch/max_abs_logp_diff"] == pytest.approx(max(abs(x) for x in tokens), rel=1e-12)
    assert got["mismatch/seq_log_ratio_p99"] == pytest.approx(p99, rel=1e-12)
    assert got["mismatch/masked_frac"] == pytest.approx(masked, rel=1e-12) and 0 < masked < 1
    assert mismatch_metrics(log_ratios(behavior, behavior))["mismatch/k3_kl"] == 0.0


def test_tokens_not_sampled_get_weight_one():
    seq = Sequence(list(range(1, 9)), 3, row_id=0, token_fields={
        "behavior_logp": [-1.0, -1.0, -1.0, 0.0, 0.0], "sampled": [1.0, 1.0, 1.0, 0.0, 0.0]})
    correct_sequences([seq], [[-1.0 + math.log(4.0), -1.0 + math.log(1.5), -1.0, -7.0, -9.0]], "token_tis")
    assert seq.token_fields[IS_WEIGHT] == pytest.approx([2.0, 1.5, 1.0, 1.0, 1.0], rel=1e-12)
    # a sequence-level rejection rejects the whole sequence, the appended answer too
    for ratio, keep in ((1.0, 1.0), (4.0, 0.0)):
        correct_sequences([seq], [[-1.0 + math.log(ratio), -1.0, -1.0, -7.0, -9.0]], "seq_mask")
        assert seq.token_fields[CORRECTION_MASK] == [keep, keep, keep, keep, keep]


def test_masked_tokens_leave_the_loss_and_every_normaliser():
    seqs = [Sequence(list(range(1, 8)), 3, row_id=0, fields={"rewards": 1.0},
                     token_fields={CORRECTION_MASK: [1.0, 0.0, 1.0, 0.0]}),
            Sequence(list(range(1, 6)), 2, row_id=1, fields={"rewards": 0.0},
                     token_fields={CORRECTION_MASK: [0.0, 0.0, 0.0]}),
            Sequence(list(range(1, 5)), 2, row_id=2, fields={"rewards": 0.0},
                     token_fields={CORRECTION_MASK: [1.0, 1.0]})]
    totals = batch_totals(seqs)
    assert totals["num_tokens"] == 4 and totals["num_seqs"] == 2
    assert totals["num_pos_tokens"] == 2 and totals["num_neg_tokens"] == 2
    mb = drop_corrected(collate(seqs, [0, 1, 2]))
    assert int(mb.loss_mask.sum()) == 4


def test_bad_correction_settings_are_named(tmp_path, env, policy):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    base = ["model.preset=tiny-qwen2", f"data.path={data}", "train.mode=online", "objective.name=grpo"]
    with pytest.raises(ValueError, match="rollout.correction_c_low must be < the upper bound 1.2 of seq_mask"):
        load_config(None, base + ["rollout.correction=seq_mask", "rollout.correction_c_low=2",
                                  "rollout.correction_c_high=1.2"])
    with pytest.raises(ValueError, match="rollout.correction_c_high must be >= 0"):
        load_config(None, base + ["rollout.correction=icepop", "rollout.correction_c_high=-1"])
    with pytest.raises(ValueError, match="rollout.correction must be one of"):
        load_config(None, base + ["rollout.correction=tis"])
    assert load_config(None, base + ["rollout.correction=icepop", "rollout.correction_c_low=0"]
                       ).rollout.correction_c_low == 0.0  # 0 is a bound (none below), null the mode's default
    assert correction_mode(load_config(None, base + ["model.dtype=float32", "sampler.dtype=float32"])) == "none"
    assert correction_mode(load_config(None, base + ["model.dtype=float32"])) == "token_tis"  # bf16 sampler
    # an objective without a policy-gradient weight refuses one by name
    trainer = Trainer(policy, env, OptimConfig(lr=1e-3), objective="sft", total_steps=1,
                      max_tokens_per_microbatch=256)
    with pytest.raises(ValueError, match="objective 'sft' takes no `is_weight`"):
        trainer.check_batch([Sequence([5, 6, 7, 8], 2, row_id=0, token_fields={IS_WEIGHT: [1.0, 0.5]})])
