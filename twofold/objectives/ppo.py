"""PPO-clip family (docs/objectives.md §3-5): one implementation, three published settings, and two IS variants.

    loss_t = -min(R A, clip(R, 1-eps_low, 1+eps_high) A) [+ beta k3],  R = exp(l - l_old)

| loss        | advantages (pass in)                     | eps          | aggregation (default)          | KL       |
|-------------|------------------------------------------|--------------|--------------------------------|----------|
| grpo_loss   | group_advantages(r, ids, "grpo")         | 0.2 / 0.2    | seq_mean_token_mean (paper)    | beta 0.04|
| dapo_loss   | "grpo" advantages of R + overlong reward | 0.2 / 0.28   | token_mean (over the batch)    | none     |
| drgrpo_loss | group_advantages(r, ids, "drgrpo")       | 0.2 / 0.2    | seq_mean_token_sum_norm, L_max | none     |
| gspo_loss   | group_advantages(r, ids, "grpo")         | 3e-4 / 4e-4  | seq_mean_token_mean            | none     |
| cispo_loss  | group_advantages(r, ids, "grpo")         | 1.0 / 4.0    | token_mean (over the batch)    | none     |

GSPO replaces R by the sequence ratio s_i = exp(mean_t (l - l_old)) (one per sequence, clipped per sequence);
CISPO keeps every token's gradient and clips the stop-gradient IS weight instead: -sg[clip(R)] A l.
Advantages are per sequence ([B] padded, [S] packed), computed once per rollout batch by `group_advantages`; the
PPO-clip three also take them per token in the padded layout ([B,T], as verl and TRL hold them).
old_logp=None means strictly on-policy (l_old = sg[l], R = 1), as DeepSeekMath's single update per rollout.
entropy_coef > 0 adds -entropy_coef * H_t with the loss's own aggregation weight (needs the per-token `entropy`).
"""
from __future__ import annotations

from torch import Tensor

from twofold.objectives.aggregate import token_weights
from twofold.objectives.layout import (apply_token_local, entropy_inputs, flatten, masked_mean, per_seq,
                                      per_seq_or_token, pg_weight)
from twofold.objectives.spec import ObjectiveSpec
from twofold.objectives.token_local import check_kl_loss, cispo_token, gspo_token, kl_token, ppo_clip_token


def grpo_loss(logp: Tensor, old_logp: Tensor | None, advantages: Tensor, mask: Tensor, *,
              ref_logp: Tensor | None = None, beta: float = 0.04, kl: str = "k3", eps: float = 0.2,
              seq_index: Tensor | None = None, agg: str = "seq_mean_token_mean", constant: float | None = None,
              num_tokens: float | Tensor | None = None, num_seqs: float | Tensor | None = None,
              max_log_ratio: float = 20.0, entropy: Tensor | None = None, entropy_coef: float = 0.0,
              is_weight: Tensor | None = None, validate: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO (DeepSeekMath eq. 3). The KL term needs ref_logp; without it the loss is the beta = 0 form."""
    return ppo_loss(logp, old_logp, advantages, mask, eps_low=eps, eps_high=eps, ref_logp=ref_logp,
                    beta=beta, kl=kl, seq_index=seq_index, agg=agg, constant=constant, num_tokens=num_tokens,
                    num_seqs=num_seqs, max_log_ratio=max_log_ratio, entropy=entropy, entropy_coef=entropy_coef,
                    is_weight=is_weight, validate=validate)


def dapo_loss(logp: Tensor, old_logp: Tensor | None, advantages: Tensor, mask: Tensor, *, eps_low: float = 0.2,
              eps_high: float = 0.28, seq_index: Tensor | None = None, agg: str = "token_mean",
              constant: float | None = None, num_tokens: float | Tensor | None = None,
              num_seqs: float | Tensor | None = None, max_log_ratio: float = 20.0, entropy: Tensor | None = None,
              entropy_coef: float = 0.0, is_weight: Tensor | None = None,
              validate: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """DAPO (eqs. 8-12): clip-higher, token-mean over all tokens of the batch (pass the global num_tokens)."""
    return ppo_loss(logp, old_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high, seq_index=seq_index,
                    agg=agg, constant=constant, num_tokens=num_tokens, num_seqs=num_seqs,
                    max_log_ratio=max_log_ratio, entropy=entropy, entropy_coef=entropy_coef, is_weight=is_weight,
                    validate=validate)


def drgrpo_loss(logp: Tensor, old_logp: Tensor | None, advantages: Tensor, mask: Tensor, *, eps: float = 0.2,
                seq_index: Tensor | None = None, agg: str = "seq_mean_token_sum_norm",
                constant: float | None = None, num_tokens: float | Tensor | None = None,
                num_seqs: float | Tensor | None = None, max_log_ratio: float = 20.0, entropy: Tensor | None = None,
                entropy_coef: float = 0.0, is_weight: Tensor | None = None,
                validate: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """Dr. GRPO: no std division, sum over tokens / L_max. constant = the generation budget (the paper's
    generate_max_length, TRL's max_completion_length); the online engine passes rollout.max_new_tokens."""
    if agg in ("seq_mean_token_sum_norm", "sum_const") and constant is None:
        raise ValueError("drgrpo needs constant = the generation budget (max_new_tokens), the L_max its token sums "
                         "are divided by; the online engine sets it from rollout.max_new_tokens")
    return ppo_loss(logp, old_logp, advantages, mask, eps_low=eps, eps_high=eps, seq_index=seq_index, agg=agg,
                    constant=constant, num_tokens=num_tokens, num_seqs=num_seqs, max_log_ratio=max_log_ratio,
                    entropy=entropy, entropy_coef=entropy_coef, is_weight=is_weight, validate=validate)


def gspo_loss(logp: Tensor, old_logp: Tensor | None, advantages: Tensor, mask: Tensor, *, eps_low: float = 3e-4,
              eps_high: float = 4e-4, seq_index: Tensor | None = None, agg: str = "seq_mean_token_mean",
              constant: float | None = None, num_tokens: float | Tensor | None = None,
              num_seqs: float | Tensor | None = None, max_log_ratio: float = 20.0, entropy: Tensor | None = None,
              entropy_coef: float = 0.0, is_weight: Tensor | None = None,
              validate: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (arXiv 2507.18071, the GSPO objective): the clipped surrogate on the length-normalised sequence ratio
    s_i = exp((1/|y_i|) sum_t (l_t - l_old_t)); clip range 3e-4 / 4e-4 (its section 5.1), mean over sequences.

    With equal-length sequences at ratio 1 its gradient is GRPO's (beta = 0, same aggregation); on-policy
    (old_logp=None) s_i = 1 and it is the plain policy gradient."""
    flat, x = flatten(logp, mask, seq_index, advantages.shape[0], validate, old_logp=old_logp, is_weight=is_weight)
    old = x["logp"].detach() if old_logp is None else x["old_logp"]
    # the pre-pass: one no-grad log s_i per sequence, broadcast to its tokens
    lengths = flat.lengths(logp.dtype).clamp(min=1)
    seq_log_ratio = flat.gather(flat.seq_sum(x["logp"].detach() - old) / lengths)
    adv = flat.gather(per_seq("advantages", advantages, flat, validate, logp.dtype))
    w = token_weights(flat, agg, logp.dtype, constant=constant, num_tokens=num_tokens, num_seqs=num_seqs)
    loss, _ = apply_token_local(x["logp"], gspo_token, weight=w, seq_log_ratio=seq_log_ratio, adv=adv,
                                eps_low=eps_low, eps_high=eps_high, max_log_ratio=max_log_ratio,
                                is_weight=pg_weight(x), **entropy_inputs(flat, logp, entropy, entropy_coef, w, validate))
    return loss, clip_metrics(flat, seq_log_ratio, adv, eps_low, eps_high, max_log_ratio)


def cispo_loss(logp: Tensor, old_logp: Tensor | None, advantages: Tensor, mask: Tensor, *, eps_low: float = 1.0,
               eps_high: float = 4.0, seq_index: Tensor | None = None, agg: str = "token_mean",
               constant: float | None = None, num_tokens: float | Tensor | None = None,
               num_seqs: float | Tensor | None = None, max_log_ratio: float = 20.0, entropy: Tensor | None = None,
               entropy_coef: float = 0.0, is_weight: Tensor | None = None,
               validate: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, arXiv 2506.13585 eq. 4): -(1/sum|o_i|) sum_i sum_t sg[clip(R, 1-eps_low, 1+eps_high)]
    A_i l_t. The paper sets no lower bound (eps_low = 1) and tunes the upper one without publishing it; 4.0
    here is a choice (R <= 5)."""
    flat, x = flatten(logp, mask, seq_index, advantages.shape[0], validate, old_logp=old_logp, is_weight=is_weight)
    old = x["logp"].detach() if old_logp is None else x["old_logp"]
    adv = flat.gather(per_seq("advantages", advantages, flat, validate, logp.dtype))
    w = token_weights(flat, agg, logp.dtype, constant=constant, num_tokens=num_tokens, num_seqs=num_seqs)
    loss, _ = apply_token_local(x["logp"], cispo_token, weight=w, old_logp=old, adv=adv, eps_low=eps_low,
                                eps_high=eps_high, max_log_ratio=max_log_ratio, is_weight=pg_weight(x),
                                **entropy_inputs(flat, logp, entropy, entropy_coef, w, validate))
    ratio = (x["logp"].detach() - old).clamp(-max_log_ratio, max_log_ratio).exp()
    clipped = (ratio > 1 + eps_high) | (ratio < 1 - eps_low)
    return loss, {"clip_frac": masked_mean(clipped.to(logp.dtype), flat), "ratio_mean": masked_mean(ratio, flat),
                  "adv_mean": masked_mean(adv, flat), "tokens": flat.mask.sum()}


def ppo_loss(logp: Tensor, old_logp: Tensor | None, advantages: Tensor, mask: Tensor, *, eps_low: float,
             eps_high: float, ref_logp: Tensor | None = None, beta: float = 0.0, kl: str = "k3",
             seq_index: Tensor | None = None, agg: str, constant: float | None, num_tokens, num_seqs,
             max_log_ratio: float, entropy: Tensor | None = None, entropy_coef: float = 0.0,
             is_weight: Tensor | None = None, validate: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """The shared body: flatten, weights, token-local math, metrics."""
    if ref_logp is not None and beta != 0:
        check_kl_loss(kl)
    flat, x = flatten(logp, mask, seq_index, advantages.shape[0], validate, old_logp=old_logp, ref_logp=ref_logp,
                      is_weight=is_weight)
    old = x["logp"].detach() if old_logp is None else x["old_logp"]
    adv = per_seq_or_token("advantages", advantages, flat, logp, validate)
    w = token_weights(flat, agg, logp.dtype, constant=constant, num_tokens=num_tokens, num_seqs=num_seqs)
    loss, _ = apply_token_local(x["logp"], ppo_clip_token, weight=w, old_logp=old, adv=adv, eps_low=eps_low,
                                eps_high=eps_high, ref_logp=x["ref_logp"], beta=beta, kl=kl,
                                max_log_ratio=max_log_ratio, is_weight=pg_weight(x),
                                **entropy_inputs(flat, logp, entropy, entropy_coef, w, validate))
    metrics = clip_metrics(flat, x["logp"].detach() - old, adv, eps_low, eps_high, max_log_ratio)
    if x["ref_logp"] is not None:
        metrics["kl"] = masked_mean(kl_token(x["logp"].detach(), x["ref_logp"], kl)[0], flat)
    return loss, metrics


def clip_metrics(flat, log_ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float,
                 max_log_ratio: float) -> dict[str, Tensor]:
    """Clip fraction and ratio statistics over the counted tokens (the ratio per token, or per sequence: GSPO)."""
    ratio = log_ratio.clamp(-max_log_ratio, max_log_ratio).exp()
    clipped = ((adv > 0) & (ratio >= 1 + eps_high)) | ((adv < 0) & (ratio <= 1 - eps_low))
    return {"clip_frac": masked_mean(clipped.to(adv.dtype), flat), "ratio_mean": masked_mean(ratio, flat),
            "ratio_max": ratio.masked_fill(~flat.mask, 0).max() if ratio.numel() else ratio.sum(),
            "adv_mean": masked_mean(adv, flat), "tokens": flat.mask.sum()}


GRPO = ObjectiveSpec(name="grpo", loss=grpo_loss, modes=("online",), token_local=True, sequences="advantages",
                     advantage="grpo", needs=("reference",))
DAPO = ObjectiveSpec(name="dapo", loss=dapo_loss, modes=("online",), token_local=True, sequences="advantages",
                     advantage="grpo", overlong_penalty=True, reads=("rollout.overlong_buffer",))
DRGRPO = ObjectiveSpec(name="drgrpo", loss=drgrpo_loss, modes=("online",), token_local=True,
                       sequences="advantages", advantage="drgrpo")
# the sequence ratio couples a sequence's tokens: not one token-local call
GSPO = ObjectiveSpec(name="gspo", loss=gspo_loss, modes=("online",), token_local=False, sequences="advantages",
                     advantage="grpo")
CISPO = ObjectiveSpec(name="cispo", loss=cispo_loss, modes=("online",), token_local=True, sequences="advantages",
                      advantage="grpo")
