"""twofold.completion_logprobs on real HF causal LMs, the LM-head bias, per-token advantages, and the twofold.nn
modules against their formula (TRL's per-token loss and normalisers) and against Liger's LigerFusedLinearGRPOLoss."""
import pytest
import torch
from transformers import GPTJConfig, GPTJForCausalLM, Gemma2Config, Gemma2ForCausalLM

import twofold
from twofold.engine.train.tiny import build_preset_model
from twofold.nn import FusedLinearGRPOLoss, FusedLinearNFTLoss, FusedLinearPolicyLoss, FusedLinearRFTLoss


def gptj_with_head_bias():
    torch.manual_seed(0)
    config = GPTJConfig(vocab_size=96, n_embd=32, n_layer=1, n_head=4, n_positions=64, rotary_dim=4,
                        bos_token_id=1, eos_token_id=2)
    model = GPTJForCausalLM(config).float()
    with torch.no_grad():
        model.lm_head.bias.normal_()  # GPT-J's head has a bias; make it matter
    return model


MODELS = {"llama-untied": lambda: build_preset_model("tiny-llama"), "qwen2-tied": lambda: build_preset_model("tiny-qwen2"),
          "gptj-head-bias": gptj_with_head_bias}


def padded_batch(vocab, seed=0):
    """Left-padded prompts, right-padded completions: [B, T] ids and attention mask, [B, Tc] completion mask."""
    g = torch.Generator().manual_seed(seed)
    b, tp, tc = 3, 5, 4
    ids = torch.randint(4, vocab, (b, tp + tc), generator=g)
    attention = torch.ones(b, tp + tc, dtype=torch.long)
    attention[0, :2] = 0  # left padding of prompt 0
    completion = torch.ones(b, tc, dtype=torch.long)
    completion[1, 2:] = 0  # completion 1 is two tokens long
    attention[1, tp + 2:] = 0
    return ids, attention, completion


def reference_logprobs(model, ids, attention, completion, temperature=1.0):
    """From the model's own [B, T, V] logits: the log-prob of each completion token, and the entropy."""
    tc = completion.shape[1]
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -tc - 1:-1].float() / temperature
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, ids[:, -tc:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp * completion, entropy * completion


@pytest.mark.parametrize("name", MODELS)
def test_completion_logprobs_equal_the_models_logits_in_value_and_gradient(name):
    model = MODELS[name]()
    ids, attention, completion = padded_batch(model.config.vocab_size)
    logp, entropy = twofold.completion_logprobs(model, ids, attention, completion, return_entropy=True,
                                                temperature=0.7)
    ref_logp, ref_entropy = reference_logprobs(model, ids, attention, completion, temperature=0.7)
    assert logp.shape == completion.shape and logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=2e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=2e-5)
    assert bool((logp[completion == 0] == 0).all())
    upstream = torch.randn(logp.shape, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad((logp * upstream).sum() + entropy.sum(), params, allow_unused=True)
    theirs = torch.autograd.grad((ref_logp * upstream).sum() + ref_entropy.sum(), params, allow_unused=True)
    for p, a, b in zip(params, ours, theirs):
        if b is None:
            assert a is None or bool((a == 0).all())
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if name == "gptj-head-bias":
        index = [i for i, p in enumerate(params) if p is model.lm_head.bias]
        assert len(index) == 1 and ours[index[0]].abs().sum() > 0


def test_completion_mask_aligned_with_input_ids_gives_the_same_values():
    model = MODELS["llama-untied"]()
    ids, attention, completion = padded_batch(model.config.vocab_size)
    full = torch.cat([torch.zeros(3, ids.shape[1] - completion.shape[1], dtype=torch.long), completion], 1)
    short = twofold.completion_logprobs(model, ids, attention, completion)
    aligned = twofold.completion_logprobs(model, ids, attention, full)
    assert aligned.shape == ids.shape
    torch.testing.assert_close(aligned[:, -completion.shape[1]:], short, rtol=0, atol=1e-6)
    assert bool((aligned[:, :-completion.shape[1]] == 0).all())


def test_completion_logprobs_reject_what_they_cannot_score():
    model = MODELS["llama-untied"]()
    ids, attention, completion = padded_batch(model.config.vocab_size)
    first = torch.zeros_like(ids)
    first[2, 0] = 1
    with pytest.raises(ValueError, match=r"completion_mask\[2, 0\]"):
        twofold.completion_logprobs(model, ids, attention, first)
    with pytest.raises(ValueError, match="completion_mask must be"):
        twofold.completion_logprobs(model, ids, attention, completion[:2])
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        twofold.completion_logprobs(gemma, ids.clamp(max=63), attention, completion)


def test_linear_logprobs_with_bias_match_float64_and_fused_loss_takes_bias():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 7, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(37, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 37, (2, 7), generator=g)
    y[0, 3] = -100
    logp = twofold.linear_logprobs(h, w, y, bias=b)
    ref = (h @ w.t() + b).log_softmax(-1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y != -100)
    torch.testing.assert_close(logp, ref, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda h, w, b: twofold.linear_logprobs(h, w, y, bias=b), (h, w, b))
    weight = torch.rand(2, 7, generator=g, dtype=torch.float64)
    fused = twofold.fused_linear_loss(h, w, y, "sft", inputs=dict(weight=weight), bias=b).loss
    unfused = -(weight * ref).sum()
    grads = torch.autograd.grad(fused, (h, w, b))
    for a, r in zip(grads, torch.autograd.grad(unfused, (h, w, b))):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="bias must be"):
        twofold.linear_logprobs(h, w, y, bias=b[:-1])


def test_per_token_advantages_equal_per_sequence_ones_and_the_formula():
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(4, 6, generator=g, dtype=torch.float64)).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=g) > 0.3
    adv_seq = torch.randn(4, generator=g, dtype=torch.float64)
    per_seq, _ = twofold.grpo_loss(logp, old, adv_seq, mask, beta=0.0)
    per_token, _ = twofold.grpo_loss(logp, old, adv_seq[:, None].expand(4, 6), mask, beta=0.0)
    torch.testing.assert_close(per_token, per_seq, rtol=0, atol=1e-15)
    adv = torch.randn(4, 6, generator=g, dtype=torch.float64)
    adv[~mask] = float("nan")  # padding may hold anything; it must not leak
    loss, _ = twofold.dapo_loss(logp, old, adv, mask)
    ratio = (logp - old).exp()
    a = adv.nan_to_num(0.0)
    per_tok = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.28))
    expected = (per_tok * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(expected, logp)[0],
                               rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="advantages must have shape"):
        twofold.dapo_loss(logp, old, adv[:, :5], mask)


def trl_policy_loss(logp, old, ref, adv, mask, loss_type, beta, eps_low, eps_high, max_len, num_items=None):
    """TRL's GRPOTrainer._compute_loss for the four clip loss types, written out (token-level sampling)."""
    adv = adv[:, None] if adv.dim() == 1 else adv
    ratio = (logp - old).exp()
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    if beta:
        per_token = per_token + beta * ((ref - logp).exp() - (ref - logp) - 1)
    mask = mask.float()
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.shape[0] * max_len)
    return (per_token * mask).sum() / (mask.sum() if num_items is None else num_items)


def module_inputs(seed=0, b=4, t=6, h=16, v=40):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g).div(4).requires_grad_()
    bias = torch.randn(v, generator=g).requires_grad_()
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    with torch.no_grad():
        logp = twofold.linear_logprobs(hidden, weight, ids, bias=bias)
    old = logp + 0.2 * torch.randn(b, t, generator=g)
    ref = logp + 0.2 * torch.randn(b, t, generator=g)
    return hidden, weight, bias, ids, mask, old, ref, torch.randn(b, generator=g), g


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_grpo_module_equals_trls_formula_with_bias_and_kl(loss_type, per_token_adv):
    hidden, weight, bias, ids, mask, old, ref, adv, g = module_inputs()
    if per_token_adv:
        adv = torch.randn(mask.shape, generator=g)
    module = FusedLinearGRPOLoss(loss_type=loss_type, beta=0.04, epsilon_high=0.28, max_completion_length=6)
    num_items = 17 if loss_type == "dapo" else None
    loss, metrics = module(hidden, weight, ids, mask, adv, bias, ref, old, num_items_in_batch=num_items)
    logp = twofold.linear_logprobs(hidden, weight, ids.masked_fill(mask == 0, -100), bias=bias)
    expected = trl_policy_loss(logp, old, ref, adv, mask, loss_type, 0.04, 0.2, 0.28, 6, num_items)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    for a, b in zip(torch.autograd.grad(loss, (hidden, weight, bias)),
                    torch.autograd.grad(expected, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert {"clip_frac", "kl", "tokens"} <= set(metrics) and int(metrics["tokens"]) == int(mask.sum())


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_module_equals_liger_on_the_same_inputs(loss_type):
    liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is in the dev extra")
    hidden, weight, bias, ids, mask, old, ref, adv, _ = module_inputs(seed=1)
    ref_hidden = hidden.detach() + 0.1
    theirs_module = liger.LigerFusedLinearGRPOLoss(beta=0.04, compiled=False, loss_type=loss_type,
                                                   max_completion_length=6)
    ours_module = FusedLinearGRPOLoss(loss_type=loss_type, beta=0.04, max_completion_length=6)
    for args in [(ref, old), (None, old, ref_hidden, weight.detach(), bias.detach())]:  # ref log-probs or ref head
        theirs, _ = theirs_module(hidden, weight, ids, mask, adv, bias, *args)
        ours, _ = ours_module(hidden, weight, ids, mask, adv, bias, *args)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
        for a, b in zip(torch.autograd.grad(ours, (hidden, weight, bias)),
                        torch.autograd.grad(theirs, (hidden, weight, bias))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_nft_and_rft_modules_equal_their_objectives():
    hidden, weight, bias, ids, mask, old, _, _, _ = module_inputs(seed=2)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1])
    rate = torch.tensor([0.25, 0.25, 0.75, 0.75])  # the whole groups' rates: this call holds part of each
    logp = twofold.linear_logprobs(hidden, weight, ids.masked_fill(mask == 0, -100), bias=bias)
    loss, _ = FusedLinearNFTLoss(eps=0.5)(hidden, weight, ids, mask, None, bias, old_per_token_logps=old,
                                           rewards=rewards, group_ids=groups, correct_rate=rate)
    expected, _ = twofold.nft_loss(logp, old, rewards, groups, mask, eps=0.5, correct_rate=rate, agg="token_mean")
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-7)
    loss, _ = FusedLinearRFTLoss(loss_type="grpo")(hidden, weight, ids, mask, None, bias, old_per_token_logps=old,
                                                   rewards=rewards)
    expected, _ = twofold.rft_loss(logp, rewards, mask, old_logp=old, agg="seq_mean_token_mean", num_seqs=4)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-7)


def test_the_rft_module_takes_nfts_call_as_documented():
    """`FusedLinearRFTLoss()(..., rewards=r, group_ids=g)` (and correct_rate=), the call NFT takes: the same loss as
    without the groups, which RFT does not read; a group_ids of the wrong shape is named."""
    hidden, weight, bias, ids, mask, old, _, _, _ = module_inputs(seed=3)
    rewards, groups, rate = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1]), torch.full((4,), 0.5)
    logp = twofold.linear_logprobs(hidden, weight, ids.masked_fill(mask == 0, -100), bias=bias)
    expected, _ = twofold.rft_loss(logp, rewards, mask, old_logp=old, agg="token_mean")
    module = FusedLinearRFTLoss()
    for extra in (dict(group_ids=groups), dict(group_ids=groups, correct_rate=rate)):
        loss, _ = module(hidden, weight, ids, mask, None, bias, old_per_token_logps=old, rewards=rewards, **extra)
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match=r"group_ids must have the shape of rewards \(4,\), got \(3,\)"):
        module(hidden, weight, ids, mask, None, bias, rewards=rewards, group_ids=groups[:3])


def test_modules_name_what_is_missing_or_wrong():
    hidden, weight, bias, ids, mask, old, _, adv, _ = module_inputs()
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        FusedLinearGRPOLoss()(hidden, weight, ids, mask, adv)
    with pytest.raises(ValueError, match="rewards="):
        FusedLinearNFTLoss()(hidden, weight, ids, mask)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        FusedLinearPolicyLoss(loss_type="cispo")
    with pytest.raises(ValueError, match="max_completion_length"):
        FusedLinearGRPOLoss(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="attention_mask must be"):
        FusedLinearGRPOLoss(beta=0.0)(hidden, weight, ids, mask[:, :3], adv)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("on_policy", [False, True])
def test_fused_pass_equals_logprobs_then_autograd(loss_type, on_policy):
    hidden, weight, bias, ids, mask, old, ref, _, g = module_inputs(seed=3)
    adv = torch.randn(mask.shape, generator=g)  # per token
    old[mask == 0], ref[mask == 0] = float("nan"), float("inf")  # padding may hold anything
    results = []
    for fused in (True, False):
        module = FusedLinearGRPOLoss(loss_type=loss_type, beta=0.04, epsilon_high=0.28, max_completion_length=6,
                                     fused=fused)
        loss, metrics = module(hidden, weight, ids, mask, adv, bias, ref, None if on_policy else old)
        results.append((loss, torch.autograd.grad(loss, (hidden, weight, bias)), metrics))
    (fused_loss, fused_grads, fused_metrics), (loss, grads, metrics) = results
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=1e-7)
    for a, b in zip(fused_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert fused_metrics.keys() == metrics.keys()
    torch.testing.assert_close(fused_metrics["clip_frac"], metrics["clip_frac"])
