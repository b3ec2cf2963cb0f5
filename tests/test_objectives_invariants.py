"""The testable invariants of docs/objectives.md §9 (numbers in the test docstrings), plus the global-normaliser
contract the engine relies on and the token-local interface the fused kernel uses."""
import itertools
import math

import pytest
import torch

import twofold.objectives as O
from twofold.objectives.layout import flatten
from tests import test_objectives_naive as naive

DT = naive.DT


def _grad(fn, logp):
    leaf = logp.clone().requires_grad_()
    loss, metrics = fn(leaf)
    return torch.autograd.grad(loss, leaf)[0], loss.detach(), metrics


@pytest.fixture(params=[0, 1, 2])
def batch(request):
    return naive.random_batch(100 + request.param)


# ---- advantages and aggregation (1-5) ------------------------------------------------------------------------
def test_rloo_equals_g_over_g_minus_one_times_centred_rewards(batch):
    """1."""
    rewards = torch.randn(len(batch["rewards"]), dtype=DT)
    ids = batch["group_ids"]
    size = O.group_sizes(ids).to(DT)
    want = size / (size - 1) * O.group_advantages(rewards, ids, "drgrpo")
    torch.testing.assert_close(O.group_advantages(rewards, ids, "rloo"), want, rtol=0, atol=1e-12)


def test_rloo_on_plus_minus_one_rewards_is_oreal_weighting(batch):
    """2: A+ = 2(K-c)/(K-1), A- = -2c/(K-1)."""
    correct, ids = batch["rewards"], batch["group_ids"]
    k, c = O.group_sizes(ids).to(DT), O.r_hat(correct, ids) * O.group_sizes(ids)
    adv = O.group_advantages(2 * correct - 1, ids, "rloo")
    torch.testing.assert_close(adv, torch.where(correct > 0, 2 * (k - c) / (k - 1), -2 * c / (k - 1)))


def test_grpo_advantages_are_affine_invariant_and_drgrpo_scale(batch):
    """3."""
    r, ids = batch["rewards"], batch["group_ids"]
    base = O.group_advantages(r, ids, eps_std=0.0)
    torch.testing.assert_close(O.group_advantages(3 * r - 2, ids, eps_std=0.0), base, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(O.group_advantages(2 * r - 1, ids, "drgrpo"), 2 * O.group_advantages(r, ids, "drgrpo"))


@pytest.mark.parametrize("kind", ["grpo", "drgrpo", "rloo"])
def test_advantages_sum_to_zero_within_each_group(batch, kind):
    """4."""
    adv = O.group_advantages(batch["rewards"] + torch.rand(len(batch["rewards"]), dtype=DT), batch["group_ids"],
                             kind)
    for members in naive.groups(batch["group_ids"]):
        assert abs(float(adv[members].sum())) < 1e-12


def test_aggregators_agree_when_lengths_are_equal():
    """5: token_mean = seq_mean_token_mean for equal |o_i|; sum_norm(C) = seq_mean_token_mean when |o_i| = C."""
    x = torch.randn(4, 6, dtype=DT)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 1:4] = True
    seq_mean = O.aggregate(x, mask, "seq_mean_token_mean")
    torch.testing.assert_close(O.aggregate(x, mask, "token_mean"), seq_mean)
    torch.testing.assert_close(O.aggregate(x, mask, "seq_mean_token_sum_norm", constant=3), seq_mean)


@pytest.mark.parametrize("name, agg", [("dapo", "token_mean"), ("grpo", "seq_mean_token_mean"),
                                       ("drgrpo", "seq_mean_token_sum_norm")])
def test_micro_batches_with_global_counts_sum_to_the_full_batch_loss(batch, name, agg):
    """Engine contract: split rows into micro-batches, pass the full batch's num_tokens/num_seqs, add up."""
    loss_fn = getattr(O, f"{name}_loss")
    adv = O.group_advantages(batch["rewards"], batch["group_ids"])
    totals = {"num_tokens": batch["mask"].sum(), "num_seqs": len(adv), "constant": 9.0}
    full_grad, full, _ = _grad(lambda lp: loss_fn(lp, batch["old"], adv, batch["mask"], agg=agg, constant=9.0),
                               batch["logp"])
    half = len(adv) // 2
    parts = [slice(0, half), slice(half, None)]
    split = [_grad(lambda lp: loss_fn(lp, batch["old"][s], adv[s], batch["mask"][s], agg=agg, **totals),
                   batch["logp"][s]) for s in parts]
    torch.testing.assert_close(split[0][1] + split[1][1], full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([split[0][0], split[1][0]]), full_grad, rtol=1e-12, atol=1e-12)


# ---- PPO family (6-10) ------------------------------------------------------------------------------------------
def test_ppo_at_ratio_one_has_no_clipping_and_gradient_minus_advantage(batch):
    """6."""
    adv = O.group_advantages(batch["rewards"], batch["group_ids"])
    mask = batch["mask"]
    grad, loss, metrics = _grad(lambda lp: O.dapo_loss(lp, None, adv, mask), batch["logp"])
    n = mask.sum()
    assert metrics["clip_frac"] == 0
    torch.testing.assert_close(loss, -(adv[:, None] * mask).sum() / n)
    torch.testing.assert_close(grad, -adv[:, None] * mask / n)


def test_dapo_with_equal_clips_equals_token_mean_grpo_for_any_ratio(batch):
    """7."""
    adv = O.group_advantages(batch["rewards"], batch["group_ids"])
    args = (batch["old"], adv, batch["mask"])
    dapo = _grad(lambda lp: O.dapo_loss(lp, *args, eps_low=0.2, eps_high=0.2), batch["logp"])
    grpo = _grad(lambda lp: O.grpo_loss(lp, *args, beta=0.0, agg="token_mean"), batch["logp"])
    torch.testing.assert_close(dapo[1], grpo[1], rtol=0, atol=0)
    torch.testing.assert_close(dapo[0], grpo[0], rtol=0, atol=0)


def test_drgrpo_equals_grpo_with_unit_std_and_constant_normaliser(batch):
    """8."""
    adv = O.group_advantages(batch["rewards"], batch["group_ids"], "drgrpo")
    args = (batch["old"], adv, batch["mask"])
    dr = _grad(lambda lp: O.drgrpo_loss(lp, *args, constant=50.0), batch["logp"])
    grpo = _grad(lambda lp: O.grpo_loss(lp, *args, beta=0.0, agg="seq_mean_token_sum_norm", constant=50.0),
                 batch["logp"])
    torch.testing.assert_close(dr[0], grpo[0], rtol=0, atol=0)


def test_clipping_zeroes_exactly_the_gradients_outside_the_trust_region():
    """9: A>0 & R>1+eps_high or A<0 & R<1-eps_low -> g = 0; otherwise g = -A R (token_mean weight 1/N)."""
    ratio = torch.tensor([0.5, 0.9, 1.1, 1.3, 0.5, 0.9, 1.1, 1.3], dtype=DT)
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0], dtype=DT)
    seq = torch.arange(8)
    logp = torch.full((8,), -1.0, dtype=DT)
    grad, _, metrics = _grad(lambda lp: O.dapo_loss(lp, logp - ratio.log(), adv, torch.ones(8, dtype=torch.bool),
                                                    seq_index=seq), logp)
    clipped = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
    torch.testing.assert_close(grad, torch.where(clipped, 0.0, -adv * ratio / 8))
    torch.testing.assert_close(metrics["clip_frac"], torch.tensor(2 / 8, dtype=DT))


def test_k3_is_nonnegative_and_zero_with_zero_gradient_at_the_reference():
    """10."""
    logp, ref = -torch.rand(50, dtype=DT), -torch.rand(50, dtype=DT)
    assert bool((O.kl_token(logp, ref, "k3")[0] >= 0).all())
    value, grad = O.kl_token(logp, logp, "k3")
    assert bool((value == 0).all()) and bool((grad == 0).all())


# ---- NFT (11-17) -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight", ["1", "1-r", "sqrt"])
def test_nft_loss_is_zero_at_ratio_one(batch, weight):
    """11."""
    for eps in (1.0, 0.1):
        loss, _ = O.nft_loss(batch["logp"], batch["logp"], batch["rewards"], batch["group_ids"], batch["mask"],
                             eps=eps, prompt_weight=weight)
        assert loss == 0


def _nft_grad(b, weight, rewards=None):
    r = b["rewards"] if rewards is None else rewards
    return _grad(lambda lp: O.nft_loss(lp, None, r, b["group_ids"], b["mask"], prompt_weight=weight,
                                       agg="token_mean"), b["logp"])[0]


def test_nft_gradient_equals_population_std_grpo_with_sqrt_weight_at_ratio_one(batch):
    """12, and against verl's unbiased std: NFT_grad * sqrt((G-1)/G) = GRPO_verl_grad."""
    r, ids, mask = batch["rewards"], batch["group_ids"], batch["mask"]
    nft = _nft_grad(batch, "sqrt", rewards=2 * r - 1)  # +-1 rewards accepted
    for unbiased in (False, True):
        adv = O.group_advantages(r, ids, unbiased_std=unbiased, eps_std=0.0)
        grpo = _grad(lambda lp: O.grpo_loss(lp, None, adv, mask, beta=0.0, agg="token_mean"), batch["logp"])[0]
        size = O.group_sizes(ids).to(DT)[:, None]
        scale = ((size - 1) / size).sqrt() if unbiased else 1.0
        torch.testing.assert_close(nft * scale, grpo, rtol=1e-12, atol=1e-14)


def test_nft_gradient_equals_drgrpo_with_one_minus_r_weight_at_ratio_one(batch):
    """13: equal with {0,1} rewards; Dr. GRPO on +-1 rewards is twice NFT."""
    r, ids, mask = batch["rewards"], batch["group_ids"], batch["mask"]
    nft = _nft_grad(batch, "1-r", rewards=r.bool())  # bool rewards accepted
    for scale, rewards in ((1.0, r), (2.0, 2 * r - 1)):
        adv = O.group_advantages(rewards, ids, "drgrpo")
        dr = _grad(lambda lp: O.drgrpo_loss(lp, None, adv, mask, agg="token_mean"), batch["logp"])[0]
        torch.testing.assert_close(scale * nft, dr, rtol=1e-12, atol=1e-14)


def test_nft_negative_token_with_eps_one_passes_gradient_straight_through():
    """14: eps = 1 and R >= 1: value 0, g = r_hat R / (1 - r_hat)."""
    ratio = torch.tensor([1.0, 1.5, 3.0], dtype=DT)
    loss, grad = O.TOKEN_LOCAL["nft"](ratio.log(), weight=1.0, old_logp=torch.zeros(3, dtype=DT),
                                      correct=torch.zeros(3, dtype=DT), r_hat=0.25, prompt_weight=1.0, eps=1.0)
    assert bool((loss == 0).all())
    torch.testing.assert_close(grad, 0.25 * ratio / 0.75)


def test_rft_is_sft_on_positive_tokens_over_the_constant_for_any_old_logp(batch):
    """15, also NFT with neg_weight = 0 and omega = 1."""
    r, ids, mask = batch["rewards"], batch["group_ids"], batch["mask"]
    rft = _grad(lambda lp: O.rft_loss(lp, r, mask, old_logp=batch["old"]), batch["logp"])[0]
    nft = _grad(lambda lp: O.nft_loss(lp, batch["old"], r, ids, mask, prompt_weight="1", neg_weight=0.0),
                batch["logp"])[0]
    positive = mask & (r[:, None] > 0)
    sft = _grad(lambda lp: O.sft_loss(lp, positive, agg="sum_const", constant=1000.0), batch["logp"])[0]
    torch.testing.assert_close(rft, sft, rtol=0, atol=0)
    torch.testing.assert_close(nft, sft, rtol=0, atol=0)


def test_nft_population_optimum_is_old_policy_restricted_to_correct_answers():
    """16 (Theorem 3.1), tabular: minimise the exact expected NFT loss over softmax logits with eps -> 0."""
    pi_old = torch.tensor([0.3, 0.1, 0.25, 0.05, 0.2, 0.1], dtype=DT)
    correct = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=DT)
    rate = float((pi_old * correct).sum())
    target = pi_old * correct / rate
    logits = pi_old.log().clone()
    tv = []
    for step in range(4000):
        pi = torch.softmax(logits, 0)
        _, g = O.TOKEN_LOCAL["nft"](pi.log(), weight=pi_old, old_logp=pi_old.log(), correct=correct, r_hat=rate,
                                    prompt_weight=1.0, eps=1e-9)
        logits -= 2.0 * (g - g.sum() * pi)  # chain rule through log-softmax
        if step % 1000 == 999:
            tv.append(0.5 * float((torch.softmax(logits, 0) - target).abs().sum()))
    assert all(a > b for a, b in zip(tv, tv[1:])), tv
    assert tv[-1] < 0.02, tv


def test_nft_prompt_weight_scales_only_its_group_gradient_linearly(batch):
    """17, on the token-local function the kernel uses."""
    b = batch
    flat, x = flatten(b["logp"], b["mask"], None, None, True, old_logp=b["old"])
    seq_r = O.r_hat(b["rewards"], b["group_ids"])
    first_group = b["group_ids"] == b["group_ids"][0]
    inputs = dict(weight=flat.mask.to(DT), old_logp=x["old_logp"], correct=flat.gather(b["rewards"]),
                  r_hat=flat.gather(seq_r))
    _, base = O.TOKEN_LOCAL["nft"](x["logp"], prompt_weight=1.0, **inputs)
    _, scaled = O.TOKEN_LOCAL["nft"](x["logp"], prompt_weight=flat.gather(1 + 2.0 * first_group), **inputs)
    in_group = flat.gather(first_group)
    torch.testing.assert_close(scaled, torch.where(in_group, 3 * base, base), rtol=1e-14, atol=0)


# ---- REDI, SimPO, DPO (18-22) ----------------------------------------------------------------------------------
def _pair_batch(seed=5):
    b = naive.random_batch(seed)
    return b["logp"], b["old"], b["mask"], b["mask"].roll(1, 0)


def _pair_grads(fn, lw, ll):
    leaves = [lw.clone().requires_grad_(), ll.clone().requires_grad_()]
    loss, _ = fn(*leaves)
    return torch.autograd.grad(loss, leaves), loss.detach()


def test_redi_with_alpha_zero_is_length_normalised_sft():
    """18."""
    lw, ll, mw, ml = _pair_batch()
    (gw, gl), _ = _pair_grads(lambda a, b: O.redi_loss(a, b, mw, ml, alpha=0.0), lw, ll)
    sft = _grad(lambda lp: O.sft_loss(lp, mw, agg="seq_mean_token_mean"), lw)[0]
    torch.testing.assert_close(gw, sft, rtol=1e-14, atol=0)
    assert bool((gl == 0).all())


def test_simpo_gradient_over_beta_tends_to_sigma_gamma_times_symmetric_redi():
    """19: relative error O(beta)."""
    lw, ll, mw, ml = _pair_batch()
    beta, gamma = 1e-7, 1.0
    (sw, sl), _ = _pair_grads(lambda a, b: O.simpo_loss(a, b, mw, ml, beta=beta, gamma=gamma), lw, ll)
    (rw, rl), _ = _pair_grads(lambda a, b: O.redi_loss(a, b, mw, ml, alpha=1.0), lw, ll)
    sigma = 1 / (1 + math.exp(-gamma))
    torch.testing.assert_close(sw / beta, sigma * rw, rtol=1e-5, atol=0)
    torch.testing.assert_close(sl / beta, sigma * rl, rtol=1e-5, atol=0)


def test_dpo_gradient_over_beta_tends_to_half_unnormalised_symmetric_redi():
    """20, for any reference."""
    lw, ll, mw, ml = _pair_batch()
    refs = torch.randn(2, lw.shape[0], dtype=DT)
    (gw, gl), _ = _pair_grads(lambda a, b: O.dpo_loss(a, b, mw, ml, *refs, beta=1e-7), lw, ll)
    pairs = lw.shape[0]
    torch.testing.assert_close(gw / 1e-7, -0.5 * mw.to(DT) / pairs, rtol=1e-5, atol=0)
    torch.testing.assert_close(gl / 1e-7, 0.5 * ml.to(DT) / pairs, rtol=1e-5, atol=0)


def test_dpo_at_the_reference_has_loss_log_two_and_half_beta_gradient():
    """21."""
    lw, ll, mw, ml = _pair_batch()
    refs = ((lw * mw).sum(1), (ll * ml).sum(1))
    (gw, gl), loss = _pair_grads(lambda a, b: O.dpo_loss(a, b, mw, ml, *refs, beta=0.3), lw, ll)
    torch.testing.assert_close(loss, torch.tensor(math.log(2), dtype=DT), rtol=1e-14, atol=0)
    torch.testing.assert_close(gw, -0.15 * mw.to(DT) / lw.shape[0])
    torch.testing.assert_close(gl, 0.15 * ml.to(DT) / lw.shape[0])


def test_redi_token_gradient_does_not_depend_on_the_policy():
    """22."""
    lw, ll, mw, ml = _pair_batch()
    first, _ = _pair_grads(lambda a, b: O.redi_loss(a, b, mw, ml), lw, ll)
    second, _ = _pair_grads(lambda a, b: O.redi_loss(a, b, mw, ml), 2 * lw, 3 * ll)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# ---- JEPO (23-27, 4) -------------------------------------------------------------------------------------------
def test_jepo_multi_sample_bound_is_above_the_mean_with_equality_iff_all_equal():
    """23: LSE(l*) - log n >= mean(l*)."""
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    ok = torch.ones(6, dtype=torch.bool)
    l_star = torch.tensor([-1.0, -2.0, -4.0, -1.5, -1.5, -1.5], dtype=DT)
    bound, _, _ = O.jepo_group_terms(l_star, ids, ok, multi_sample=True)
    mean, _, _ = O.jepo_group_terms(l_star, ids, ok, multi_sample=False)
    assert bool((bound[:3] > mean[:3]).all())
    torch.testing.assert_close(bound[3:], mean[3:], rtol=1e-15, atol=0)


def test_jepo_bound_gradient_is_softmax_and_one_sample_forms_coincide():
    """24."""
    l_star = torch.randn(5, dtype=DT, requires_grad=True)
    ids, ok = torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.bool)
    _, _, d_bound = O.jepo_group_terms(l_star.detach(), ids, ok)
    want = torch.autograd.grad(torch.logsumexp(l_star, 0) - math.log(5), l_star)[0]
    torch.testing.assert_close(d_bound, want)
    one = torch.tensor([-2.5], dtype=DT)
    multi = O.jepo_group_terms(one, ids[:1], ok[:1], True)
    single = O.jepo_group_terms(one, ids[:1], ok[:1], False)
    torch.testing.assert_close(multi[0], single[0])
    torch.testing.assert_close(multi[2], single[2])


def test_jepo_single_sample_leave_one_out_advantages_sum_to_zero_per_group():
    """4 (JEPO part)."""
    ids = torch.tensor([3, 3, 3, 8, 8])
    _, adv, _ = O.jepo_group_terms(torch.randn(5, dtype=DT), ids, torch.ones(5, dtype=torch.bool), False)
    assert abs(float(adv[:3].sum())) < 1e-12 and abs(float(adv[3:].sum())) < 1e-12


@pytest.mark.parametrize("multi", [True, False])
def test_jepo_with_empty_cot_is_beta_sup_times_sft_on_the_answer(multi):
    """25: no CoT -> every l*_i of a group is equal, A = 0, and g = beta_sup x SFT (sum over a*, mean over i, q)."""
    answer_logp = -torch.rand(1, 4, dtype=DT)
    logp = answer_logp.repeat(6, 1)
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    answer = torch.ones(6, 4, dtype=torch.bool)
    cot = torch.zeros(6, 4, dtype=torch.bool)
    grad = _grad(lambda lp: O.jepo_loss(lp, cot, answer, ids, beta_sup=0.4, multi_sample=multi), logp)[0]
    sft = _grad(lambda lp: O.sft_loss(lp, answer, agg="sum_const", constant=6.0), logp)[0]
    torch.testing.assert_close(grad, 0.4 * sft, rtol=1e-14, atol=0)


@pytest.mark.parametrize("multi,n", [(False, 2), (False, 3), (True, 2), (True, 3)])
def test_jepo_leave_one_out_estimators_are_unbiased_tabular(multi, n):
    """26: enumerate every n-tuple of CoTs c ~ pi_theta over K choices. The score-function estimate with the
    leave-one-out advantages, E[sum_i A_i grad log pi(c_i)], equals the exact gradient of E[bound] (the baseline
    adds nothing in expectation); for the single-sample bound that is grad sum_c pi(c) log pi(a*|c), n times."""
    k = 3
    gen = torch.Generator().manual_seed(26)
    theta = torch.randn(k, dtype=DT, generator=gen).requires_grad_()
    log_answer = torch.log(0.05 + 0.9 * torch.rand(k, dtype=DT, generator=gen))  # log pi(a*|c)
    log_pi = theta.log_softmax(0)
    ids, ok = torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool)
    expected_bound, estimate = 0.0, torch.zeros(k, dtype=DT)
    for combo in itertools.product(range(k), repeat=n):
        c = torch.tensor(combo)
        prob = log_pi[c].sum().exp()
        bound, adv, _ = O.jepo_group_terms(log_answer[c], ids, ok, multi_sample=multi)
        expected_bound = expected_bound + prob * bound[0]
        score = torch.nn.functional.one_hot(c, k).to(DT) - log_pi.detach().exp()  # d log pi(c_i) / d theta
        estimate += prob.detach() * (adv[:, None] * score).sum(0)
    exact = torch.autograd.grad(expected_bound, theta, retain_graph=True)[0]
    torch.testing.assert_close(estimate, exact * (1 if multi else n), rtol=1e-12, atol=1e-14)
    if not multi:
        elbo = torch.autograd.grad((log_pi.exp() * log_answer).sum(), theta)[0]
        torch.testing.assert_close(exact, elbo, rtol=1e-12, atol=1e-14)


def test_jepo_answer_log_likelihood_is_a_sum_not_a_mean():
    """27: the same answer log-likelihood split over more tokens changes neither the bound nor the gradients."""
    ids = torch.tensor([0, 0, 1, 1])
    cot_logp = -torch.rand(4, 3, dtype=DT)
    l_star = -torch.rand(4, dtype=DT) * 3
    cot = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool).repeat(4, 1)
    one_token = torch.cat([cot_logp, l_star[:, None], torch.zeros(4, 1, dtype=DT)], 1)
    two_tokens = torch.cat([cot_logp, 0.3 * l_star[:, None], 0.7 * l_star[:, None]], 1)
    answer_one = torch.tensor([[0, 0, 0, 1, 0]], dtype=torch.bool).repeat(4, 1)
    answer_two = torch.tensor([[0, 0, 0, 1, 1]], dtype=torch.bool).repeat(4, 1)
    g1, _, m1 = _grad(lambda lp: O.jepo_loss(lp, cot, answer_one, ids), one_token)
    g2, _, m2 = _grad(lambda lp: O.jepo_loss(lp, cot, answer_two, ids), two_tokens)
    torch.testing.assert_close(m1["bound"], m2["bound"], rtol=1e-14, atol=0)
    torch.testing.assert_close(g1[:, :4], g2[:, :4], rtol=1e-12, atol=0)  # CoT and the first answer token


# ---- OREAL (28-30) -----------------------------------------------------------------------------------------------
def test_oreal_token_weights_are_exclusive_and_sum_to_the_score_magnitude(batch):
    """28."""
    flat, x = flatten(batch["logp"], batch["mask"], None, None, True, scores=torch.randn_like(batch["logp"]))
    pos, neg = O.oreal_token_weights(x["scores"], flat)
    assert bool((pos * neg == 0).all())
    zero = O.oreal_token_weights(torch.zeros_like(x["scores"]), flat)
    assert bool((zero[0] == 0).all()) and bool((zero[1] == 0).all())
    assert bool(((pos + neg) <= 1).all()) and bool((pos + neg)[flat.mask].gt(0).all())


def test_oreal_with_zero_scores_has_only_the_kl_gradient(batch):
    """28: at w = 0 the policy gradient is exactly 0 apart from the KL term (why the actor is frozen)."""
    r, mask = batch["rewards"], batch["mask"]
    adv = O.group_advantages(2 * r - 1, batch["group_ids"], "rloo")
    grad = _grad(lambda lp: O.oreal_loss(lp, r, adv, mask, ref_logp=batch["ref"],
                                         token_scores=torch.zeros_like(lp)), batch["logp"])[0]
    kl = 0.01 * -torch.expm1(batch["ref"] - batch["logp"]) * mask / mask.sum()
    torch.testing.assert_close(grad, kl, rtol=1e-12, atol=1e-15)


def test_oreal_without_token_rm_and_equal_counts_is_rloo_policy_gradient_plus_kl(batch):
    """30: omega = 1, eta = 1, N+ = N- = N -> RLOO policy gradient (token mean) on +-1 rewards, plus k3."""
    r, mask = batch["rewards"], batch["mask"]
    adv = O.group_advantages(2 * r - 1, batch["group_ids"], "rloo")
    n = mask.sum()
    oreal = _grad(lambda lp: O.oreal_loss(lp, r, adv, mask, ref_logp=batch["ref"], eta=1.0, num_pos_tokens=n,
                                          num_neg_tokens=n), batch["logp"])[0]
    pg = _grad(lambda lp: O.dapo_loss(lp, None, adv, mask), batch["logp"])[0]
    kl = 0.01 * -torch.expm1(batch["ref"] - batch["logp"]) * mask / n
    torch.testing.assert_close(oreal, pg + kl, rtol=1e-12, atol=1e-15)


# ---- the token-local interface, as the fused kernel calls it -----------------------------------------------------
def test_token_local_functions_with_aggregation_weights_reproduce_the_losses(batch):
    """loss = sum(loss_t), dL/dlogp = grad_t, for the registry entries the kernel applies."""
    b = batch
    flat, x = flatten(b["logp"], b["mask"], None, None, True, old_logp=b["old"])
    adv = O.group_advantages(b["rewards"], b["group_ids"])
    rate = O.r_hat(b["rewards"], b["group_ids"])
    cases = {
        "dapo": (O.dapo_loss(b["logp"], b["old"], adv, b["mask"]), "token_mean", None,
                 dict(old_logp=x["old_logp"], adv=flat.gather(adv))),
        "nft": (O.nft_loss(b["logp"], b["old"], b["rewards"], b["group_ids"], b["mask"]), "sum_const", 1000.0,
                dict(old_logp=x["old_logp"], correct=flat.gather(b["rewards"]), r_hat=flat.gather(rate),
                     prompt_weight=flat.gather(1 - rate))),
        "sft": (O.sft_loss(b["logp"], b["mask"]), "token_mean", None, {}),
    }
    for name, ((loss, _), agg, constant, inputs) in cases.items():
        w = O.token_weights(flat, agg, DT, constant=constant)
        loss_t, grad_t = O.TOKEN_LOCAL[name](x["logp"], weight=w, **inputs)
        torch.testing.assert_close(loss_t.sum(), loss, rtol=1e-14, atol=1e-15)
        leaf = b["logp"].clone().requires_grad_()
        fn = {"dapo": lambda lp: O.dapo_loss(lp, b["old"], adv, b["mask"]),
              "nft": lambda lp: O.nft_loss(lp, b["old"], b["rewards"], b["group_ids"], b["mask"]),
              "sft": lambda lp: O.sft_loss(lp, b["mask"])}[name]
        torch.testing.assert_close(torch.autograd.grad(fn(leaf)[0], leaf)[0].reshape(-1), grad_t)


# ---- GSPO, CISPO, entropy bonus ---------------------------------------------------------------------------------
def _equal_lengths(batch):
    mask = torch.zeros_like(batch["mask"])
    mask[:, 2:7] = True
    return mask


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean"])
def test_gspo_equals_grpo_at_ratio_one_on_equal_length_sequences(batch, agg):
    """Where the definitions meet (|y_i| equal, R = s_i = 1) GSPO's gradient is GRPO's (beta = 0)."""
    adv, mask = O.group_advantages(batch["rewards"], batch["group_ids"]), _equal_lengths(batch)
    gspo = _grad(lambda lp: O.gspo_loss(lp, batch["logp"], adv, mask, agg=agg), batch["logp"])
    grpo = _grad(lambda lp: O.grpo_loss(lp, batch["logp"], adv, mask, beta=0.0, agg=agg), batch["logp"])
    torch.testing.assert_close(gspo[1], grpo[1], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(gspo[0], grpo[0], rtol=1e-14, atol=1e-15)


def test_gspo_equals_grpo_when_every_token_of_a_sequence_has_the_sequence_ratio(batch):
    """Token ratios all equal to s_i within each sequence: the same clipped surrogate, for any clip range."""
    adv, mask = O.group_advantages(batch["rewards"], batch["group_ids"]), batch["mask"]
    shift = 0.3 * torch.randn(len(adv), 1, dtype=DT, generator=batch["g"])
    old = batch["logp"] - shift
    for eps in (0.05, 0.2):
        gspo = _grad(lambda lp: O.gspo_loss(lp, old, adv, mask, eps_low=eps, eps_high=eps), batch["logp"])
        grpo = _grad(lambda lp: O.grpo_loss(lp, old, adv, mask, beta=0.0, eps=eps), batch["logp"])
        torch.testing.assert_close(gspo[0], grpo[0], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(gspo[2]["clip_frac"], grpo[2]["clip_frac"])
        assert 0 < gspo[2]["clip_frac"] < 1 or eps == 0.2


def test_cispo_keeps_every_token_gradient_scaled_by_the_clipped_weight(batch):
    """CISPO: g = -clip(R) A w on every token (PPO zeroes the clipped ones); equal to PPO where PPO is unclipped."""
    adv, mask = O.group_advantages(batch["rewards"], batch["group_ids"]), batch["mask"]
    cispo, _, _ = _grad(lambda lp: O.cispo_loss(lp, batch["old"], adv, mask, eps_low=0.2, eps_high=0.2),
                        batch["logp"])
    dapo, _, _ = _grad(lambda lp: O.dapo_loss(lp, batch["old"], adv, mask, eps_low=0.2, eps_high=0.2), batch["logp"])
    ratio = torch.exp(batch["logp"] - batch["old"])
    n = mask.sum()
    torch.testing.assert_close(cispo, -(ratio.clamp(0.8, 1.2) * adv[:, None]) * mask / n, rtol=1e-14, atol=0)
    inside = mask & (ratio > 0.8) & (ratio < 1.2)
    torch.testing.assert_close(cispo[inside], dapo[inside], rtol=1e-14, atol=0)
    a = adv[:, None].expand_as(ratio)
    dropped = mask & (((a > 0) & (ratio >= 1.2)) | ((a < 0) & (ratio <= 0.8)))  # PPO's clipped tokens
    assert dropped.any() and bool((dapo[dropped] == 0).all()) and bool((cispo[dropped] != 0).all())


def _entropy_cases(b):
    adv = O.group_advantages(b["rewards"], b["group_ids"])
    m = b["mask"]
    answer = m & (m.flip(1).cumsum(1).flip(1) <= 1)
    size = O.group_sizes(b["group_ids"]).to(DT)[:, None]
    groups = len(b["group_ids"].unique())
    lengths = m.sum(1, keepdim=True).to(DT)
    mf, cot = m.to(DT), (m & ~answer).to(DT)
    return {  # name: (loss(lp, **bonus), the aggregation weight w_t the bonus must use)
        "grpo": (lambda lp, **k: O.grpo_loss(lp, b["old"], adv, m, ref_logp=b["ref"], **k), mf / (lengths * len(adv))),
        "dapo": (lambda lp, **k: O.dapo_loss(lp, b["old"], adv, m, **k), mf / mf.sum()),
        "drgrpo": (lambda lp, **k: O.drgrpo_loss(lp, b["old"], adv, m, constant=20.0, **k), mf / (20.0 * len(adv))),
        "gspo": (lambda lp, **k: O.gspo_loss(lp, b["old"], adv, m, **k), mf / (lengths * len(adv))),
        "cispo": (lambda lp, **k: O.cispo_loss(lp, b["old"], adv, m, **k), mf / mf.sum()),
        "nft": (lambda lp, **k: O.nft_loss(lp, b["old"], b["rewards"], b["group_ids"], m, **k), mf / 1000.0),
        "rft": (lambda lp, **k: O.rft_loss(lp, b["rewards"], m, old_logp=b["old"], **k), mf / 1000.0),
        "oreal": (lambda lp, **k: O.oreal_loss(lp, b["rewards"], adv, m, ref_logp=b["ref"], **k), mf / mf.sum()),
        "jepo": (lambda lp, **k: O.jepo_loss(lp, m & ~answer, answer, b["group_ids"], ref_logp=b["ref"], **k),
                 cot / (size * groups)),
    }


@pytest.mark.parametrize("name", O.names("online"))
def test_entropy_bonus_is_minus_coef_times_the_losss_own_aggregate_of_the_entropy(batch, name):
    """Every online objective: L(coef) = L(0) - coef sum_t w_t H_t with its own aggregation weight w_t; the
    log-prob gradient is unchanged and dL/dH_t = -coef w_t."""
    fn, weight = _entropy_cases(batch)[name]
    entropy = (0.5 + torch.rand(batch["logp"].shape, dtype=DT, generator=batch["g"])).requires_grad_()
    logp = batch["logp"].clone().requires_grad_()
    with_bonus, _ = fn(logp, entropy=entropy, entropy_coef=0.05)
    d_logp, d_entropy = torch.autograd.grad(with_bonus, [logp, entropy])
    plain = _grad(lambda lp: fn(lp), batch["logp"])
    torch.testing.assert_close(with_bonus.detach(), plain[1] - 0.05 * (weight * entropy.detach()).sum(), rtol=1e-13,
                               atol=1e-15)
    torch.testing.assert_close(d_logp, plain[0], rtol=0, atol=0)
    torch.testing.assert_close(d_entropy, -0.05 * weight.to(DT), rtol=1e-14, atol=0)


def test_entropy_coef_without_entropy_and_k1_as_a_loss_are_errors(batch):
    adv = O.group_advantages(batch["rewards"], batch["group_ids"])
    with pytest.raises(ValueError, match="entropy_coef=0.1 needs the per-token entropy"):
        O.grpo_loss(batch["logp"], None, adv, batch["mask"], entropy_coef=0.1)
    with pytest.raises(ValueError, match="k1.*expected gradient"):
        O.grpo_loss(batch["logp"], None, adv, batch["mask"], ref_logp=batch["ref"], kl="k1")
    with pytest.raises(ValueError, match="drgrpo needs constant"):
        O.drgrpo_loss(batch["logp"], None, adv, batch["mask"])


def test_k1_as_a_loss_has_zero_expected_gradient_and_k2_k3_give_the_two_kl_gradients():
    """Why k1 is refused: E_{y~pi}[d k_t/d l * grad log pi(y)] over a tabular softmax, exactly."""
    theta = torch.randn(6, dtype=DT, generator=torch.Generator().manual_seed(3)).requires_grad_()
    ref = torch.log_softmax(torch.randn(6, dtype=DT, generator=torch.Generator().manual_seed(4)), 0)
    log_pi = torch.log_softmax(theta, 0)
    pi = log_pi.exp().detach()
    score = torch.eye(6, dtype=DT) - pi  # d log pi(y) / d theta, one row per y
    expected = {kind: (pi[:, None] * O.kl_token(log_pi.detach(), ref, kind)[1][:, None] * score).sum(0)
                for kind in ("k1", "k2", "k3")}
    reverse = torch.autograd.grad((log_pi.exp() * (log_pi - ref)).sum(), theta, retain_graph=True)[0]
    forward = torch.autograd.grad((ref.exp() * (ref - log_pi)).sum(), theta)[0]
    torch.testing.assert_close(expected["k1"], torch.zeros(6, dtype=DT), rtol=0, atol=1e-15)
    torch.testing.assert_close(expected["k2"], reverse, rtol=1e-12, atol=1e-15)  # grad KL(pi || ref)
    torch.testing.assert_close(expected["k3"], forward, rtol=1e-12, atol=1e-15)  # grad KL(ref || pi)


# ---- JEPO format penalty and mini-batch statistics --------------------------------------------------------------
def test_jepo_format_penalty_is_normalised_like_the_advantage():
    """n = 4, one badly formatted sample: its CoT coefficient is -clip(A_ref / std, -1, 1) / n, and the valid
    samples get the positive share back (a raw -10 would give -10 / n and nothing to the others)."""
    ids = torch.zeros(4, dtype=torch.long)
    valid = torch.tensor([False, True, True, True])
    fmt = torch.tensor([-10.0, 0.0, 0.0, 0.0], dtype=DT)
    logp = -torch.rand(4, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    cot = torch.tensor([[1, 1, 0]] * 4, dtype=torch.bool)
    answer = ~cot
    grad = _grad(lambda lp: O.jepo_loss(lp, cot, answer, ids, valid=valid, format_rewards=fmt, beta_sup=0.0),
                 logp)[0]
    a_ref = torch.tensor([-10.0, 10 / 3, 10 / 3, 10 / 3], dtype=DT)  # leave-one-out advantage of the format reward
    norm = (a_ref / a_ref.std(unbiased=False)).clamp(-1, 1)  # [-1, 0.577...]
    adv = O.jepo_group_terms((logp * answer).sum(1), ids, valid)[1]
    main = torch.where(valid, (adv / adv[valid].std(unbiased=False)).clamp(-1, 1), 0.0)
    torch.testing.assert_close(grad[:, 0], -(main + norm) / 4, rtol=1e-12, atol=1e-15)
    assert grad[0, 0] == 0.25 and bool((grad[1:, 0] - (-main[1:] / 4) < 0).all())


def test_jepo_statistics_of_the_parts_add_up_to_the_whole_batch():
    b = naive.random_batch(31)
    answer = b["mask"] & (b["mask"].flip(1).cumsum(1).flip(1) <= 2)
    cot = b["mask"] & ~answer
    fmt = torch.zeros(len(b["group_ids"]), dtype=DT)
    fmt[0] = -10.0
    whole = O.jepo_statistics(b["logp"], cot, answer, b["group_ids"], format_rewards=fmt)
    first = b["group_ids"] == b["group_ids"][0]
    parts = [O.jepo_statistics(b["logp"][s], cot[s], answer[s], b["group_ids"][s], format_rewards=fmt[s])
             for s in (first, ~first)]
    for key in whole:
        torch.testing.assert_close(parts[0][key] + parts[1][key], whole[key], rtol=1e-14, atol=1e-14)
