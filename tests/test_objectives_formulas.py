"""Every objective against its naive reference (float64, random groups and lengths), in both layouts.

Each case computes the loss from leaves `logp` (and `logp2`, the rejected side of pairs); the padded call, the
packed call and the naive reference must agree in value and gradient.
"""
import pytest
import torch

import twofold.objectives as O
from tests import test_objectives_naive as naive

SEEDS = range(4)


def _nft(weight, eps, agg="sum_const", constant=1000.0):
    def ours(b, t, kw):
        return O.nft_loss(t(b["logp"]), t(b["old"]), b["rewards"], b["group_ids"], t(b["mask"]), eps=eps,
                          prompt_weight=weight, agg=agg, constant=constant, **kw)[0]

    def ref(b):
        return naive.nft(b["logp"], b["old"], b["rewards"], b["group_ids"], b["mask"], eps, weight, constant,
                         agg=agg)
    return ours, ref


def _ppo(name, agg, constant=None):
    eps_low, eps_high, kind = {"grpo": (0.2, 0.2, "grpo"), "dapo": (0.2, 0.28, "grpo"),
                               "drgrpo": (0.2, 0.2, "drgrpo")}[name]

    def adv(b):
        return naive.advantages(b["rewards"], b["group_ids"], kind)

    def ours(b, t, kw):
        extra = {"ref_logp": t(b["ref"]), "beta": 0.04} if name == "grpo" else {}
        loss_fn = getattr(O, f"{name}_loss")
        return loss_fn(t(b["logp"]), t(b["old"]), O.group_advantages(b["rewards"], b["group_ids"], kind),
                       t(b["mask"]), agg=agg, constant=constant, **extra, **kw)[0]

    def ref(b):
        extra = {"ref": b["ref"], "beta": 0.04} if name == "grpo" else {}
        return naive.ppo(b["logp"], b["old"], adv(b), b["mask"], eps_low, eps_high, agg, constant, **extra)
    return ours, ref


def _oreal(with_scores):
    def ours(b, t, kw):
        scores = {"token_scores": t(b["scores"])} if with_scores else {}
        adv = O.group_advantages(2 * b["rewards"] - 1, b["group_ids"], "rloo")
        return O.oreal_loss(t(b["logp"]), b["rewards"], adv, t(b["mask"]), ref_logp=t(b["ref"]), **scores, **kw)[0]

    def ref(b):
        adv = naive.advantages(2 * b["rewards"] - 1, b["group_ids"], "rloo")
        return naive.oreal(b["logp"], b["rewards"], adv, b["mask"], b["scores"] if with_scores else None, b["ref"])
    return ours, ref


def _pair(name, **hyper):
    def ours(b, t, kw):
        side = {k.replace("seq_index", "chosen_seq_index"): v for k, v in kw.items()}
        side |= {"rejected_seq_index": b["packed2"][2]} if kw else {}
        t2 = (lambda x: naive.to_packed(x, b["mask2"])[0]) if kw else (lambda x: x)
        refs = (b["ref_w"], b["ref_l"]) if name == "dpo" else ()
        loss_fn = getattr(O, f"{name}_loss")
        return loss_fn(t(b["logp"]), t2(b["logp2"]), t(b["mask"]), t2(b["mask2"]), *refs, **hyper, **side)[0]

    def ref(b):
        args = (b["logp"], b["logp2"], b["mask"], b["mask2"])
        if name == "dpo":
            return naive.dpo(*args, b["ref_w"], b["ref_l"], **hyper)
        return getattr(naive, name)(*args, **hyper)
    return ours, ref


def _jepo(multi, bad_format=False):
    def ours(b, t, kw):
        extra = {"valid": b["valid"], "format_rewards": b["fmt"]} if bad_format else {}
        return O.jepo_loss(t(b["logp"]), t(b["cot"]), t(b["answer"]), b["group_ids"], ref_logp=t(b["ref"]),
                           beta=0.1, beta_sup=0.7, multi_sample=multi, **extra, **kw)[0]

    def ref(b):
        extra = {"valid": b["valid"], "fmt": b["fmt"]} if bad_format else {}
        return naive.jepo(b["logp"], b["cot"], b["answer"], b["group_ids"], b["ref"], 0.1, 0.7, multi, **extra)
    return ours, ref


def _is_variant(name, eps_low, eps_high, entropy_coef=0.0):
    """GSPO / CISPO against their papers' formulas; with entropy_coef, the entropy bonus (aggregated like the
    loss) on a synthetic entropy that depends on logp, so its gradient reaches the leaf."""
    agg = "seq_mean_token_mean" if name == "gspo" else "token_mean"

    def ours(b, t, kw):
        adv = O.group_advantages(b["rewards"], b["group_ids"])
        bonus = {"entropy": t(_entropy(b)), "entropy_coef": entropy_coef} if entropy_coef else {}
        return getattr(O, f"{name}_loss")(t(b["logp"]), t(b["old"]), adv, t(b["mask"]), eps_low=eps_low,
                                          eps_high=eps_high, **bonus, **kw)[0]

    def ref(b):
        adv = naive.advantages(b["rewards"], b["group_ids"], "grpo")
        loss = getattr(naive, name)(b["logp"], b["old"], adv, b["mask"], eps_low, eps_high)
        return loss - entropy_coef * naive.aggregate(_entropy(b), b["mask"], agg)
    return ours, ref


def _entropy(b):
    return 1.5 - 0.5 * b["logp"] + 0.1 * b["logp"] ** 2


def _sft(agg, constant=None):
    def ours(b, t, kw):
        return O.sft_loss(t(b["logp"]), t(b["mask"]), agg=agg, constant=constant, **kw)[0]

    def ref(b):
        return naive.aggregate(-b["logp"], b["mask"], agg, constant)
    return ours, ref


def _rft():
    def ours(b, t, kw):
        return O.rft_loss(t(b["logp"]), b["rewards"], t(b["mask"]), old_logp=t(b["old"]), **kw)[0]

    def ref(b):
        return naive.nft(b["logp"], b["old"], b["rewards"], b["group_ids"], b["mask"], 1.0, "1", neg_weight=0.0)
    return ours, ref


CASES = {
    "sft_token_mean": _sft("token_mean"),
    "sft_seq_mean_token_mean": _sft("seq_mean_token_mean"),
    "sft_seq_mean_token_sum_norm": _sft("seq_mean_token_sum_norm", 7.0),
    "sft_sum_const": _sft("sum_const", 5.0),
    "rft": _rft(),
    "grpo_with_k3": _ppo("grpo", "seq_mean_token_mean"),
    "dapo": _ppo("dapo", "token_mean"),
    "drgrpo": _ppo("drgrpo", "seq_mean_token_sum_norm", 11.0),
    "nft_default": _nft("1-r", 1.0),
    "nft_sqrt_small_eps": _nft("sqrt", 0.3),
    "nft_one_token_mean": _nft("1", 0.05, "token_mean", None),
    "oreal_no_rm": _oreal(False),
    "oreal_token_rm": _oreal(True),
    "redi": _pair("redi", alpha=0.8),
    "dpo": _pair("dpo", beta=0.5),
    "simpo": _pair("simpo", beta=2.0, gamma=1.0),
    "jepo_multi": _jepo(True),
    "jepo_single": _jepo(False),
    "jepo_multi_bad_format": _jepo(True, bad_format=True),
    "jepo_single_bad_format": _jepo(False, bad_format=True),
    "gspo_paper_clip": _is_variant("gspo", 3e-4, 4e-4),
    "gspo_wide_clip": _is_variant("gspo", 0.1, 0.15),
    "gspo_entropy": _is_variant("gspo", 0.1, 0.15, entropy_coef=0.03),
    "cispo": _is_variant("cispo", 1.0, 0.2),
    "cispo_entropy": _is_variant("cispo", 0.1, 0.2, entropy_coef=0.03),
}


def _batch(seed):
    b = naive.random_batch(seed)
    g = b.pop("g")
    shape = b["logp"].shape
    b["scores"] = torch.randn(shape, generator=g, dtype=naive.DT)
    b["logp2"] = -(0.05 + 2 * torch.rand(shape, generator=g, dtype=naive.DT))
    b["mask2"] = b["mask"].roll(1, 0)
    b["ref_w"], b["ref_l"] = torch.randn(2, shape[0], generator=g, dtype=naive.DT) - 5
    cut = torch.randint(1, 4, (shape[0], 1), generator=g)  # the last `cut` counted tokens are the answer a*
    rank = b["mask"].flip(1).cumsum(1).flip(1)
    b["answer"] = b["mask"] & (rank <= cut)
    b["cot"] = b["mask"] & ~b["answer"]
    b["packed2"] = naive.to_packed(b["logp2"], b["mask2"])
    # JEPO format check: the last sample of every group of 3 or more fails it (2 valid samples remain)
    ids = b["group_ids"].tolist()
    last = [i for i in range(len(ids)) if (i + 1 == len(ids) or ids[i + 1] != ids[i]) and ids.count(ids[i]) >= 3]
    b["valid"] = torch.tensor([i not in last for i in range(len(ids))])
    b["fmt"] = torch.where(b["valid"], 0.0, -10.0).to(naive.DT)
    return b


def _value_and_grads(fn, b):
    leaves = {k: b[k].clone().requires_grad_() for k in ("logp", "logp2")}
    loss = fn({**b, **leaves})
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return loss.detach(), [torch.zeros_like(b["logp"]) if g is None else g for g in grads]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_objective_matches_naive_reference_in_padded_and_packed_layouts(name, seed):
    ours, ref = CASES[name]
    b = _batch(seed)
    seq = naive.to_packed(b["logp"], b["mask"])[2]

    def pack(x):
        return naive.to_packed(x, b["mask"])[0]

    padded = _value_and_grads(lambda bb: ours(bb, lambda x: x, {}), b)
    packed = _value_and_grads(lambda bb: ours(bb, pack, {"seq_index": seq}), b)
    expected = _value_and_grads(ref, b)
    torch.testing.assert_close(padded[0], expected[0], rtol=1e-10, atol=1e-12)
    for got, want in zip(padded[1], expected[1]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(packed[0], padded[0], rtol=0, atol=1e-12)
    for got, want in zip(packed[1], padded[1]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert padded[1][0].abs().sum() > 0  # the case exercises a real gradient


@pytest.mark.parametrize("kind", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_group_advantages_match_naive_loops(kind, unbiased):
    b = naive.random_batch(11)
    rewards = b["rewards"] + torch.rand(len(b["rewards"]), dtype=naive.DT)  # real-valued rewards
    got = O.group_advantages(rewards, b["group_ids"], kind, unbiased_std=unbiased)
    torch.testing.assert_close(got, naive.advantages(rewards, b["group_ids"], kind, unbiased), rtol=0, atol=1e-12)


def test_grpo_one_sample_group_uses_verl_convention_mean_zero_std_one():
    adv = O.group_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([5, 5, 9]))
    torch.testing.assert_close(adv[2], torch.tensor(1 / (1 + 1e-6)))


def test_r_hat_and_dynamic_sampling_mask_follow_groups():
    ids = torch.tensor([4, 1, 4, 1, 8, 8])
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(O.r_hat(rewards, ids), torch.tensor([0.5, 0.0, 0.5, 0.0, 1.0, 1.0]))
    assert O.dynamic_sampling_mask(rewards, ids).tolist() == [True, False, True, False, False, False]


def test_overlong_reward_is_dapo_equation_13():
    lengths = torch.tensor([10, 16, 18, 20, 25])
    got = O.overlong_reward(lengths, max_len=20, cache_len=4)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_token_gradient_matches_autograd(kind):
    logp = -torch.rand(20, dtype=naive.DT).requires_grad_()
    ref = -torch.rand(20, dtype=naive.DT)
    value, grad = O.kl_token(logp.detach(), ref, kind)
    d = logp - ref
    want = {"k1": d, "k2": 0.5 * d**2, "k3": naive.k3(logp, ref)}[kind]
    torch.testing.assert_close(value, want.detach())
    torch.testing.assert_close(grad, torch.autograd.grad(want.sum(), logp)[0])
