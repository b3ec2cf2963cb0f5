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
- `is_weight` (online objectives): a rollout correction's importance weight w_t (engine.correction). It multiplies
  the policy-gradient term only; the KL term and the entropy bonus are not weighted (as in verl, TRL, OpenRLHF).
- The kernel's logits gradient is then grad_t * (onehot(y_t) - softmax(z_t)) / temperature (docs/objectives.md §8).
- Entropy: a function marked `uses_entropy` (`with_entropy_bonus(fn)`, what `entropy_coef` adds to every online
  objective) also takes the per-token entropy H_t and returns (loss_t, grad_t, dL/dH_t); the kernel adds
  -softmax(z_t) * (log softmax(z_t) + H_t) * dL/dH_t / temperature to the logits gradient.

Which need a pre-pass: GSPO needs each sequence's mean log-ratio log s_i (no grad) first, then it is token-local
(`gspo_token`, the GSPO-token form). JEPO needs the per-group no-grad l*_i = sum of the answer tokens' log-probs first
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
# Estimators usable as a loss term. k1 = l - l_ref has the constant per-token gradient 1, so as a loss its gradient
# is sum_t grad log pi(y_t), whose expectation under the sampling policy is 0: it regularises nothing and only adds
# noise. It stays available as a metric (and as a reward penalty, where it is correct); as a loss it is an error.
KL_LOSSES = ("k2", "k3")


def kl_token(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> tuple[Tensor, Tensor]:
    """KL estimator value and its derivative w.r.t. logp (verl kl_penalty; no clamping, as in OREAL).

    k1 = l - l_ref; k2 = (l - l_ref)^2 / 2; k3 = e^D - D - 1 with D = l_ref - l (>= 0, grad 1 - e^D).
    In expectation over y ~ pi, the k2 gradient (l - l_ref) grad l is grad KL(pi || ref) and the k3 gradient
    (1 - ref/pi) grad l is grad KL(ref || pi); the k1 gradient is 0 (see KL_LOSSES).
    """
    d = ref_logp - logp
    if kind == "k1":
        return -d, torch.ones_like(d)
    if kind == "k2":
        return 0.5 * d * d, -d
    if kind == "k3":
        return torch.expm1(d) - d, -torch.expm1(d)
    raise ValueError(f"kl must be one of {KL_ESTIMATORS}, got {kind!r}")


def check_kl_loss(kind: str) -> None:
    """Reject an estimator that cannot be a loss term (k1: zero expected gradient) or is unknown."""
    if kind == "k1":
        raise ValueError("kl='k1' cannot be a loss term: its per-token gradient is the constant 1, so its expected "
                         "gradient E[grad log pi] is 0 (no regularisation, only noise); use kl='k3' (gradient of "
                         "KL(ref || pi)) or kl='k2' (gradient of KL(pi || ref))")
    if kind not in KL_LOSSES:
        raise ValueError(f"kl must be one of {KL_LOSSES}, got {kind!r}")


def linear_token(logp: Tensor, weight: Tensor, coef: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """loss = w * coef * l: SFT (coef -1), REDI, JEPO, and phase 2 of DPO/SimPO (coef = dL/dS_i)."""
    c = weight * coef
    return c * logp, c.expand_as(logp) if isinstance(c, Tensor) else torch.full_like(logp, c)


def sft_token(logp: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """-w * l, grad -w."""
    return linear_token(logp, weight, -1.0)


def clip_surrogate(log_ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float,
                   max_log_ratio: float) -> tuple[Tensor, Tensor]:
    """-min(R A, clip(R, 1-eps_low, 1+eps_high) A) with R = exp(log_ratio), and its derivative w.r.t. log R
    (g = -A R where the unclipped branch is active, else 0).

    The log ratio is clamped to +-max_log_ratio (verl: 20); outside it the gradient is 0, as for a clamp.
    At an exact tie torch.maximum would split the gradient; here the clipped branch wins (g = 0).
    """
    ratio = torch.exp(log_ratio.clamp(-max_log_ratio, max_log_ratio))
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))
    active = torch.where(adv > 0, ratio < 1 + eps_high, ratio > 1 - eps_low) & (log_ratio.abs() <= max_log_ratio)
    return loss, torch.where(active, -adv * ratio, torch.zeros_like(ratio))


def with_kl(loss: Tensor, grad: Tensor, logp: Tensor, ref_logp: Tensor | None, beta: float | Tensor,
            kl: str) -> tuple[Tensor, Tensor]:
    """loss + beta * KL_t and its gradient (nothing without a reference or with beta = 0)."""
    if ref_logp is None or (not isinstance(beta, Tensor) and beta == 0):
        return loss, grad
    kl_value, kl_grad = kl_token(logp, ref_logp, kl)
    return loss + beta * kl_value, grad + beta * kl_grad


def ppo_clip_token(logp: Tensor, weight: Tensor, old_logp: Tensor, adv: Tensor, eps_low: float = 0.2,
                   eps_high: float = 0.2, ref_logp: Tensor | None = None, beta: float = 0.0, kl: str = "k3",
                   max_log_ratio: float = 20.0, is_weight: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """-is_weight min(R A, clip(R, 1-eps_low, 1+eps_high) A) [+ beta * KL], R = exp(l - l_old): GRPO, DAPO,
    Dr. GRPO (they differ in advantages, eps and aggregation weight). g = -A R where the unclipped branch is
    active, else 0 (times is_weight)."""
    loss, grad = clip_surrogate(logp - old_logp, adv, eps_low, eps_high, max_log_ratio)
    loss, grad = with_kl(is_weight * loss, is_weight * grad, logp, ref_logp, beta, kl)
    return weight * loss, weight * grad


def gspo_token(logp: Tensor, weight: Tensor, seq_log_ratio: Tensor, adv: Tensor, eps_low: float = 3e-4,
               eps_high: float = 4e-4, ref_logp: Tensor | None = None, beta: float = 0.0, kl: str = "k3",
               max_log_ratio: float = 20.0, is_weight: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """GSPO-token (arXiv 2507.18071, its token-level variant) after its no-grad pre-pass, which gives every
    token its sequence's log s_i = (1/|y_i|) sum_t (l_t - l_old_t).

    loss_t = w_t * -min(s_i A_i, clip(s_i) A_i): with w_t = 1/(G |y_i|) the tokens of sequence i add up to
    GSPO's per-sequence term / G. d s_i / d l_t = s_i / |y_i|, so g_t = (1/G) (d term_i / d s_i) s_i / |y_i|
    = w_t * (-A_i s_i) where the unclipped branch is active: the clipped surrogate with the sequence ratio.
    """
    loss, grad = clip_surrogate(seq_log_ratio, adv, eps_low, eps_high, max_log_ratio)
    loss, grad = with_kl(is_weight * loss, is_weight * grad, logp, ref_logp, beta, kl)
    return weight * loss, weight * grad


def cispo_token(logp: Tensor, weight: Tensor, old_logp: Tensor, adv: Tensor, eps_low: float = 1.0,
                eps_high: float = 4.0, max_log_ratio: float = 20.0,
                is_weight: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """CISPO (MiniMax-M1, arXiv 2506.13585 eq. 4): -sg[clip(R, 1-eps_low, 1+eps_high)] A l; g = -clip(R) A.

    Unlike PPO's clip no token loses its gradient: the clipped, stop-gradient IS weight only scales it.
    eps_low = 1 is the paper's "no lower bound" (R >= 0 anyway).
    """
    ratio = torch.exp((logp - old_logp).clamp(-max_log_ratio, max_log_ratio))
    coef = -is_weight * adv * ratio.clamp(1 - eps_low, 1 + eps_high)
    return weight * coef * logp, weight * coef


def with_entropy_bonus(fn):
    """The token-local function `fn` plus an entropy bonus: (logp, entropy, entropy_weight, **inputs) ->
    (loss_t - entropy_weight * H_t, dL/dlogp_t, dL/dH_t = -entropy_weight).

    entropy_weight = entropy_coef * w_t, the objective's own aggregation weight, so the bonus is aggregated like
    the loss (verl entropy_coeff, TRL entropy_coef). H_t is the entropy of the token's next-token distribution, from
    the same LM-head pass; the fused kernel turns dL/dH_t into logits gradients (-p (log p + H) dL/dH).
    """
    def token(logp: Tensor, *, entropy: Tensor, entropy_weight: Tensor | float, **inputs):
        loss, grad = fn(logp, **inputs)
        bonus = entropy_weight * entropy
        return loss - bonus, grad, torch.zeros_like(entropy) - entropy_weight

    token.uses_entropy = True
    return token


def nft_token(logp: Tensor, weight: Tensor, old_logp: Tensor, correct: Tensor, r_hat: Tensor,
              prompt_weight: Tensor, eps: float = 1.0, neg_weight: float = 1.0,
              max_log_ratio: float = 10.0, is_weight: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
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
    scale = weight * prompt_weight * is_weight  # no KL term: is_weight scales all of it
    return scale * loss, scale * grad


def oreal_token(logp: Tensor, weight: Tensor, correct: Tensor, adv: Tensor, omega_pos: Tensor | float,
                omega_neg: Tensor | float, pos_scale: Tensor | float, neg_scale: Tensor | float,
                ref_logp: Tensor | None = None, kl_scale: Tensor | float = 0.0,
                is_weight: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """OREAL released-code loss per token (weight: 0/1 token mask, times any data-parallel factor).

    positive: -pos_scale A w+ l      (pos_scale = c+/N+, A = A+ or 1)    g = -pos_scale A w+
    negative: -neg_scale A w- R, R = exp(l - sg[l]) == 1                  g = -neg_scale A w-
    all:      kl_scale * k3(l_ref - l)  (kl_scale = beta/N)                g = kl_scale (1 - e^D)
    """
    positive = correct > 0
    pos_coef = -is_weight * pos_scale * adv * omega_pos
    neg_coef = -is_weight * neg_scale * adv * omega_neg
    loss = torch.where(positive, pos_coef * logp, neg_coef * torch.ones_like(logp))
    grad = torch.where(positive, pos_coef * torch.ones_like(logp), neg_coef * torch.ones_like(logp))
    loss, grad = with_kl(loss, grad, logp, ref_logp, kl_scale, "k3")
    return weight * loss, weight * grad


def redi_token(logp: Tensor, weight: Tensor, chosen: Tensor, alpha: float = 0.8) -> tuple[Tensor, Tensor]:
    """REDI: -l on chosen, +alpha l on rejected; weight = 1/(num_pairs |y_i|). Constant g (invariant 22)."""
    return linear_token(logp, weight, torch.where(chosen > 0, -torch.ones_like(logp), torch.full_like(logp, alpha)))


def jepo_token(logp: Tensor, weight: Tensor, coef: Tensor, ref_logp: Tensor | None = None,
               kl_coef: Tensor | float = 0.0, kl: str = "k3", is_weight: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """JEPO after its no-grad pre-pass: -is_weight * coef * l + kl_coef * KL (is_weight is 1 on the
    teacher-forced answer tokens, which were not sampled).

    coef = A~_i / n on CoT tokens, beta_sup * softmax_i(l*) (single-sample: beta_sup / n) on answer tokens;
    kl_coef = beta / n on CoT tokens (0 elsewhere). weight = 1 / num_prompts.
    """
    loss, grad = linear_token(logp, weight, -is_weight * coef)
    return with_kl(loss, grad, logp, ref_logp, weight * kl_coef, kl)


TOKEN_LOCAL = {
    "sft": sft_token,
    "rft": partial(nft_token, neg_weight=0.0, r_hat=0.0, prompt_weight=1.0),
    "grpo": ppo_clip_token,
    "dapo": partial(ppo_clip_token, eps_low=0.2, eps_high=0.28),
    "drgrpo": ppo_clip_token,
    "gspo": gspo_token,
    "cispo": cispo_token,
    "nft": nft_token,
    "oreal": oreal_token,
    "redi": redi_token,
    "jepo": jepo_token,
    "linear": linear_token,
}


def token_step(fn, logp, per_token, shared, index, entropy=None):
    """One chunk of a fused pass (both kernel backends call this): the token-local function `fn` on the tokens
    `index`, giving (loss_t, g_t, dL/dH_t or None) in logp's dtype (fp32 or fp64); `per_token` tensors are gathered
    at `index`, `shared` values passed as they are; `entropy` goes to (and only to) a function that uses it."""
    chunk = {k: v.index_select(0, index).to(logp.dtype) if v.is_floating_point() else v.index_select(0, index)
             for k, v in per_token.items()}
    if entropy is None:
        loss, grad = fn(logp, **chunk, **shared)
        return loss, grad.to(logp.dtype), None
    loss, grad, grad_entropy = fn(logp, entropy=entropy, **chunk, **shared)
    return loss, grad.to(logp.dtype), grad_entropy.to(logp.dtype)
