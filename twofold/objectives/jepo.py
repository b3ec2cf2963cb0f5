"""JEPO: Jensen's Evidence lower bound Policy Optimization (arXiv 2503.19618, App. B.2; docs/objectives.md §7.4).

Each sequence i of group q is one sampled CoT c_i followed by the teacher-forced answer a* (one forward gives
both). l*_i = SUM of the answer tokens' log-probs (no 1/|a*|). With n_q valid samples in the group:

    multi-sample:  bound_q = LSE_i(l*_i) - log n_q,  A_i = bound_q - (LSE_{j!=i}(l*_j) - log(n_q - 1))
    single-sample: bound_q = mean_i l*_i,            A_i = l*_i - mean_{j!=i} l*_j
    A~_i = clip(A_i / std(A), -1, 1)
    format penalty (App. B.2, "the normalised advantage of the formatting penalty"): r_i = -p for a sample
    with bad format, else 0; A^ref_i = r_i - mean_{j!=i} r_j over the whole group,
    A~^ref_i = clip(A^ref_i / std(A^ref), -1, 1)
    L = (1/Q) sum_q [ -(1/G_q) sum_i sg[A~_i + A~^ref_i] sum_{t in c_i} l_t - beta_sup bound_q
                      + (beta/G_q) sum_i sum_{t in c_i} KL_t ]

G_q = group size (all samples), Q = number of groups (override: num_prompts). Token-local after a no-grad
pre-pass: CoT tokens g = -(A~_i + A~^ref_i)/G_q (+ KL), answer tokens g = -beta_sup softmax_q(l*)_i (single:
-beta_sup/n_q). Choices where the paper is silent (docs/objectives.md §7.4): std(A) is the population std over the
valid sequences of the whole mini-batch, std(A^ref) over all its sequences (A~ = 0 where a std is 0); samples
with valid=False (bad format) leave the bound and the baselines, and their CoT gets only A~^ref.

Split invariance: the two stds are mini-batch statistics. `jepo_statistics` gives their additive moments
(count, sum, sum of squares) for any part of the batch; the engine sums them over micro-batches and ranks in a
no-grad pre-pass and passes the totals as `adv_moments` / `format_moments` (like num_prompts), so every
micro-batch loss is its exact share. Without them the moments of this call are used. Leave-one-out needs
n_q >= 2. Groups are matched by an [S,S] comparison (S = sequences in the call: small).
"""
from __future__ import annotations

import torch
from torch import Tensor

from twofold.objectives.aggregate import normaliser
from twofold.objectives.layout import as_mask, entropy_inputs, flatten, masked_mean, per_seq, pg_weight, with_grad
from twofold.objectives.spec import ObjectiveSpec
from twofold.objectives.token_local import check_kl_loss, jepo_token, with_entropy_bonus


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


def format_advantages(format_rewards: Tensor, group_ids: Tensor) -> Tensor:
    """[S] leave-one-out advantage of the format reward over each whole group (0 for a group of one)."""
    same = group_ids[:, None] == group_ids[None, :]
    n = same.sum(1).to(format_rewards.dtype)
    others = torch.where(same, format_rewards[None, :], 0.0).sum(1) - format_rewards
    return torch.where(n > 1, format_rewards - others / (n - 1).clamp(min=1), 0.0)


def _inputs(logp, cot_mask, answer_mask, group_ids, valid, format_rewards, seq_index, ref_logp, validate,
            is_weight=None):
    cot = as_mask("cot_mask", cot_mask, logp.shape, validate)
    answer = as_mask("answer_mask", answer_mask, logp.shape, validate)
    if validate and bool((cot & answer).any()):
        raise ValueError("cot_mask and answer_mask must not overlap")
    flat, x = flatten(logp, cot | answer, seq_index, group_ids.shape[0], validate, ref_logp=ref_logp,
                      is_weight=is_weight)
    ids = per_seq("group_ids", group_ids, flat, validate)
    present = flat.lengths(logp.dtype) > 0  # a packing placeholder has no tokens and counts nowhere
    ok = present if valid is None else present & per_seq("valid", valid, flat, validate).bool()
    fmt = (torch.zeros(flat.size, dtype=logp.dtype, device=logp.device) if format_rewards is None
           else per_seq("format_rewards", format_rewards, flat, validate, logp.dtype))
    return flat, x, cot.reshape(-1), answer.reshape(-1), ids, present, ok, fmt


def jepo_statistics(logp: Tensor, cot_mask: Tensor, answer_mask: Tensor, group_ids: Tensor, *,
                    multi_sample: bool = True, valid: Tensor | None = None, format_rewards: Tensor | None = None,
                    seq_index: Tensor | None = None, validate: bool = True) -> dict[str, Tensor]:
    """Additive float64 moments [count, sum, sum of squares] of A (valid sequences) and A^ref (all sequences) of
    this part of a mini-batch (whole groups). Sum them over the parts and pass them to `jepo_loss`. No grad."""
    flat, x, _, answer, ids, present, ok, fmt = _inputs(logp.detach(), cot_mask, answer_mask, group_ids, valid,
                                                        format_rewards, seq_index, None, validate)
    l_star = flat.seq_sum(torch.where(answer, x["logp"], 0.0))
    _, adv, _ = jepo_group_terms(l_star, ids, ok, multi_sample)
    return {"adv_moments": _moments(adv, ok), "format_moments": _moments(format_advantages(fmt, ids), present)}


def jepo_loss(logp: Tensor, cot_mask: Tensor, answer_mask: Tensor, group_ids: Tensor, *,
              ref_logp: Tensor | None = None, beta: float = 1e-3, beta_sup: float = 1.0, multi_sample: bool = True,
              valid: Tensor | None = None, format_rewards: Tensor | None = None, kl: str = "k3",
              seq_index: Tensor | None = None, num_prompts: float | Tensor | None = None,
              adv_moments: Tensor | None = None, format_moments: Tensor | None = None,
              entropy: Tensor | None = None, entropy_coef: float = 0.0, is_weight: Tensor | None = None,
              validate: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """JEPO loss. logp/cot_mask/answer_mask/ref_logp per token; group_ids/valid/format_rewards per sequence
    (format_rewards: -p for a badly formatted sample, 0 otherwise); adv_moments/format_moments: the mini-batch's
    `jepo_statistics` (default: this call's)."""
    if ref_logp is not None:
        check_kl_loss(kl)
    flat, x, cot, answer, ids, present, ok, fmt = _inputs(logp, cot_mask, answer_mask, group_ids, valid,
                                                          format_rewards, seq_index, ref_logp, validate, is_weight)
    l_star = flat.seq_sum(torch.where(answer, x["logp"].detach(), 0.0))
    bound, adv, d_bound = jepo_group_terms(l_star, ids, ok, multi_sample)
    if validate and bool((ok & (_valid_count(ids, ok) < 2)).any()):
        raise ValueError("group_ids: JEPO's leave-one-out baseline needs >= 2 valid samples per group")
    fmt_adv = format_advantages(fmt, ids)
    adv_moments = _moments(adv, ok) if adv_moments is None else adv_moments
    format_moments = _moments(fmt_adv, present) if format_moments is None else format_moments
    adv_tilde = _normalised(adv, ok, adv_moments) + _normalised(fmt_adv, present, format_moments)
    group_size = (ids[:, None] == ids[None, :]).sum(1).to(logp.dtype)
    prompts = normaliser(num_prompts, torch.where(present, 1 / group_size, 0.0).sum(), "num_prompts")
    answer_coef = beta_sup * torch.where(ok, d_bound, 0.0)
    weight = flat.mask.to(logp.dtype) / prompts
    cot_weight = torch.where(cot, flat.gather(1 / group_size), 0.0) * weight  # mean over samples and prompts
    bonus = entropy_inputs(flat, logp, entropy, entropy_coef, cot_weight, validate)
    token = with_entropy_bonus(jepo_token) if bonus else jepo_token
    with torch.no_grad():
        coef = torch.where(cot, flat.gather(adv_tilde / group_size), flat.gather(answer_coef) * answer)
        kl_coef = torch.where(cot, flat.gather(beta / group_size), 0.0)
        out = token(x["logp"].detach(), weight=weight, coef=coef, ref_logp=x["ref_logp"], kl_coef=kl_coef, kl=kl,
                    is_weight=pg_weight(x),
                    **{k: v.detach() for k, v in bonus.items()})
    # answer tokens: the surrogate -sum_i coef_i l*_i carries the bound's gradient; report the bound's value
    answer_surrogate = -(answer_coef * l_star).sum() / prompts
    mean_bound = torch.where(ok, bound / _valid_count(ids, ok), 0.0).sum() / prompts
    value = out[0].sum() - answer_surrogate - beta_sup * mean_bound
    metrics = {"bound": mean_bound,
               "adv_abs": masked_mean(flat.gather(adv_tilde.abs()), flat), "valid_frac": _frac(ok, present),
               "tokens": flat.mask.sum()}
    return with_grad(x["logp"], value, out[1], bonus.get("entropy"), out[2] if bonus else None), metrics


def _frac(ok: Tensor, present: Tensor) -> Tensor:
    return ok.sum().to(torch.float64) / present.sum().clamp(min=1)


def _valid_count(ids: Tensor, ok: Tensor) -> Tensor:
    """[S] number of valid samples in each sequence's group."""
    return ((ids[:, None] == ids[None, :]) & ok[None, :]).sum(1).clamp(min=1)


def _moments(x: Tensor, keep: Tensor) -> Tensor:
    """float64 [count, sum, sum of squares] of x where keep."""
    x = torch.where(keep, x.detach().double(), 0.0)
    return torch.stack([keep.sum().double(), x.sum(), (x * x).sum()])


def _normalised(adv: Tensor, keep: Tensor, moments: Tensor) -> Tensor:
    """clip(A / std, -1, 1) where keep, with the population std of the moments; 0 elsewhere or where std == 0."""
    count, total, squares = moments.to(torch.float64).unbind()
    mean, mean_square = total / count.clamp(min=1), squares / count.clamp(min=1)
    variance = mean_square - mean * mean
    # equal values give mean_square == mean^2 up to rounding: call a variance at that level 0, not noise to divide by
    variance = torch.where(variance > 64 * torch.finfo(torch.float64).eps * mean_square, variance, 0.0)
    std = variance.sqrt().to(adv.dtype)
    scaled = torch.where(keep & (std > 0), adv / std.clamp(min=torch.finfo(adv.dtype).tiny), 0.0)
    return scaled.clamp(-1, 1)


# per-group bound and leave-one-out baselines: whole groups per call, the advantage moments summed over the batch
JEPO = ObjectiveSpec(name="jepo", loss=jepo_loss, modes=("online",), token_local=False, sequences="gold_answer",
                     group_filter="none", min_group_size=2, packing_unit="group", statistics=jepo_statistics,
                     needs=("reference",), reads=("rollout.format_penalty",))
