"""Bad input gives a ValueError naming the argument (never a silent NaN); accepted input forms and dtypes."""
import pytest
import torch

import twofold.objectives as O


def _batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    logp = -(0.1 + torch.rand(4, 5, generator=g, dtype=dtype))
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return logp, logp + 0.1, torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=dtype), torch.tensor([0, 0, 1, 1]), mask


def _nft(**over):
    logp, old, rewards, ids, mask = _batch()
    args = dict(logp=logp, old_logp=old, rewards=rewards, group_ids=ids, mask=mask) | over
    return O.nft_loss(**args)


@pytest.mark.parametrize("over, name", [
    (dict(old_logp=torch.zeros(4, 6, dtype=torch.float64)), "old_logp"),
    (dict(mask=torch.ones(4, 4, dtype=torch.bool)), "mask"),
    (dict(rewards=torch.ones(3, dtype=torch.float64)), "rewards"),
    (dict(group_ids=torch.tensor([0, 0, 1])), "group_ids"),
    (dict(rewards=torch.tensor([1.0, 0.5, 1.0, 0.0], dtype=torch.float64)), "rewards"),
    (dict(rewards=torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64)), "rewards"),
    (dict(logp=torch.zeros(4, 5, dtype=torch.long)), "logp"),
    (dict(group_ids=torch.tensor([0.0, 0.0, 1.0, 1.0])), "group_ids"),
    (dict(eps=0.0), "eps"),
    (dict(prompt_weight="sqrt(r)"), "prompt_weight"),
])
def test_nft_rejects_bad_input_naming_the_argument(over, name):
    with pytest.raises(ValueError, match=name):
        _nft(**over)


@pytest.mark.parametrize("field", ["logp", "old_logp"])
def test_nan_on_a_counted_token_is_an_error_but_nan_in_padding_is_ignored(field):
    logp, old, rewards, ids, mask = _batch()
    bad = {"logp": logp.clone(), "old_logp": old.clone()}
    bad[field][1, 4] = float("nan")  # padding: fine, and its gradient is exactly 0
    leaf = bad["logp"].requires_grad_()
    loss, _ = O.nft_loss(leaf, bad["old_logp"], rewards, ids, mask)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(leaf.grad).all()) and leaf.grad[1, 4] == 0
    bad[field] = bad[field].detach().clone()
    bad[field][0, 0] = float("nan")
    with pytest.raises(ValueError, match=field):
        O.nft_loss(bad["logp"], bad["old_logp"], rewards, ids, mask)


def test_one_sample_groups_are_rejected_where_two_are_needed():
    logp, _, rewards, _, mask = _batch()
    ids = torch.tensor([0, 0, 0, 1])
    with pytest.raises(ValueError, match="group_ids"):
        O.group_advantages(rewards, ids, "rloo")
    answer = torch.zeros_like(mask)
    answer[:, -1] = True
    with pytest.raises(ValueError, match="group_ids"):
        O.jepo_loss(logp, mask & ~answer, answer, ids)


def test_other_losses_name_their_bad_arguments():
    logp, old, rewards, ids, mask = _batch()
    adv = O.group_advantages(rewards, ids)
    with pytest.raises(ValueError, match="advantages"):
        O.grpo_loss(logp, old, adv[:3], mask)
    with pytest.raises(ValueError, match="agg"):
        O.sft_loss(logp, mask, agg="mean")
    with pytest.raises(ValueError, match="constant"):
        O.sft_loss(logp, mask, agg="sum_const")
    with pytest.raises(ValueError, match="seq_index"):
        O.sft_loss(logp.reshape(-1), mask.reshape(-1))
    with pytest.raises(ValueError, match="seq_index"):
        O.sft_loss(logp.reshape(-1), mask.reshape(-1), seq_index=torch.full((20,), 30))
    with pytest.raises(ValueError, match="rejected_logp"):
        O.redi_loss(logp, logp[:3], mask, mask[:3])
    with pytest.raises(ValueError, match="ref_chosen"):
        O.dpo_loss(logp, logp, mask, mask, torch.tensor([1.0, float("nan"), 0, 0], dtype=logp.dtype),
                   torch.zeros(4, dtype=logp.dtype))
    with pytest.raises(ValueError, match="mask"):
        O.sft_loss(logp, mask.to(logp.dtype) * 0.5)
    with pytest.raises(ValueError, match="kl"):
        O.grpo_loss(logp, old, adv, mask, ref_logp=old, kl="k4")
    with pytest.raises(ValueError, match="cache_len"):
        O.overlong_reward(torch.tensor([3]), max_len=4, cache_len=8)


def test_binary_rewards_as_bool_zero_one_and_plus_minus_one_give_the_same_loss():
    logp, old, rewards, ids, mask = _batch()
    losses = [O.nft_loss(logp, old, r, ids, mask)[0] for r in (rewards, rewards.bool(), 2 * rewards - 1)]
    assert losses[0] == losses[1] == losses[2]
    oreal = [O.oreal_loss(logp, r, O.group_advantages(2 * rewards - 1, ids, "rloo"), mask)[0]
             for r in (rewards, rewards.bool(), 2 * rewards - 1)]
    assert oreal[0] == oreal[1] == oreal[2]


def test_empty_batch_gives_zero_loss_not_nan():
    logp, old, rewards, ids, mask = _batch()
    none = torch.zeros_like(mask)
    for loss, _ in (O.sft_loss(logp, none), O.dapo_loss(logp, old, rewards, none),
                    O.grpo_loss(logp, old, rewards, none), O.redi_loss(logp, logp, none, none)):
        assert loss == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_loss_runs_in_float32_and_float64_with_finite_detached_metrics(dtype):
    logp, old, rewards, ids, mask = _batch(dtype)
    answer = torch.zeros_like(mask)
    answer[:, -2:] = mask[:, -2:]
    adv = O.group_advantages(rewards, ids)
    calls = [
        lambda lp: O.sft_loss(lp, mask), lambda lp: O.rft_loss(lp, rewards, mask, old_logp=old),
        lambda lp: O.grpo_loss(lp, old, adv, mask, ref_logp=old), lambda lp: O.dapo_loss(lp, old, adv, mask),
        lambda lp: O.drgrpo_loss(lp, old, adv, mask, constant=8.0), lambda lp: O.nft_loss(lp, old, rewards, ids, mask),
        lambda lp: O.oreal_loss(lp, rewards, adv, mask, ref_logp=old, token_scores=old),
        lambda lp: O.redi_loss(lp, old, mask, mask), lambda lp: O.dpo_loss(lp, old, mask, mask),
        lambda lp: O.simpo_loss(lp, old, mask, mask), lambda lp: O.jepo_loss(lp, mask & ~answer, answer, ids),
        lambda lp: O.gspo_loss(lp, old, adv, mask), lambda lp: O.cispo_loss(lp, old, adv, mask),
        lambda lp: O.grpo_loss(lp, old, adv, mask, entropy=-lp, entropy_coef=0.1),
    ]
    for call in calls:
        leaf = logp.clone().requires_grad_()
        loss, metrics = call(leaf)
        loss.backward()
        assert loss.dtype == dtype and torch.isfinite(loss) and leaf.grad.dtype == dtype
        assert bool(torch.isfinite(leaf.grad).all()) and leaf.grad.abs().sum() > 0
        assert all(not m.requires_grad and bool(torch.isfinite(m)) for m in metrics.values())


def test_token_reward_head_trains_with_bce_on_the_mean_token_score():
    torch.manual_seed(0)
    head = O.TokenRewardHead(8)
    hidden = torch.randn(6, 5, 8)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    hidden[rewards > 0] += 0.5  # separable
    mask = torch.ones(6, 5, dtype=torch.bool)
    first, _ = O.token_rm_loss(head(hidden), rewards, mask)
    assert torch.isclose(first, torch.log(torch.tensor(2.0)))  # zero init: sigma(0) = 1/2
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    for _ in range(30):
        opt.zero_grad()
        loss, metrics = O.token_rm_loss(head(hidden), rewards, mask)
        loss.backward()
        opt.step()
    assert loss < 0.5 * first and metrics["accuracy"] == 1
