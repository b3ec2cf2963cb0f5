"""verl: twofold's objectives as verl policy losses, through verl's own registries.

    import twofold.integrations.verl as tv
    tv.register()      # once per process, in the driver and in each actor worker (e.g. from your reward module)
    # then, in the verl config:
    #   actor_rollout_ref.actor.policy_loss.loss_mode=twofold_grpo                      (PPO-clip: GRPO, DAPO, ...)
    #   actor_rollout_ref.actor.policy_loss.loss_mode=twofold_nft  algorithm.adv_estimator=twofold_nft     (NFT)

`register()` calls `verl.trainer.ppo.core_algos.register_policy_loss` for "twofold_grpo", "twofold_nft" and
"twofold_rft", and `register_adv_est` for "twofold_nft". Each loss has verl's policy-loss signature
`(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)` and returns
`(loss, metrics)`; `log_prob` comes from verl's actor (its own fused or plain head), the loss math from
`twofold.objectives`.

- twofold_grpo: PPO-clip with `config.clip_ratio_low` / `clip_ratio_high` on verl's per-token advantages [B,T];
  every `loss_agg_mode` of verl's `agg_loss` with `config.global_batch_info` (dp_size, batch_num_tokens,
  global_batch_size, loss_scale_factor), so the value matches verl's "vanilla" loss without its dual clip
  (clip_ratio_c bounds the loss of negative-advantage tokens whose ratio exceeds it; twofold has no such bound).
- twofold_nft: verl's policy-loss call carries no rewards or groups, so the "twofold_nft" advantage estimator
  writes each response's group correctness rate r_hat (clamped to [0.02, 0.98], as NFT's code does) with the
  sign of its reward (+r_hat correct, -r_hat wrong) on its tokens; the loss reads both back. NFT's options come
  from `config.policy_loss` keys `nft_eps` (1.0) and `nft_prompt_weight` ("1-r") when present.
- twofold_rft: reads correctness the same way (advantage > 0), any advantage estimator whose sign is the reward's.

rollout_is_weights (verl's rollout correction, `algorithm.rollout_correction.rollout_is`) weight the
policy-gradient term per token, as in verl's own losses (twofold's `is_weight`); verl's rejection sampling
(`rollout_rs`) changes the response mask before the loss is called, so it applies as it is.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from twofold.objectives.groups import r_hat
from twofold.objectives.nft import nft_loss
from twofold.objectives.ppo import ppo_loss
from twofold.objectives.sft import rft_loss

NFT_RATE_BOUNDS = (0.02, 0.98)


def _option(config, name: str, default=None):
    """config.name for verl's dataclass configs, OmegaConf DictConfigs and plain dicts alike."""
    if config is None:
        return default
    if isinstance(config, Mapping):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


def aggregation(loss_agg_mode: str, response_mask: Tensor, config) -> dict:
    """twofold agg keywords equal to verl's `agg_loss(loss_mat, response_mask, loss_agg_mode, **global_batch_info)`.

    verl scales each rank's loss by dp_size so that averaging gradients over ranks gives the global normaliser;
    the same counts divided by dp_size are twofold's per-rank normalisers.
    """
    info = dict(_option(config, "global_batch_info", {}) or {})
    dp = float(info.get("dp_size", 1) or 1)
    tokens, seqs = info.get("batch_num_tokens"), info.get("global_batch_size")
    if dp > 1 and ((loss_agg_mode == "token-mean" and tokens is None) or
                   (loss_agg_mode.startswith("seq-mean") and seqs is None)):
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} with dp_size={dp:g} needs global_batch_info's "
                         "batch_num_tokens / global_batch_size (as verl's agg_loss)")
    per_rank = (lambda count: None if count is None else float(count) / dp)
    if loss_agg_mode == "token-mean":
        return dict(agg="token_mean", num_tokens=per_rank(tokens))
    if loss_agg_mode == "token-sum":
        return dict(agg="sum_const", constant=1.0 / dp)
    if loss_agg_mode == "seq-mean-token-mean":
        return dict(agg="seq_mean_token_mean", num_seqs=per_rank(seqs))
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        scale = 1.0
        if loss_agg_mode == "seq-mean-token-sum-norm":
            scale = float(info.get("loss_scale_factor") or response_mask.shape[-1])
        return dict(agg="seq_mean_token_sum_norm", constant=scale, num_seqs=per_rank(seqs))
    raise ValueError(f"loss_agg_mode must be one of verl's token-mean, token-sum, seq-mean-token-mean, "
                     f"seq-mean-token-sum, seq-mean-token-sum-norm; got {loss_agg_mode!r}")


def _verl_metrics(metrics: dict, prefix: str = "actor/") -> dict:
    return {prefix + k: float(v) for k, v in metrics.items()}


def grpo_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                     loss_agg_mode: str = "token-mean", config=None, rollout_is_weights: Tensor | None = None):
    """PPO-clip (GRPO / DAPO / Dr. GRPO by advantages, clip range and loss_agg_mode) as a verl policy loss."""
    clip = _option(config, "clip_ratio", 0.2)
    low, high = _option(config, "clip_ratio_low", clip), _option(config, "clip_ratio_high", clip)
    agg = {**dict(constant=None, num_tokens=None, num_seqs=None), **aggregation(loss_agg_mode, response_mask, config)}
    loss, metrics = ppo_loss(log_prob, old_log_prob, advantages, response_mask, eps_low=low, eps_high=high,
                             **agg, max_log_ratio=20.0, is_weight=rollout_is_weights, validate=False)
    out = _verl_metrics(metrics, "actor/twofold_")
    out["actor/pg_clipfrac"] = float(metrics["clip_frac"])
    return loss, out


def _correctness(advantages: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-response (correct in {0,1}, |advantage|) from the first counted token of each response."""
    mask = response_mask.bool()
    first = mask.float().argmax(-1, keepdim=True)  # the first counted token (any token works: the value is constant)
    value = advantages.gather(-1, first).squeeze(-1)
    return (value > 0).to(advantages.dtype), value.abs()


def nft_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                    loss_agg_mode: str = "token-mean", config=None, rollout_is_weights: Tensor | None = None):
    """NFT as a verl policy loss; `advantages` must come from the "twofold_nft" estimator (signed r_hat)."""
    correct, rate = _correctness(advantages, response_mask)
    options = _option(config, "policy_loss", None)
    loss, metrics = nft_loss(log_prob, old_log_prob, correct, torch.arange(correct.shape[0], device=correct.device),
                             response_mask, eps=float(_option(options, "nft_eps", 1.0)),
                             prompt_weight=str(_option(options, "nft_prompt_weight", "1-r")), correct_rate=rate,
                             rate_bounds=None, **aggregation(loss_agg_mode, response_mask, config),
                             is_weight=rollout_is_weights, validate=False)
    return loss, _verl_metrics(metrics, "actor/twofold_")


def rft_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                    loss_agg_mode: str = "token-mean", config=None, rollout_is_weights: Tensor | None = None):
    """RFT (likelihood of correct responses) as a verl policy loss; a response is correct where advantage > 0."""
    correct, _ = _correctness(advantages, response_mask)
    loss, metrics = rft_loss(log_prob, correct, response_mask, old_logp=old_log_prob,
                             **aggregation(loss_agg_mode, response_mask, config), is_weight=rollout_is_weights,
                             validate=False)
    return loss, _verl_metrics(metrics, "actor/twofold_")


def nft_advantage(token_level_rewards: Tensor, response_mask: Tensor, index: np.ndarray, epsilon: float = 1e-6,
                  norm_adv_by_std_in_grpo: bool = True, config=None, **kwargs) -> tuple[Tensor, Tensor]:
    """verl advantage estimator for NFT: +r_hat on the tokens of correct responses, -r_hat on wrong ones.

    r_hat is the correctness rate of the response's group (`index`: verl's prompt uid per response), clamped to
    [0.02, 0.98]; a response is correct when its summed reward is > 0. Returns (advantages, returns), both [B,T].
    """
    scores = token_level_rewards.sum(-1)
    _, groups = np.unique(np.asarray(index), return_inverse=True)
    group_ids = torch.as_tensor(groups, device=scores.device)
    correct = scores > 0
    rate = r_hat(correct, group_ids).to(scores.dtype).clamp(*NFT_RATE_BOUNDS)
    signed = torch.where(correct, rate, -rate)[:, None] * response_mask.to(scores.dtype)
    return signed, signed


POLICY_LOSSES = {"twofold_grpo": grpo_policy_loss, "twofold_nft": nft_policy_loss, "twofold_rft": rft_policy_loss}
ADVANTAGE_ESTIMATORS = {"twofold_nft": nft_advantage}


def register() -> dict[str, list[str]]:
    """Register the losses and the NFT advantage estimator with verl (imports verl); returns what it registered."""
    from verl.trainer.ppo import core_algos

    for name, fn in POLICY_LOSSES.items():
        core_algos.register_policy_loss(name)(fn)
    for name, fn in ADVANTAGE_ESTIMATORS.items():
        if core_algos.ADV_ESTIMATOR_REGISTRY.get(name) is not fn:
            core_algos.register_adv_est(name)(fn)
    return {"policy_loss": list(POLICY_LOSSES), "adv_estimator": list(ADVANTAGE_ESTIMATORS)}
