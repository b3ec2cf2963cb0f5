"""NFT: Negative-aware Fine-Tuning (arXiv 2505.18116, NVlabs/NFT; docs/objectives.md §7.1).

    L = sum_q omega(q) sum_i sum_t m * l_t,   l_t = -r_i log R - (1 - r_i) log max_v((1 - r_hat R)/(1 - r_hat), eps)

with R = exp(l - l_old) per token, r_hat the group's correctness rate (clamped to [0.02, 0.98] as in the code) and
omega(q) = 1, 1 - r_hat (default) or sqrt((1 - r_hat)/r_hat) (GRPO-equivalent at R = 1). Aggregation defaults to
the released code's sum / 1000 per micro-batch ("sum_const"); the paper's token-mean is agg="token_mean".
"""
from __future__ import annotations

import torch
from torch import Tensor

from twofold.objectives.aggregate import token_weights
from twofold.objectives.groups import r_hat
from twofold.objectives.layout import (apply_token_local, binary, entropy_inputs, flatten, masked_mean, per_seq,
                                      pg_weight)
from twofold.objectives.spec import ObjectiveSpec
from twofold.objectives.token_local import nft_token

PROMPT_WEIGHTS = {
    "1": lambda rate: torch.ones_like(rate),
    "1-r": lambda rate: 1 - rate,
    "sqrt": lambda rate: ((1 - rate) / rate).sqrt(),
}


def nft_loss(logp: Tensor, old_logp: Tensor | None, rewards: Tensor, group_ids: Tensor, mask: Tensor,
             eps: float = 1.0, prompt_weight: str = "1-r", *, neg_weight: float = 1.0,
             correct_rate: Tensor | None = None, rate_bounds: tuple[float, float] | None = (0.02, 0.98),
             seq_index: Tensor | None = None, agg: str = "sum_const", constant: float | None = 1000.0,
             num_tokens: float | Tensor | None = None, num_seqs: float | Tensor | None = None,
             max_log_ratio: float = 10.0, entropy: Tensor | None = None, entropy_coef: float = 0.0,
             is_weight: Tensor | None = None, validate: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """NFT loss. rewards/group_ids are per sequence; old_logp=None means on-policy (R = 1).

    correct_rate: per-sequence r_hat of the *whole* group; pass it when a micro-batch holds part of a group
    (default: computed from rewards and group_ids of this call). rate_bounds=None disables the code's clamp.
    """
    if prompt_weight not in PROMPT_WEIGHTS:
        raise ValueError(f"prompt_weight must be one of {tuple(PROMPT_WEIGHTS)}, got {prompt_weight!r}")
    if not eps > 0:
        raise ValueError(f"eps must be positive (it bounds the negative gradient), got {eps!r}")
    flat, x = flatten(logp, mask, seq_index, rewards.shape[0], validate, old_logp=old_logp, is_weight=is_weight)
    correct = binary("rewards", per_seq("rewards", rewards, flat, validate), logp.dtype, validate)
    per_seq("group_ids", group_ids, flat, validate)
    rate = r_hat(correct, group_ids) if correct_rate is None else correct_rate
    rate = per_seq("correct_rate", rate, flat, validate, logp.dtype)
    if rate_bounds is not None:
        rate = rate.clamp(*rate_bounds)
    omega = PROMPT_WEIGHTS[prompt_weight](rate)
    if validate and not bool(torch.isfinite(omega).all()):
        raise ValueError("correct_rate: prompt_weight='sqrt' needs r_hat > 0 (keep rate_bounds or filter groups)")
    old = x["logp"].detach() if old_logp is None else x["old_logp"]
    w = token_weights(flat, agg, logp.dtype, constant=constant, num_tokens=num_tokens, num_seqs=num_seqs)
    correct_t, rate_t = flat.gather(correct), flat.gather(rate)
    loss, _ = apply_token_local(x["logp"], nft_token, weight=w, old_logp=old, correct=correct_t, r_hat=rate_t,
                                prompt_weight=flat.gather(omega), eps=eps, neg_weight=neg_weight,
                                max_log_ratio=max_log_ratio, is_weight=pg_weight(x),
                                **entropy_inputs(flat, logp, entropy, entropy_coef, w, validate))
    ratio = (x["logp"].detach() - old).clamp(max=max_log_ratio).exp()
    negative = flat.mask & (correct_t == 0)
    proxy_clipped = negative & ((1 - rate_t * ratio) / (1 - rate_t) < eps)
    # the loss is 0 at R = 1 whatever the policy does; these curves move: the positive samples' NLL falls, the
    # negative ones' rises as the implicit negative policy takes their probability away (docs/objectives.md §7.1)
    nll = -x["logp"].detach()
    positive = flat.mask & (correct_t > 0)
    return loss, {"pos_nll": masked_mean(nll, flat, positive), "neg_nll": masked_mean(nll, flat, negative),
                  "r_hat": rate.mean(), "positive_frac": masked_mean(correct_t, flat),
                  "ratio_mean": masked_mean(ratio, flat),
                  "neg_clip_frac": masked_mean(proxy_clipped.to(logp.dtype), flat), "tokens": flat.mask.sum()}


NFT = ObjectiveSpec(name="nft", loss=nft_loss, modes=("online",), token_local=True, sequences="rewards")
