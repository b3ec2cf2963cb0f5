"""SFT and RFT (docs/objectives.md §1-2): negative log-likelihood on target / positive tokens.

sft_loss: -sum m l / N_tok (TRL completion-only, token-mean).
rft_loss: online RFT as in NFT's code: NFT with the negative term off and omega = 1, i.e.
          (1/C) sum_{i: r_i = 1} sum_t m (-(l - l_old)), C = 1000; g = -1 on positive tokens, 0 elsewhere.
"""
from __future__ import annotations

import torch
from torch import Tensor

from twofold.objectives.aggregate import token_weights
from twofold.objectives.layout import (apply_token_local, binary, entropy_inputs, flatten, masked_mean, per_seq,
                                      pg_weight)
from twofold.objectives.token_local import TOKEN_LOCAL, sft_token


def sft_loss(logp: Tensor, mask: Tensor, *, seq_index: Tensor | None = None, agg: str = "token_mean",
             constant: float | None = None, num_tokens: float | Tensor | None = None,
             num_seqs: float | Tensor | None = None, validate: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy on counted tokens. logp/mask [B,T] (or [N] with seq_index [N]). Returns (loss, metrics)."""
    flat, x = flatten(logp, mask, seq_index, None, validate)
    w = token_weights(flat, agg, logp.dtype, constant=constant, num_tokens=num_tokens, num_seqs=num_seqs)
    loss, _ = apply_token_local(x["logp"], sft_token, weight=w)
    return loss, {"nll": masked_mean(-x["logp"], flat), "tokens": flat.mask.sum()}


def rft_loss(logp: Tensor, rewards: Tensor, mask: Tensor, *, old_logp: Tensor | None = None,
             seq_index: Tensor | None = None, agg: str = "sum_const", constant: float | None = 1000.0,
             num_tokens: float | Tensor | None = None, num_seqs: float | Tensor | None = None,
             max_log_ratio: float = 10.0, entropy: Tensor | None = None, entropy_coef: float = 0.0,
             is_weight: Tensor | None = None, validate: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """RFT on positive sequences (rewards [B]/[S]: bool, 0/1 or +-1). old_logp=None means l_old = 0, so the
    value is plain NLL on positives (offline RFT); the gradient is the same either way."""
    flat, x = flatten(logp, mask, seq_index, rewards.shape[0], validate, old_logp=old_logp, is_weight=is_weight)
    correct = binary("rewards", per_seq("rewards", rewards, flat, validate), logp.dtype, validate)
    old = x["old_logp"] if old_logp is not None else torch.zeros_like(x["logp"])
    w = token_weights(flat, agg, logp.dtype, constant=constant, num_tokens=num_tokens, num_seqs=num_seqs)
    loss, _ = apply_token_local(x["logp"], TOKEN_LOCAL["rft"], weight=w, old_logp=old,
                                correct=flat.gather(correct), max_log_ratio=max_log_ratio, is_weight=pg_weight(x),
                                **entropy_inputs(flat, logp, entropy, entropy_coef, w, validate))
    positive_tokens = flat.mask & (flat.gather(correct) > 0)
    return loss, {"positive_frac": masked_mean(positive_tokens.to(logp.dtype), flat), "tokens": flat.mask.sum()}
