"""OREAL (arXiv 2502.06781, InternLM/OREAL; docs/objectives.md §7.2), as in the released code.

    positive s: (c+/N+) A+_s sum_t w+_t (-l_t)        (pos_mult_adv: A+ from RLOO on +-1 rewards, else 1)
    negative s: -(eta/N-) sum_t exp(l_t - sg[l_t]) A-_s w-_t     (value constant, REINFORCE gradient)
    all kept s: (beta/N) sum_t k3(l_ref - l)           (frozen initial policy as reference)

N+, N-, N are token counts of the positives, negatives and all kept sequences (pass global counts when the
batch is split). Advantages: group_advantages(2 * correct - 1, group_ids, "rloo") over all K rollouts of a prompt,
before keeping one positive/negative pair. Token weights from the token reward model's per-token logits w_t:
w_bar_t = prefix mean of w over the response, w+ = clamp(2 sigma(w_bar) - 1, 0, 1),
w- = clamp(1 - 2 sigma(w_bar), 0, 1); without scores both are 1 (the no-token-RM config). The head itself is
`TokenRewardHead`, trained by `token_rm_loss`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twofold.objectives.aggregate import normaliser
from twofold.objectives.layout import (Flat, apply_token_local, binary, entropy_inputs, flatten, masked_mean, per_seq,
                                      pg_weight)
from twofold.objectives.spec import ObjectiveSpec
from twofold.objectives.token_local import kl_token, oreal_token


def oreal_loss(logp: Tensor, rewards: Tensor, advantages: Tensor, mask: Tensor, *,
               ref_logp: Tensor | None = None, token_scores: Tensor | None = None, beta: float = 0.01,
               eta: float = 0.5, pos_factor: float = 1.0, pos_mult_adv: bool = True,
               seq_index: Tensor | None = None, num_pos_tokens: float | Tensor | None = None,
               num_neg_tokens: float | Tensor | None = None, num_tokens: float | Tensor | None = None,
               entropy: Tensor | None = None, entropy_coef: float = 0.0, is_weight: Tensor | None = None,
               validate: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """OREAL policy loss on the kept sequences; rewards/advantages per sequence, token_scores like logp."""
    flat, x = flatten(logp, mask, seq_index, rewards.shape[0], validate, ref_logp=ref_logp,
                      token_scores=token_scores, is_weight=is_weight)
    correct = flat.gather(binary("rewards", per_seq("rewards", rewards, flat, validate), logp.dtype, validate))
    adv = flat.gather(per_seq("advantages", advantages, flat, validate, logp.dtype))
    omega_pos, omega_neg = (1.0, 1.0) if token_scores is None else oreal_token_weights(x["token_scores"], flat)
    counted = flat.mask.to(logp.dtype)
    n_all = normaliser(num_tokens, counted.sum(), "num_tokens")  # the KL term's and the entropy bonus' mean
    n_pos = normaliser(num_pos_tokens, (counted * correct).sum(), "num_pos_tokens")
    n_neg = normaliser(num_neg_tokens, (counted * (1 - correct)).sum(), "num_neg_tokens")
    loss, _ = apply_token_local(x["logp"], oreal_token, weight=counted, correct=correct,
                                adv=adv if pos_mult_adv else torch.where(correct > 0, 1.0, adv),
                                omega_pos=omega_pos, omega_neg=omega_neg, pos_scale=pos_factor / n_pos,
                                neg_scale=eta / n_neg, ref_logp=x["ref_logp"], kl_scale=beta / n_all,
                                is_weight=pg_weight(x),
                                **entropy_inputs(flat, logp, entropy, entropy_coef, counted / n_all, validate))
    metrics = {"positive_frac": masked_mean(correct, flat), "tokens": flat.mask.sum()}
    if token_scores is not None:
        metrics |= {"omega_pos": masked_mean(omega_pos, flat), "omega_neg": masked_mean(omega_neg, flat)}
    if ref_logp is not None:
        metrics["kl"] = masked_mean(kl_token(x["logp"].detach(), x["ref_logp"], "k3")[0], flat)
    return loss, metrics


def oreal_token_weights(scores: Tensor, flat: Flat) -> tuple[Tensor, Tensor]:
    """(w+, w-) [N] from token-RM logits via the prefix mean over each sequence's counted tokens.

    Tokens of one sequence must be contiguous and in order in the flat view (true for padded rows and packing).
    """
    dtype = scores.dtype
    # prefix sums as differences of one running sum over the whole buffer: in float64, so that a sequence's weights
    # do not depend (in float32 rounding) on where packing put it
    scores = torch.where(flat.mask, scores.detach(), torch.zeros((), dtype=dtype, device=scores.device)).double()
    counted = flat.mask.double()
    total, count = scores.cumsum(0), counted.cumsum(0)
    positions = torch.arange(flat.seq.numel(), device=flat.seq.device)
    first = torch.full((flat.size,), flat.seq.numel(), device=positions.device).scatter_reduce(
        0, flat.seq, positions, "amin")[flat.seq]
    prefix_sum = total - (total - scores)[first]
    prefix_len = (count - (count - counted)[first]).clamp(min=1)
    p = torch.sigmoid(prefix_sum / prefix_len)
    return ((2 * p - 1).clamp(0, 1) * counted).to(dtype), ((1 - 2 * p).clamp(0, 1) * counted).to(dtype)


def token_rm_loss(scores: Tensor, rewards: Tensor, mask: Tensor, *, seq_index: Tensor | None = None,
                  validate: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """OREAL eq. 12: BCE of sigma(mean_t w_t) against correctness, mean over sequences with tokens."""
    flat, x = flatten(scores, mask, seq_index, rewards.shape[0], validate)
    correct = binary("rewards", per_seq("rewards", rewards, flat, validate), scores.dtype, validate)
    lengths = flat.lengths(scores.dtype)
    mean_score = flat.seq_sum(x["logp"]) / lengths.clamp(min=1)
    per_sequence = F.binary_cross_entropy_with_logits(mean_score, correct, reduction="none")
    present = (lengths > 0).to(scores.dtype)
    loss = (per_sequence * present).sum() / present.sum().clamp(min=1)
    accuracy = (((mean_score > 0).to(scores.dtype) == correct).to(scores.dtype) * present).sum()
    return loss, {"accuracy": accuracy.detach() / present.sum().clamp(min=1)}


class TokenRewardHead(nn.Module):
    """Linear probe hidden [..., H] -> token scores [...]; replaces the LM head of a policy copy.

    zero_init=True follows the paper (w = 0, so w+ = w- = 0 at the start); the code keeps nn.Linear's default.
    """

    def __init__(self, hidden_size: int, zero_init: bool = True):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1, bias=False)  # as the authors' head (train_oreal.py)
        if zero_init:
            nn.init.zeros_(self.proj.weight)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden).squeeze(-1)


OREAL = ObjectiveSpec(name="oreal", loss=oreal_loss, modes=("online",), token_local=True, sequences="contrast_pair",
                      advantage="rloo", group_filter="mixed", min_group_size=2, needs=("reference", "token_rm"),
                      reads=("rollout.token_rm", "rollout.token_rm_lr"))
