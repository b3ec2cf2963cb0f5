"""Drop-in fused LM-head policy losses as `nn.Module`s, with Liger's argument order and TRL's loss-type names.

    loss_fn = twofold.nn.FusedLinearGRPOLoss(loss_type="grpo", beta=0.0)
    loss, metrics = loss_fn(hidden, lm_head.weight, completion_ids, completion_mask, advantages, lm_head.bias)

`forward(_input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None, ref_per_token_logps=None,
old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None, num_items_in_batch=None, **inputs)` is
`LigerFusedLinearGRPOLoss.forward`'s order: `_input` [B,T,H] holds the hidden states that predict the completion
tokens `selected_token_ids` [B,T], `attention_mask` [B,T] marks the ones that count, `advantages` is [B] or [B,T].
Objectives that need more per-sequence inputs take them by keyword (NFT: `rewards=`, `group_ids=`, optionally
`correct_rate=`). It returns `(loss, metrics)`; metrics is the objective's dict of detached tensors (Liger returns a
tuple). No [B,T,V] logits exist: PPO-clip runs in one fused vocab pass (`twofold.fused_linear_loss` with
`ppo_clip_token`, the token-local function `ppo_loss` itself runs); NFT, RFT and `fused=False` take log-probs from
`twofold.linear_logprobs` and call the objective's own loss. One copy of the math either way.

`loss_type` picks the aggregation with TRL's names and normalisers:

| loss_type | loss                                                   | twofold agg                                 |
|-----------|--------------------------------------------------------|---------------------------------------------|
| grpo      | mean over sequences of each one's token mean           | seq_mean_token_mean, num_seqs = B           |
| bnpo      | sum / tokens of this call                              | token_mean                                  |
| dr_grpo   | sum / (B * max_completion_length)                      | seq_mean_token_sum_norm                     |
| dapo      | sum / (num_items_in_batch / world size), else / tokens | token_mean with that count                  |
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from twofold.kernels import linear_logprobs
from twofold.kernels.fused import fused_linear_loss
from twofold.objectives.aggregate import token_weights
from twofold.objectives.layout import Flat, per_seq_or_token
from twofold.objectives.nft import nft_loss
from twofold.objectives.ppo import ppo_loss
from twofold.objectives.sft import rft_loss
from twofold.objectives.token_local import ppo_clip_token

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
FUSED_OPTIONS = {"kl", "max_log_ratio"}  # ppo_loss options the fused pass applies; any other goes through ppo_loss


def _ppo_options(m, agg: dict) -> dict:
    # ppo_loss is the shared body of grpo/dapo/drgrpo_loss and has no defaults; these are grpo_loss's
    return {**dict(constant=None, num_tokens=None, num_seqs=None, max_log_ratio=20.0, kl="k3"), **agg,
            **m.objective_kwargs}


def _ppo(m, logp, old, mask, advantages, ref_logp, agg, **inputs):
    if advantages is None:
        raise ValueError("advantages is required for the PPO-clip objectives ([B] or [B,T])")
    return ppo_loss(logp, old, advantages, mask, eps_low=m.epsilon_low, eps_high=m.epsilon_high, ref_logp=ref_logp,
                    beta=m.beta, **_ppo_options(m, agg), **inputs, validate=m.validate)


def _on_policy_ppo_token(logp, **inputs):
    """PPO-clip per token with l_old = sg[l] (no old log-probs given: R = 1)."""
    return ppo_clip_token(logp, old_logp=logp, **inputs)


def fused_ppo(m, hidden, weight, bias, targets, mask, advantages, old, ref_logp, agg):
    """PPO-clip in one fused vocab pass (6NHV: `twofold.fused_linear_loss` with `ppo_clip_token`), the per-token
    inputs laid out as `ppo_loss` lays them out; metrics are ppo_loss's own, on the pass's detached log-probs."""
    if advantages is None:
        raise ValueError("advantages is required for the PPO-clip objectives ([B] or [B,T])")
    b, t = mask.shape
    options = _ppo_options(m, agg)
    flat = Flat(mask.reshape(-1), torch.arange(b, device=mask.device).repeat_interleave(t), b)
    like = torch.zeros(b, t, dtype=torch.float32, device=mask.device)
    w = token_weights(flat, options["agg"], like.dtype, constant=options["constant"],
                      num_tokens=options["num_tokens"], num_seqs=options["num_seqs"])

    def counted(x):  # padding may hold anything (NaN, inf): zero it before any math
        return torch.where(mask, x.detach().to(like.dtype), like)

    inputs = dict(weight=w.view(b, t), adv=per_seq_or_token("advantages", advantages, flat, like, False).view(b, t),
                  eps_low=m.epsilon_low, eps_high=m.epsilon_high, beta=m.beta, kl=options["kl"],
                  max_log_ratio=options["max_log_ratio"])
    if old is not None:
        inputs["old_logp"] = counted(old)
    if ref_logp is not None and m.beta != 0:
        inputs["ref_logp"] = counted(ref_logp)
    out = fused_linear_loss(hidden, weight, targets.masked_fill(~mask, -100),
                            ppo_clip_token if old is not None else _on_policy_ppo_token, inputs=inputs,
                            temperature=m.temperature, chunk_size=m.chunk_size, backend=m.backend, bias=bias)
    with torch.no_grad():
        _, metrics = ppo_loss(out.logp, old, advantages, mask, eps_low=m.epsilon_low, eps_high=m.epsilon_high,
                              ref_logp=ref_logp, beta=m.beta, **options, validate=m.validate)
    return out.loss, metrics


def _nft(m, logp, old, mask, advantages, ref_logp, agg, rewards=None, group_ids=None, **inputs):
    if rewards is None or group_ids is None:
        raise ValueError("the NFT loss needs rewards= [B] (binary) and group_ids= [B] (and correct_rate= [B] when a "
                         "call holds only part of a group)")
    return nft_loss(logp, old, rewards, group_ids, mask, **agg, **m.objective_kwargs, **inputs, validate=m.validate)


def _rft(m, logp, old, mask, advantages, ref_logp, agg, rewards=None, group_ids=None, correct_rate=None, **inputs):
    # group_ids / correct_rate: NFT's call, accepted so that one call serves both; RFT's loss does not read groups
    if rewards is None:
        raise ValueError("the RFT loss needs rewards= [B] (binary)")
    for name, value in (("group_ids", group_ids), ("correct_rate", correct_rate)):
        if value is not None and tuple(value.shape) != tuple(rewards.shape):
            raise ValueError(f"{name} must have the shape of rewards {tuple(rewards.shape)}, got {tuple(value.shape)}")
    return rft_loss(logp, rewards, mask, old_logp=old, **agg, **m.objective_kwargs, **inputs, validate=m.validate)


# objective name -> adapter from the module's arguments to the objective's own loss function
POLICY_OBJECTIVES = {"grpo": _ppo, "nft": _nft, "rft": _rft}


class FusedLinearPolicyLoss(nn.Module):
    """A policy loss on the LM head: log-probs from (hidden, head weight, bias), then a twofold objective.

    Args:
        objective: "grpo" (PPO-clip with a KL term: GRPO, DAPO, Dr. GRPO, BNPO), "nft" or "rft".
        loss_type: the aggregation, by TRL's name (table above). "dr_grpo" needs max_completion_length.
        beta: weight of the k3 KL to the reference policy (PPO-clip only); > 0 needs reference log-probs
            (`ref_per_token_logps`, or `ref_input` with `ref_weight`).
        epsilon_low, epsilon_high: PPO clip range (TRL's `epsilon`, `epsilon_high`).
        temperature: divides the logits (the sampling temperature).
        max_completion_length: dr_grpo's constant L.
        chunk_size, backend: passed to `twofold.linear_logprobs`.
        validate: the objectives' value checks (one host sync); turn off on a hot path with trusted inputs.
        fused: PPO-clip only: forward and backward in one vocab pass (`twofold.fused_linear_loss`, 6NHV FLOPs)
            instead of log-probs and then autograd through them (8NHV). Same values; False for the latter.
        objective_kwargs: the objective's own keyword arguments (NFT: eps, prompt_weight, ...; PPO: kl=...).
    """

    def __init__(self, objective: str = "grpo", *, loss_type: str = "dapo", beta: float = 0.04,
                 epsilon_low: float = 0.2, epsilon_high: float = 0.2, temperature: float = 1.0,
                 max_completion_length: int | None = None, chunk_size: int | None = None, backend: str = "auto",
                 validate: bool = True, fused: bool = True, **objective_kwargs):
        super().__init__()
        if objective not in POLICY_OBJECTIVES:
            raise ValueError(f"objective must be one of {tuple(POLICY_OBJECTIVES)}, got {objective!r}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES} (TRL's names), got {loss_type!r}")
        if loss_type == "dr_grpo" and not (max_completion_length and max_completion_length > 0):
            raise ValueError("loss_type='dr_grpo' needs max_completion_length > 0 (its normaliser)")
        if beta != 0 and objective != "grpo":
            raise ValueError(f"beta (a KL term) applies to the PPO-clip objective only, not {objective!r}")
        self.objective, self.loss_type, self.beta = objective, loss_type, beta
        self.epsilon_low, self.epsilon_high, self.temperature = epsilon_low, epsilon_high, temperature
        self.max_completion_length, self.chunk_size, self.backend = max_completion_length, chunk_size, backend
        self.validate, self.fused, self.objective_kwargs = validate, fused, objective_kwargs

    def extra_repr(self) -> str:
        return f"objective={self.objective!r}, loss_type={self.loss_type!r}, beta={self.beta}"

    def aggregation(self, mask: Tensor, num_items_in_batch) -> dict:
        """The objective's agg keywords that reproduce TRL's normaliser for `loss_type` (module docstring)."""
        rows = mask.shape[0]
        if self.loss_type == "grpo":
            return dict(agg="seq_mean_token_mean", num_seqs=rows)
        if self.loss_type == "bnpo":
            return dict(agg="token_mean")
        if self.loss_type == "dr_grpo":
            return dict(agg="seq_mean_token_sum_norm", constant=float(self.max_completion_length), num_seqs=rows)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if num_items_in_batch is None:
            count = mask.sum().to(torch.float32)
            if world > 1:  # the batch's token count over all ranks, as Liger and TRL normalise DAPO
                torch.distributed.all_reduce(count)
        else:
            count = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=mask.device)
        return dict(agg="token_mean", num_tokens=(count / world).clamp(min=1.0))

    def logprobs(self, hidden: Tensor, weight: Tensor, token_ids: Tensor, mask: Tensor, bias: Tensor | None):
        targets = token_ids.masked_fill(~mask, -100)
        return linear_logprobs(hidden, weight, targets, bias=bias, temperature=self.temperature,
                               chunk_size=self.chunk_size, backend=self.backend)

    def forward(self, _input: Tensor, lin_weight: Tensor, selected_token_ids: Tensor, attention_mask: Tensor,
                advantages: Tensor | None = None, bias: Tensor | None = None, ref_per_token_logps: Tensor | None = None,
                old_per_token_logps: Tensor | None = None, ref_input: Tensor | None = None,
                ref_weight: Tensor | None = None, ref_bias: Tensor | None = None, num_items_in_batch=None,
                **inputs) -> tuple[Tensor, dict[str, Tensor]]:
        if _input.dim() != 3 or selected_token_ids.shape != _input.shape[:2]:
            raise ValueError(f"_input must be [B,T,H] and selected_token_ids [B,T]; got {tuple(_input.shape)} and "
                             f"{tuple(selected_token_ids.shape)}")
        if attention_mask.shape != selected_token_ids.shape:
            raise ValueError(f"attention_mask must be [B,T]={tuple(selected_token_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        mask = attention_mask.bool()
        ref_logp = None
        if self.beta != 0:
            if ref_per_token_logps is not None:
                ref_logp = ref_per_token_logps
            elif ref_input is not None and ref_weight is not None:
                with torch.no_grad():
                    ref_logp = self.logprobs(ref_input, ref_weight, selected_token_ids, mask, ref_bias)
            else:
                raise ValueError("beta != 0 needs ref_per_token_logps, or ref_input with ref_weight")
        old = old_per_token_logps
        agg = self.aggregation(mask, num_items_in_batch)
        if self.fused and self.objective == "grpo" and not inputs and set(self.objective_kwargs) <= FUSED_OPTIONS:
            return fused_ppo(self, _input, lin_weight, bias, selected_token_ids, mask, advantages, old, ref_logp, agg)
        logp = self.logprobs(_input, lin_weight, selected_token_ids, mask, bias)
        return POLICY_OBJECTIVES[self.objective](self, logp, old, mask, advantages, ref_logp, agg, **inputs)


class FusedLinearGRPOLoss(FusedLinearPolicyLoss):
    """PPO-clip with a KL term, as `LigerFusedLinearGRPOLoss` (same defaults: loss_type "dapo", beta 0.04)."""

    def __init__(self, *, loss_type: str = "dapo", beta: float = 0.04, **kwargs):
        super().__init__("grpo", loss_type=loss_type, beta=beta, **kwargs)


class FusedLinearDAPOLoss(FusedLinearPolicyLoss):
    """DAPO: clip-higher (0.2 / 0.28), token mean over the batch, no KL."""

    def __init__(self, *, loss_type: str = "dapo", beta: float = 0.0, epsilon_high: float = 0.28, **kwargs):
        super().__init__("grpo", loss_type=loss_type, beta=beta, epsilon_high=epsilon_high, **kwargs)


class FusedLinearDrGRPOLoss(FusedLinearPolicyLoss):
    """Dr. GRPO: token sums over B * max_completion_length, no KL (pass advantages without std division)."""

    def __init__(self, *, max_completion_length: int, loss_type: str = "dr_grpo", beta: float = 0.0, **kwargs):
        super().__init__("grpo", loss_type=loss_type, beta=beta, max_completion_length=max_completion_length,
                         **kwargs)


class FusedLinearNFTLoss(FusedLinearPolicyLoss):
    """NFT (negative-aware fine-tuning): forward(..., rewards=[B], group_ids=[B], correct_rate=None); `advantages`
    is unused. Aggregation defaults to TRL's default loss_type, "dapo" (token mean over the batch)."""

    def __init__(self, *, loss_type: str = "dapo", **kwargs):
        super().__init__("nft", loss_type=loss_type, beta=0.0, **kwargs)


class FusedLinearRFTLoss(FusedLinearPolicyLoss):
    """RFT (likelihood of the correct samples only): forward(..., rewards=[B]); `group_ids=` and `correct_rate=`
    are accepted, as NFT takes them, and unused (RFT's loss does not depend on the groups)."""

    def __init__(self, *, loss_type: str = "dapo", **kwargs):
        super().__init__("rft", loss_type=loss_type, beta=0.0, **kwargs)


__all__ = ["FusedLinearDAPOLoss", "FusedLinearDrGRPOLoss", "FusedLinearGRPOLoss", "FusedLinearNFTLoss",
           "FusedLinearPolicyLoss", "FusedLinearRFTLoss", "LOSS_TYPES", "POLICY_OBJECTIVES"]
