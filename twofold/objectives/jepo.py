"""JEPO: Jensen's Evidence lower bound Policy Optimization (arXiv 2503.19618, App. B.2; OBJECTIVES.md 7.4).

Each sequence i of group q is one sampled CoT c_i followed by the teacher-forced answer a* (one forward gives
both). l*_i = SUM of the answer tokens' log-probs (no 1/|a*|). With n_q valid samples in the group:

    multi-sample:  bound_q = LSE_i(l*_i) - log n_q,  A_i = bound_q - (LSE_{j!=i}(l*_j) - log(n_q - 1))
    single-sample: bound_q = mean_i l*_i,            A_i = l*_i - mean_{j!=i} l*_j
    A~_i = clip(A_i / std(A), -1, 1) (+ extra_advantages, e.g. the format-penalty advantage)
    L = (1/Q) sum_q [ -(1/G_q) sum_i sg[A~_i] sum_{t in c_i} l_t - beta_sup bound_q
                      + (beta/G_q) sum_i sum_{t in c_i} KL_t ]

G_q = group size (all samples), Q = number of groups (override: num_prompts). Token-local after a no-grad
pre-pass: CoT tokens g = -A~_i/G_q (+ KL), answer tokens g = -beta_sup softmax_q(l*)_i (single: -beta_sup/n_q).
Choices where the paper is silent (OBJECTIVES.md 10.6): std(A) is the population std over the valid
sequences of this call (A~ = 0 if it is 0); samples with valid=False (bad format) leave the bound and the
baselines, and their CoT gets only extra_advantages. Leave-one-out needs n_q >= 2. Groups are matched by an
[S,S] comparison (S = sequences in the call: small).
"""
from __future__ import annotations

import torch
from torch import Tensor

from twofold.objectives.aggregate import normaliser
from twofold.objectives.layout import as_mask, flatten, masked_mean, per_seq, with_grad
from twofold.objectives.token_local import jepo_token


def jepo_group_terms(l_star: Tensor, group_ids: Tensor, valid: Tensor, multi_sample: bool = True
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Per sequence [S]: (bound of its group, raw leave-one-out advantage A_i, d bound / d l*_i). No grad."""
    same = (group_ids[:, None] == group_ids[None, :]) & valid[None, :] & valid[:, None]
    others = same & ~torch.eye(len(l_star), dtype=torch.bool, device=l_star.device)
    n = same.sum(1).to(l_star.dtype)
    row = torch.where(same, l_star[None, :], -torch.inf)
    if multi_sample:
        lse = torch.logsumexp(row, dim=1)
        bound = lse - n.clamp(min=1).log()
        loo = torch.logsumexp(torch.where(others, l_star[None, :], -torch.inf), dim=1) - (n - 1).clamp(min=1).log()
        return bound, bound - loo, torch.exp(l_star - lse)
    bound = torch.where(same, l_star[None, :], 0.0).sum(1) / n.clamp(min=1)
    loo = torch.where(others, l_star[None, :], 0.0).sum(1) / (n - 1).clamp(min=1)
    return bound, l_star - loo, 1 / n.clamp(min=1)


def jepo_loss(logp: Tensor, cot_mask: Tensor, answer_mask: Tensor, group_ids: Tensor, *,
              ref_logp: Tensor | None = None, beta: float = 1e-3, beta_sup: float = 1.0, multi_sample: bool = True,
              valid: Tensor | None = None, extra_advantages: Tensor | None = None, kl: str = "k3",
              seq_index: Tensor | None = None, num_prompts: float | Tensor | None = None,
              validate: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """JEPO loss. logp/cot_mask/answer_mask/ref_logp per token; group_ids/valid/extra_advantages per sequence."""
    cot = as_mask("cot_mask", cot_mask, logp.shape, validate)
    answer = as_mask("answer_mask", answer_mask, logp.shape, validate)
    if validate and bool((cot & answer).any()):
        raise ValueError("cot_mask and answer_mask must not overlap")
    flat, x = flatten(logp, cot | answer, seq_index, group_ids.shape[0], validate, ref_logp=ref_logp)
    cot, answer = cot.reshape(-1), answer.reshape(-1)
    ids = per_seq("group_ids", group_ids, flat, validate)
    ok = torch.ones_like(ids, dtype=torch.bool) if valid is None else per_seq("valid", valid, flat, validate).bool()
    l_star = flat.seq_sum(torch.where(answer, x["logp"].detach(), 0.0))
    bound, adv, d_bound = jepo_group_terms(l_star, ids, ok, multi_sample)
    if validate and bool((ok & (_valid_count(ids, ok) < 2)).any()):
        raise ValueError("group_ids: JEPO's leave-one-out baseline needs >= 2 valid samples per group")
    adv_tilde = _normalised(adv, ok)
    if extra_advantages is not None:
        adv_tilde = adv_tilde + per_seq("extra_advantages", extra_advantages, flat, validate, logp.dtype)
    group_size = (ids[:, None] == ids[None, :]).sum(1).to(logp.dtype)
    prompts = normaliser(num_prompts, (1 / group_size).sum(), "num_prompts")
    answer_coef = beta_sup * torch.where(ok, d_bound, 0.0)
    with torch.no_grad():
        coef = torch.where(cot, flat.gather(adv_tilde / group_size), flat.gather(answer_coef) * answer)
        kl_coef = torch.where(cot, flat.gather(beta / group_size), 0.0)
        weight = flat.mask.to(logp.dtype) / prompts
        loss_t, grad_t = jepo_token(x["logp"].detach(), weight, coef, x["ref_logp"], kl_coef, kl)
    # answer tokens: the surrogate -sum_i coef_i l*_i carries the bound's gradient; report the bound's value
    answer_surrogate = -(answer_coef * l_star).sum() / prompts
    mean_bound = torch.where(ok, bound / _valid_count(ids, ok), 0.0).sum() / prompts
    value = loss_t.sum() - answer_surrogate - beta_sup * mean_bound
    metrics = {"bound": mean_bound,
               "adv_abs": masked_mean(flat.gather(adv_tilde.abs()), flat), "valid_frac": ok.to(logp.dtype).mean(),
               "tokens": flat.mask.sum()}
    return with_grad(x["logp"], value, grad_t), metrics


def _valid_count(ids: Tensor, ok: Tensor) -> Tensor:
    """[S] number of valid samples in each sequence's group."""
    return ((ids[:, None] == ids[None, :]) & ok[None, :]).sum(1).clamp(min=1)


def _normalised(adv: Tensor, ok: Tensor) -> Tensor:
    """clip(A / std(A), -1, 1) over the valid sequences (population std); 0 where invalid or std == 0."""
    count = ok.sum().clamp(min=1)
    mean = torch.where(ok, adv, 0.0).sum() / count
    std = (torch.where(ok, (adv - mean) ** 2, 0.0).sum() / count).sqrt()
    scaled = torch.where(ok & (std > 0), adv / std.clamp(min=torch.finfo(adv.dtype).tiny), 0.0)
    return scaled.clamp(-1, 1)
