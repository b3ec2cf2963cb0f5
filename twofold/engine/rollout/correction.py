"""Sampler/trainer mismatch: measured every online step, optionally corrected (`rollout.correction`).

The sampler (vLLM, bf16 kernels) and the trainer (FSDP2) compute different log-probs for the same tokens under the
same weights. Per sampled token, r_t = log p_trainer(y_t) - log p_sampler(y_t) (`behavior_logp`), with the
trainer's log-probs under the weights that sampled (the step's old log-probs, or its first forward when the rollout
feeds one update); rho_t = e^r_t is the importance ratio, rho_seq = e^(sum_t r_t) the sequence's.

Metrics (`mismatch/...`): k3_kl, the mean over tokens of e^r - r - 1, the k3 estimate of KL(sampler || trainer)
from the sampler's own samples; max_abs_logp_diff = max |r_t|; seq_log_ratio_p99 = the 99th percentile over
sequences of |sum_t r_t|; masked_frac = the fraction of sampled tokens the correction zeroes (weight or mask 0).

Corrections come in two kinds (docs/objectives.md §0.4 has the table with verl/TRL/OpenRLHF):

- importance weights (`WEIGHTS`): w_t multiplies the objective's policy-gradient term only, as verl's
  rollout_is_weights, TRL's importance_sampling_ratio and OpenRLHF's vllm_is do; the KL and entropy terms are not
  weighted and every token stays in the normalisers, also where w_t = 0 (IcePop's masked tokens). The objective
  applies it: its loss takes `is_weight` (`IS_WEIGHT`, a per-token batch field).
  token_tis: w_t = clamp(rho_t, c_low, c_high);  seq_tis: w_t = clamp(rho_seq, c_low, c_high);
  icepop: w_t = rho_t if c_low <= rho_t <= c_high else 0 (IcePop's M(k));
  seq_icepop: w_t = rho_seq if c_low <= rho_seq <= c_high else 0 (TRL's sequence_mask).
- rejection masks (`MASKS`): m_t in {0, 1}; 0 removes the token from the loss and from every normaliser, as if it
  were not in the batch (verl's rollout_rs: the response mask itself changes). Any objective takes them.
  token_mask: m_t = 1[c_low <= rho_t <= c_high];  seq_mask: the same on rho_seq for the whole sequence;
  geo_mask: the same on the geometric mean e^(mean_t r_t).
"""
from __future__ import annotations

import dataclasses

import torch

from twofold.engine.train.packing import MicroBatch, Sequence, collate, per_sequence

WEIGHTS = ("token_tis", "seq_tis", "icepop", "seq_icepop")
MASKS = ("token_mask", "seq_mask", "geo_mask")
SEQUENCE_MASKS = ("seq_mask", "geo_mask")
"""Rejection masks that reject a whole sequence (its unsampled answer tokens too)."""
CORRECTIONS = ("none", *WEIGHTS, *MASKS)
# (c_low, c_high) per mode when the config leaves them unset; c_low 0 is no lower bound
DEFAULT_BOUNDS = {"token_tis": (0.0, 2.0), "seq_tis": (0.0, 2.0), "icepop": (0.5, 5.0), "seq_icepop": (0.0, 3.0),
                  "token_mask": (0.5, 5.0), "seq_mask": (1 / 3, 3.0), "geo_mask": (0.99, 1.01)}
# the per-token batch fields: the objective's `is_weight` argument, and the rejection mask the trainer applies
IS_WEIGHT = "is_weight"
CORRECTION_MASK = "correction_mask"


def bounds(mode: str, c_low: float | None = None, c_high: float | None = None) -> tuple[float, float]:
    low, high = DEFAULT_BOUNDS[mode]
    return (low if c_low is None else c_low, high if c_high is None else c_high)


def log_ratios(trainer: list, behavior: list, sampled: list | None = None) -> list[torch.Tensor]:
    """Per sequence, r_t over its sampled tokens (all response tokens unless a `sampled` 0/1 mask is given); each
    sequence's values a list or a 1-d tensor."""
    out = []
    for i, (t, b) in enumerate(zip(trainer, behavior)):
        r = torch.as_tensor(t, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
        out.append(r if sampled is None else r[torch.as_tensor(sampled[i]) > 0])
    return out


def correction_weights(mode: str, ratios: list[torch.Tensor], c_low: float | None = None,
                       c_high: float | None = None) -> list[torch.Tensor]:
    """Per sequence, w_t (a `WEIGHTS` mode) or m_t (a `MASKS` mode) for its sampled tokens; 1 for `none`."""
    if mode not in CORRECTIONS:  # "auto" is resolved by config.correction_mode before this
        raise ValueError(f"rollout.correction must be one of {CORRECTIONS}, got {mode!r}")
    if mode == "none":
        return [torch.ones_like(r) for r in ratios]
    low, high = bounds(mode, c_low, c_high)
    out = []
    for r in ratios:
        if mode in ("token_tis", "icepop", "token_mask"):
            rho = r.exp()
        else:  # one ratio per sequence, on every token
            seq = r.mean() if mode == "geo_mask" and r.numel() else r.sum()
            rho = seq.exp().expand_as(r).clone()
        inside = ((rho >= low) & (rho <= high)).double()
        if mode in ("token_tis", "seq_tis"):
            out.append(rho.clamp(low, high))
        elif mode in ("icepop", "seq_icepop"):
            out.append(rho * inside)
        else:
            out.append(inside)
    return out


def micro_ratios(mb: MicroBatch, trainer_logp: torch.Tensor) -> list[torch.Tensor]:
    """Per sequence of a packed micro-batch, r_t = trainer - sampler log-prob over its sampled tokens."""
    sampled = per_sequence(mb.token_fields["sampled"], mb) if "sampled" in mb.token_fields else None
    return log_ratios(per_sequence(trainer_logp, mb), per_sequence(mb.token_fields["behavior_logp"], mb), sampled)


def correction_field(mb: MicroBatch, weights: list[torch.Tensor], whole_sequence: bool = False) -> torch.Tensor:
    """The [N] per-token field of a correction: each sequence's weights on its sampled tokens, 1 on its other loss
    positions (JEPO's appended answer), 0 off them. `whole_sequence` (a sequence-level rejection): a rejected
    sequence gets 0 on every loss position, its answer too (it leaves JEPO's group). `per_sequence` order is
    packed order."""
    field = mb.loss_mask.float()
    sampled = mb.loss_mask & (mb.token_fields["sampled"] > 0) if "sampled" in mb.token_fields else mb.loss_mask
    if weights:
        field[sampled] = torch.cat(weights).float()
    if whole_sequence and weights:
        rejected = torch.tensor([bool(w.numel()) and float(w[0]) == 0 for w in weights])
        field[mb.loss_mask & rejected[mb.seq_index]] = 0.0
    return field


def correct_micro(mb: MicroBatch, trainer_logp: torch.Tensor, mode: str, c_low: float | None = None,
                  c_high: float | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """r_t of each sequence of a packed micro-batch (`trainer_logp`: [N]) and, with a correction, its weights
    (or mask), written into the micro-batch as the [N] field `is_weight` (a `WEIGHTS` mode) or
    `correction_mask` (a `MASKS` mode)."""
    ratios = micro_ratios(mb, trainer_logp)
    if mode == "none":
        return ratios, None
    weights = correction_weights(mode, ratios, c_low, c_high)
    mb.token_fields[IS_WEIGHT if mode in WEIGHTS else CORRECTION_MASK] = correction_field(
        mb, weights, whole_sequence=mode in SEQUENCE_MASKS)
    return ratios, weights


def correct_sequences(batch: list[Sequence], trainer_logp: list[list[float]], mode: str,
                      c_low: float | None = None, c_high: float | None = None) -> dict[str, float]:
    """`correct_micro` on sequences not yet packed (one micro-batch of them; the engine's precision, fp32 fields):
    the mismatch metrics, and each sequence's `is_weight` / `correction_mask` token field."""
    scored = [dataclasses.replace(s, token_fields={**s.token_fields, "trainer_logp": lp})
              for s, lp in zip(batch, trainer_logp)]
    mb = collate(scored, list(range(len(scored))), pad_token_id=0)
    ratios, weights = correct_micro(mb, mb.token_fields["trainer_logp"], mode, c_low, c_high)
    if weights is not None:
        name = IS_WEIGHT if mode in WEIGHTS else CORRECTION_MASK
        for seq, values in zip(batch, per_sequence(mb.token_fields[name], mb)):
            seq.token_fields[name] = values.double().tolist()
    return mismatch_metrics(ratios, weights)


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
