"""Pair objectives on (x, y_w, y_l) (docs/objectives.md §6, 7.3). S = sum of counted log-probs, |y| = counted tokens
(completion incl. EOS), P = number of pairs (override with the global `num_pairs`).

    REDI  (eq. 5):  mean_pairs[ -S_w/|y_w| + alpha S_l/|y_l| ]                      token-local (constant g)
    DPO   (eq. 2):  mean_pairs[ -log sigma(beta ((S_w - S_w_ref) - (S_l - S_l_ref))) ] two-phase
    SimPO (eq. 3):  mean_pairs[ -log sigma(beta (S_w/|y_w| - S_l/|y_l|) - gamma) ]    two-phase

DPO and SimPO are not token-local: dL/dl_t depends on the whole sequence sums of the current policy. Their
explicit two-phase path (what a fused kernel does: forward-only sums, then one backward):
    phase 1: S_w, S_l = per-sequence sums of logp (no grad)
    phase 2: loss, dS_w, dS_l = SEQUENCE_LEVEL[name](S_w, S_l, len_w, len_l, ref_w, ref_l, **hyper)
             then token_local.linear_token(logp, weight=1/P, coef=dS[seq]) on every counted token.
Layouts: chosen_* and rejected_* are each padded [P,T] or packed [N] with their own *_seq_index (pair number).
A pair with no counted tokens on either side is padding and does not count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from twofold.objectives.aggregate import normaliser
from twofold.objectives.layout import Flat, apply_token_local, flatten, per_seq, with_grad
from twofold.objectives.spec import ObjectiveSpec
from twofold.objectives.token_local import linear_token, redi_token


def dpo_pair(s_w, s_l, len_w, len_l, ref_w, ref_l, beta):
    """Per pair: (loss, dL/dS_w, dL/dS_l) of sigmoid DPO."""
    z = (s_w - ref_w) - (s_l - ref_l)
    coef = beta * torch.sigmoid(-beta * z)
    return F.softplus(-beta * z), -coef, coef


def simpo_pair(s_w, s_l, len_w, len_l, ref_w, ref_l, beta, gamma):
    """Per pair: (loss, dL/dS_w, dL/dS_l) of SimPO (TRL CPO loss_type="simpo", cpo_alpha=0)."""
    margin = s_w / len_w - s_l / len_l
    coef = beta * torch.sigmoid(gamma - beta * margin)
    return F.softplus(gamma - beta * margin), -coef / len_w, coef / len_l


SEQUENCE_LEVEL = {"dpo": dpo_pair, "simpo": simpo_pair}


def redi_loss(chosen_logp: Tensor, rejected_logp: Tensor, chosen_mask: Tensor, rejected_mask: Tensor, *,
              alpha: float = 0.8, chosen_seq_index: Tensor | None = None, rejected_seq_index: Tensor | None = None,
              num_pairs: float | Tensor | None = None, validate: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """REDI; alpha = 0 is length-normalised SFT on y_w, alpha = 1 symmetric REDI (the beta -> 0 limit of SimPO)."""
    (fw, lw), (fl, ll) = _pair_views(chosen_logp, rejected_logp, chosen_mask, rejected_mask, chosen_seq_index,
                                     rejected_seq_index, None, validate)
    len_w, len_l, pairs = _lengths(fw, fl, num_pairs, lw.dtype)
    weight = torch.cat([fw.mask / fw.gather(len_w.clamp(min=1) * pairs),
                        fl.mask / fl.gather(len_l.clamp(min=1) * pairs)])
    chosen = torch.cat([torch.ones_like(lw), torch.zeros_like(ll)])
    loss, _ = apply_token_local(torch.cat([lw, ll]), redi_token, weight=weight, chosen=chosen, alpha=alpha)
    present = (len_w > 0) | (len_l > 0)
    return loss, _metrics(fw.seq_sum(lw.detach()) / len_w.clamp(min=1),
                          fl.seq_sum(ll.detach()) / len_l.clamp(min=1), present, "logp_norm")


def dpo_loss(chosen_logp: Tensor, rejected_logp: Tensor, chosen_mask: Tensor, rejected_mask: Tensor,
             ref_chosen: Tensor | None = None, ref_rejected: Tensor | None = None, *, beta: float = 0.001,
             chosen_seq_index: Tensor | None = None, rejected_seq_index: Tensor | None = None,
             num_pairs: float | Tensor | None = None, validate: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO with per-pair reference sums ref_chosen/ref_rejected [P] (None: reference-free). REDI's best beta."""
    size = None if ref_chosen is None else ref_chosen.shape[0]
    views = _pair_views(chosen_logp, rejected_logp, chosen_mask, rejected_mask, chosen_seq_index,
                        rejected_seq_index, size, validate)
    flat = views[0][0]
    zero = torch.zeros(flat.size, dtype=chosen_logp.dtype, device=chosen_logp.device)
    ref_w = zero if ref_chosen is None else per_seq("ref_chosen", ref_chosen, flat, validate, chosen_logp.dtype)
    ref_l = zero if ref_rejected is None else per_seq("ref_rejected", ref_rejected, flat, validate,
                                                       chosen_logp.dtype)
    return _two_phase(views, dpo_pair, num_pairs, ref_w, ref_l, beta=beta)


def simpo_loss(chosen_logp: Tensor, rejected_logp: Tensor, chosen_mask: Tensor, rejected_mask: Tensor, *,
               beta: float = 2.0, gamma: float = 1.0, chosen_seq_index: Tensor | None = None,
               rejected_seq_index: Tensor | None = None, num_pairs: float | Tensor | None = None,
               validate: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """SimPO, REDI's best setting beta = 2, gamma = 1."""
    views = _pair_views(chosen_logp, rejected_logp, chosen_mask, rejected_mask, chosen_seq_index,
                        rejected_seq_index, None, validate)
    return _two_phase(views, simpo_pair, num_pairs, 0.0, 0.0, beta=beta, gamma=gamma)


def _two_phase(views, pair_fn, num_pairs, ref_w, ref_l, **hyper) -> tuple[Tensor, dict[str, Tensor]]:
    (fw, lw), (fl, ll) = views
    len_w, len_l, pairs = _lengths(fw, fl, num_pairs, lw.dtype)
    with torch.no_grad():  # phase 1: sequence sums; phase 2: per-sequence coefficients
        s_w, s_l = fw.seq_sum(lw), fl.seq_sum(ll)
        loss_p, d_w, d_l = pair_fn(s_w, s_l, len_w.clamp(min=1), len_l.clamp(min=1), ref_w, ref_l, **hyper)
        present = ((len_w > 0) | (len_l > 0)).to(lw.dtype)
        weight = torch.cat([fw.mask, fl.mask]).to(lw.dtype) / pairs
        _, grad = linear_token(torch.cat([lw, ll]), weight, torch.cat([fw.gather(d_w), fl.gather(d_l)]))
    loss = with_grad(torch.cat([lw, ll]), (loss_p * present).sum() / pairs, grad)
    return loss, _metrics(s_w - ref_w, s_l - ref_l, present > 0, "logratio")


def _pair_views(chosen_logp, rejected_logp, chosen_mask, rejected_mask, chosen_seq_index, rejected_seq_index,
                size, validate) -> tuple[tuple[Flat, Tensor], tuple[Flat, Tensor]]:
    fw, xw = flatten(chosen_logp, chosen_mask, chosen_seq_index, size, validate)
    fl, xl = flatten(rejected_logp, rejected_mask, rejected_seq_index, fw.size, validate)
    if fl.size != fw.size:
        raise ValueError(f"rejected_logp has {fl.size} pairs but chosen_logp has {fw.size}")
    if chosen_logp.dtype != rejected_logp.dtype:
        raise ValueError(f"rejected_logp dtype {rejected_logp.dtype} must match chosen_logp {chosen_logp.dtype}")
    return (fw, xw["logp"]), (fl, xl["logp"])


def _lengths(fw: Flat, fl: Flat, num_pairs, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    len_w, len_l = fw.lengths(dtype), fl.lengths(dtype)
    present = ((len_w > 0) | (len_l > 0)).to(len_w.dtype)
    return len_w, len_l, normaliser(num_pairs, present.sum(), "num_pairs")


def _metrics(chosen: Tensor, rejected: Tensor, present: Tensor, name: str) -> dict[str, Tensor]:
    count = present.sum().clamp(min=1)
    chosen, rejected = chosen.detach() * present, rejected.detach() * present
    return {f"chosen_{name}": chosen.sum() / count, f"rejected_{name}": rejected.sum() / count,
            "accuracy": ((chosen > rejected) & present).sum() / count, "pairs": present.sum()}


REDI = ObjectiveSpec(name="redi", loss=redi_loss, modes=("offline",), token_local=False, packing_unit="pair")
DPO = ObjectiveSpec(name="dpo", loss=dpo_loss, modes=("offline",), token_local=False, packing_unit="pair",
                    needs=("reference_sums",))
SIMPO = ObjectiveSpec(name="simpo", loss=simpo_loss, modes=("offline",), token_local=False, packing_unit="pair")
