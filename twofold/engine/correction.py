"""Sampler/trainer mismatch: measured every online step, optionally corrected (`rollout.correction`).

The sampler (vLLM, bf16 kernels) and the trainer (FSDP2) compute different log-probs for the same tokens under the
same weights. Per sampled token, r_t = log p_trainer(y_t) - log p_sampler(y_t) (`behavior_logp`), with the
trainer's log-probs under the weights that sampled (the step's old log-probs, or its first forward when the rollout
feeds one update).

Metrics (`mismatch/...`): k3_kl, the mean over tokens of e^r - r - 1, the k3 estimate of KL(sampler || trainer)
from the sampler's own samples; max_abs_logp_diff = max |r_t|; seq_log_ratio_p99 = the 99th percentile over
sequences of |sum_t r_t|; masked_frac = the fraction of sampled tokens whose correction weight is 0.

Corrections: one weight c_t per sampled token (`CORRECTIONS`, formulas in `RolloutConfig.correction`), a constant
of the step that the trainer folds into each token's term (`trainer.CORRECTION`).
"""
from __future__ import annotations

import math

import torch

CORRECTIONS = ("none", "token_tis", "seq_mask", "geo_mask", "icepop")
# (c_low, c_high) per mode when the config leaves them at 0
DEFAULT_BOUNDS = {"token_tis": (0.0, 2.0), "seq_mask": (1 / 3, 3.0), "geo_mask": (0.99, 1.01),
                  "icepop": (0.5, 5.0)}


def bounds(mode: str, c_low: float = 0.0, c_high: float = 0.0) -> tuple[float, float]:
    low, high = DEFAULT_BOUNDS[mode]
    return (c_low or low, c_high or high)


def log_ratios(trainer: list, behavior: list, sampled: list | None = None) -> list[torch.Tensor]:
    """Per sequence, r_t over its sampled tokens (all response tokens unless a `sampled` 0/1 mask is given); each
    sequence's values a list or a 1-d tensor."""
    out = []
    for i, (t, b) in enumerate(zip(trainer, behavior)):
        r = torch.as_tensor(t, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
        out.append(r if sampled is None else r[torch.as_tensor(sampled[i]) > 0])
    return out


def correction_weights(mode: str, ratios: list[torch.Tensor], c_low: float = 0.0,
                       c_high: float = 0.0) -> list[torch.Tensor]:
    """Per sequence, c_t for its sampled tokens (the formulas of `RolloutConfig.correction`)."""
    if mode not in CORRECTIONS:  # "auto" is resolved by config.correction_mode before this
        raise ValueError(f"rollout.correction must be one of {CORRECTIONS}, got {mode!r}")
    if mode == "none":
        return [torch.ones_like(r) for r in ratios]
    low, high = bounds(mode, c_low, c_high)
    out = []
    for r in ratios:
        if mode == "token_tis":
            out.append(r.exp().clamp(max=high))
        elif mode == "icepop":
            ratio = r.exp()
            out.append(((ratio >= low) & (ratio <= high)).double())
        else:
            seq = r.sum() if mode == "seq_mask" else r.mean() if r.numel() else r.sum()
            keep = float(low <= math.exp(float(seq)) <= high)
            out.append(torch.full_like(r, keep))
    return out


def mismatch_metrics(ratios: list[torch.Tensor], weights: list[torch.Tensor] | None = None) -> dict[str, float]:
    tokens = torch.cat(ratios) if ratios else torch.zeros(0, dtype=torch.float64)
    if tokens.numel() == 0:
        return {}
    seq = torch.stack([r.sum().abs() for r in ratios])
    masked = torch.cat(weights) == 0 if weights is not None else torch.zeros_like(tokens, dtype=torch.bool)
    return {"mismatch/k3_kl": float((tokens.exp() - tokens - 1).mean()),
            "mismatch/max_abs_logp_diff": float(tokens.abs().max()),
            "mismatch/seq_log_ratio_p99": float(torch.quantile(seq, 0.99)),
            "mismatch/masked_frac": float(masked.double().mean())}
