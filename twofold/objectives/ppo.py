"""PPO-clip family (OBJECTIVES.md 3-5): one implementation, three published settings.

    loss_t = -min(R A, clip(R, 1-eps_low, 1+eps_high) A) [+ beta k3],  R = exp(l - l_old)

| loss        | advantages (pass in)                     | eps          | aggregation (default)          | KL       |
|-------------|------------------------------------------|--------------|--------------------------------|----------|
| grpo_loss   | group_advantages(r, ids, "grpo")         | 0.2 / 0.2    | seq_mean_token_mean (paper)    | beta 0.04|
| dapo_loss   | "grpo" advantages of R + overlong reward | 0.2 / 0.28   | token_mean (over the batch)    | none     |
| drgrpo_loss | group_advantages(r, ids, "drgrpo")       | 0.2 / 0.2    | seq_mean_token_sum_norm, 3000  | none     |

Advantages are per sequence ([B] padded, [S] packed), computed once per rollout batch by `group_advantages`.
old_logp=None means strictly on-policy (l_old = sg[l], R = 1), as DeepSeekMath's single update per rollout.
"""
from __future__ import annotations

from torch import Tensor

from twofold.objectives.aggregate import token_weights
from twofold.objectives.layout import apply_token_local, flatten, masked_mean, per_seq
from twofold.objectives.token_local import kl_token, ppo_clip_token


def grpo_loss(logp: Tensor, old_logp: Tensor | None, advantages: Tensor, mask: Tensor, *,
              ref_logp: Tensor | None = None, beta: float = 0.04, kl: str = "k3", eps: float = 0.2,
              seq_index: Tensor | None = None, agg: str = "seq_mean_token_mean", constant: float | None = None,
              num_tokens: float | Tensor | None = None, num_seqs: float | Tensor | None = None,
              max_log_ratio: float = 20.0, validate: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO (DeepSeekMath eq. 3). The KL term needs ref_logp; without it the loss is the beta = 0 form."""
    return ppo_loss(logp, old_logp, advantages, mask, eps_low=eps, eps_high=eps, ref_logp=ref_logp,
                    beta=beta, kl=kl, seq_index=seq_index, agg=agg, constant=constant, num_tokens=num_tokens,
                    num_seqs=num_seqs, max_log_ratio=max_log_ratio, validate=validate)


def dapo_loss(logp: Tensor, old_logp: Tensor | None, advantages: Tensor, mask: Tensor, *, eps_low: float = 0.2,
              eps_high: float = 0.28, seq_index: Tensor | None = None, agg: str = "token_mean",
              constant: float | None = None, num_tokens: float | Tensor | None = None,
              num_seqs: float | Tensor | None = None, max_log_ratio: float = 20.0,
              validate: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """DAPO (eqs. 8-12): clip-higher, token-mean over all tokens of the batch (pass the global num_tokens)."""
    return ppo_loss(logp, old_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high, seq_index=seq_index,
                    agg=agg, constant=constant, num_tokens=num_tokens, num_seqs=num_seqs,
                    max_log_ratio=max_log_ratio, validate=validate)


def drgrpo_loss(logp: Tensor, old_logp: Tensor | None, advantages: Tensor, mask: Tensor, *, eps: float = 0.2,
                seq_index: Tensor | None = None, agg: str = "seq_mean_token_sum_norm",
                constant: float | None = 3000.0, num_tokens: float | Tensor | None = None,
                num_seqs: float | Tensor | None = None, max_log_ratio: float = 20.0,
                validate: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """Dr. GRPO: no std division, sum over tokens / L_max (constant = generate_max_length, oat: 3000)."""
    return ppo_loss(logp, old_logp, advantages, mask, eps_low=eps, eps_high=eps, seq_index=seq_index, agg=agg,
                    constant=constant, num_tokens=num_tokens, num_seqs=num_seqs, max_log_ratio=max_log_ratio,
                    validate=validate)


def ppo_loss(logp: Tensor, old_logp: Tensor | None, advantages: Tensor, mask: Tensor, *, eps_low: float,
             eps_high: float, ref_logp: Tensor | None = None, beta: float = 0.0, kl: str = "k3",
             seq_index: Tensor | None = None, agg: str, constant: float | None, num_tokens, num_seqs,
             max_log_ratio: float, validate: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """The shared body: flatten, weights, token-local math, metrics."""
    flat, x = flatten(logp, mask, seq_index, advantages.shape[0], validate, old_logp=old_logp, ref_logp=ref_logp)
    old = x["logp"].detach() if old_logp is None else x["old_logp"]
    adv = flat.gather(per_seq("advantages", advantages, flat, validate, logp.dtype))
    w = token_weights(flat, agg, logp.dtype, constant=constant, num_tokens=num_tokens, num_seqs=num_seqs)
    loss, _ = apply_token_local(x["logp"], ppo_clip_token, weight=w, old_logp=old, adv=adv, eps_low=eps_low,
                                eps_high=eps_high, ref_logp=x["ref_logp"], beta=beta, kl=kl,
                                max_log_ratio=max_log_ratio)
    ratio = (x["logp"].detach() - old).clamp(-max_log_ratio, max_log_ratio).exp()
    clipped = ((adv > 0) & (ratio >= 1 + eps_high)) | ((adv < 0) & (ratio <= 1 - eps_low))
    metrics = {"clip_frac": masked_mean(clipped.to(logp.dtype), flat), "ratio_mean": masked_mean(ratio, flat),
               "ratio_max": ratio.masked_fill(~flat.mask, 0).max() if ratio.numel() else ratio.sum(),
               "adv_mean": masked_mean(adv, flat), "tokens": flat.mask.sum()}
    if x["ref_logp"] is not None:
        metrics["kl"] = masked_mean(kl_token(x["logp"].detach(), x["ref_logp"], kl)[0], flat)
    return loss, metrics
