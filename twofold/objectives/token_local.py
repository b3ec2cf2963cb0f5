"""Token-local form of every objective: the per-token loss and dL/dlogp as pure elementwise functions.

Contract (what a fused kernel applies in its epilogue, and what every `*_loss` here runs, through
`layout.with_grad`; there is no second copy of the math):

    loss_t, grad_t = TOKEN_LOCAL[name](logp, weight=w, **inputs)

- Every tensor argument is [N] (one entry per token) or a Python float/0-d tensor that broadcasts; no reductions,
  no grad, no cross-token dependence. Hyperparameters are Python floats.
- `weight` is the aggregation weight w_t from `aggregate.token_weights` (0 on tokens that do not count, and any
  data-parallel factor folded in). Then  total loss = sum_t loss_t  and  dL/dlogp_t = grad_t  exactly.
- Per-sequence constants (advantages, r_hat, prompt weights, correctness) are gathered to tokens beforehand:
  x_tok = x_seq[seq_index].
- The kernel's logits gradient is then grad_t * (onehot(y_t) - softmax(z_t)) / temperature (OBJECTIVES.md 8).

Which need a pre-pass: JEPO needs the per-group no-grad l*_i = sum of the answer tokens' log-probs first
(its coefficients come from softmax(l*) and leave-one-out baselines; see jepo.py). DPO and SimPO are NOT token-local:
they need the sequence sums S_i of the current policy first. Their two-phase path is `SEQUENCE_LEVEL` in pairs.py:
phase 1 computes S_i (forward only), phase 2 turns them into dL/dS_i and applies `linear_token` with
coef = dL/dS_i (SimPO: dL/dS_i already includes its 1/|y_i|) on every token of sequence i.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_token(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> tuple[Tensor, Tensor]:
    """KL estimator value and its derivative w.r.t. logp (verl kl_penalty; no clamping, as in OREAL).

    k1 = l - l_ref; k2 = (l - l_ref)^2 / 2; k3 = e^D - D - 1 with D = l_ref - l (>= 0, grad 1 - e^D).
    """
    d = ref_logp - logp
    if kind == "k1":
        return -d, torch.ones_like(d)
    if kind == "k2":
        return 0.5 * d * d, -d
    if kind == "k3":
        return torch.expm1(d) - d, -torch.expm1(d)
    raise ValueError(f"kl must be one of {KL_ESTIMATORS}, got {kind!r}")


def linear_token(logp: Tensor, weight: Tensor, coef: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """loss = w * coef * l: SFT (coef -1), REDI, JEPO, and phase 2 of DPO/SimPO (coef = dL/dS_i)."""
    c = weight * coef
    return c * logp, c.expand_as(logp) if isinstance(c, Tensor) else torch.full_like(logp, c)


def sft_token(logp: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """-w * l, grad -w."""
    return linear_token(logp, weight, -1.0)


def ppo_clip_token(logp: Tensor, weight: Tensor, old_logp: Tensor, adv: Tensor, eps_low: float = 0.2,
                   eps_high: float = 0.2, ref_logp: Tensor | None = None, beta: float = 0.0, kl: str = "k3",
                   max_log_ratio: float = 20.0) -> tuple[Tensor, Tensor]:
    """-min(R A, clip(R, 1-eps_low, 1+eps_high) A) [+ beta * KL]: GRPO, DAPO, Dr. GRPO (they differ in
    advantages, eps and aggregation weight). g = -A R where the unclipped branch is active, else 0.

    The log ratio is clamped to +-max_log_ratio (verl: 20); outside it the gradient is 0, as for a clamp.
    At an exact tie torch.maximum would split the gradient; here the clipped branch wins (g = 0).
    """
    raw = logp - old_logp
    ratio = torch.exp(raw.clamp(-max_log_ratio, max_log_ratio))
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))
    active = torch.where(adv > 0, ratio < 1 + eps_high, ratio > 1 - eps_low) & (raw.abs() <= max_log_ratio)
    grad = torch.where(active, -adv * ratio, torch.zeros_like(ratio))
    if ref_logp is not None and beta != 0:
        kl_value, kl_grad = kl_token(logp, ref_logp, kl)
        loss, grad = loss + beta * kl_value, grad + beta * kl_grad
    return weight * loss, weight * grad


def nft_token(logp: Tensor, weight: Tensor, old_logp: Tensor, correct: Tensor, r_hat: Tensor,
              prompt_weight: Tensor, eps: float = 1.0, neg_weight: float = 1.0,
              max_log_ratio: float = 10.0) -> tuple[Tensor, Tensor]:
    """NFT eq. 10 per token, times the prompt weight omega(q):

    positive: -log R                                      g = -1
    negative: -log max_v((1 - r_hat R)/(1 - r_hat), eps)  g = r_hat R / max(1 - r_hat R, eps (1 - r_hat))
    max_v clips the value at eps and passes the gradient of its argument straight through
    (NFT clamp_preserve_grad). The log ratio is clamped above at max_log_ratio (NFT code: 10); beyond it g = 0.
    `correct` is 1 for positives, 0 for negatives; negatives are scaled by neg_weight (0 gives RFT).
    """
    raw = logp - old_logp
    log_ratio = raw.clamp(max=max_log_ratio)
    live = (raw <= max_log_ratio).to(logp.dtype)
    ratio = torch.exp(log_ratio)
    one_minus = 1 - r_hat
    proxy = torch.maximum((1 - r_hat * ratio) / one_minus, torch.full_like(ratio, eps))
    neg_loss = -torch.log(proxy)
    neg_grad = live * r_hat * ratio / (one_minus * proxy)
    positive = correct > 0
    loss = torch.where(positive, -log_ratio, neg_weight * neg_loss)
    grad = torch.where(positive, -live, neg_weight * neg_grad)
    scale = weight * prompt_weight
    return scale * loss, scale * grad


def oreal_token(logp: Tensor, weight: Tensor, correct: Tensor, adv: Tensor, omega_pos: Tensor | float,
                omega_neg: Tensor | float, pos_scale: Tensor | float, neg_scale: Tensor | float,
                ref_logp: Tensor | None = None, kl_scale: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
    """OREAL released-code loss per token (weight: 0/1 token mask, times any data-parallel factor).

    positive: -pos_scale A w+ l      (pos_scale = c+/N+, A = A+ or 1)    g = -pos_scale A w+
    negative: -neg_scale A w- R, R = exp(l - sg[l]) == 1                  g = -neg_scale A w-
    all:      kl_scale * k3(l_ref - l)  (kl_scale = beta/N)                g = kl_scale (1 - e^D)
    """
    positive = correct > 0
    pos_coef = -pos_scale * adv * omega_pos
    neg_coef = -neg_scale * adv * omega_neg
    loss = torch.where(positive, pos_coef * logp, neg_coef * torch.ones_like(logp))
    grad = torch.where(positive, pos_coef * torch.ones_like(logp), neg_coef * torch.ones_like(logp))
    if ref_logp is not None:
        kl_value, kl_grad = kl_token(logp, ref_logp, "k3")
        loss, grad = loss + kl_scale * kl_value, grad + kl_scale * kl_grad
    return weight * loss, weight * grad


def redi_token(logp: Tensor, weight: Tensor, chosen: Tensor, alpha: float = 0.8) -> tuple[Tensor, Tensor]:
    """REDI: -l on chosen, +alpha l on rejected; weight = 1/(num_pairs |y_i|). Constant g (invariant 22)."""
    return linear_token(logp, weight, torch.where(chosen > 0, -torch.ones_like(logp), torch.full_like(logp, alpha)))


def jepo_token(logp: Tensor, weight: Tensor, coef: Tensor, ref_logp: Tensor | None = None,
               kl_coef: Tensor | float = 0.0, kl: str = "k3") -> tuple[Tensor, Tensor]:
    """JEPO after its no-grad pre-pass: -coef * l + kl_coef * KL.

    coef = A~_i / n on CoT tokens, beta_sup * softmax_i(l*) (single-sample: beta_sup / n) on answer tokens;
    kl_coef = beta / n on CoT tokens (0 elsewhere). weight = 1 / num_prompts.
    """
    loss, grad = linear_token(logp, weight, -coef)
    if ref_logp is not None:
        kl_value, kl_grad = kl_token(logp, ref_logp, kl)
        loss, grad = loss + weight * kl_coef * kl_value, grad + weight * kl_coef * kl_grad
    return loss, grad


TOKEN_LOCAL = {
    "sft": sft_token,
    "rft": partial(nft_token, neg_weight=0.0, r_hat=0.0, prompt_weight=1.0),
    "grpo": ppo_clip_token,
    "dapo": partial(ppo_clip_token, eps_low=0.2, eps_high=0.28),
    "drgrpo": ppo_clip_token,
    "nft": nft_token,
    "oreal": oreal_token,
    "redi": redi_token,
    "jepo": jepo_token,
    "linear": linear_token,
}
