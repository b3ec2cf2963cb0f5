"""The one aggregation helper: per-token weights w_t so that loss = sum_t w_t * X_t (docs/objectives.md §0.3).

| agg                        | w_t (counted tokens; 0 elsewhere) |
|----------------------------|-----------------------------------|
| "token_mean"               | 1 / num_tokens                    |
| "seq_mean_token_mean"      | 1 / (num_seqs * |o_i|)            |
| "seq_mean_token_sum_norm"  | 1 / (num_seqs * constant)         |
| "sum_const"                | 1 / constant                      |

Global normalisers. By default num_tokens is the number of counted tokens in this call and num_seqs the number of
sequences with at least one counted token. When the engine splits a mini-batch into micro-batches (and ranks),
pass the mini-batch totals as `num_tokens` / `num_seqs`: each micro-batch loss is then its share of the exact
mini-batch loss and the accumulated gradient equals the one-batch gradient. Data-parallel gradient averaging
divides by the world size W, so pass `num_tokens / W` (or multiply the loss by W) to keep the global form exact.
|o_i| is always the local count: a sequence is never split across micro-batches.
"""
from __future__ import annotations

import torch
from torch import Tensor

from twofold.objectives.layout import Flat, flatten

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "sum_const")


def token_weights(flat: Flat, agg: str, dtype: torch.dtype, *, constant: float | None = None,
                  num_tokens: float | Tensor | None = None, num_seqs: float | Tensor | None = None) -> Tensor:
    """[N] aggregation weights for the counted tokens of `flat` (0 on the others)."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    needs_constant = agg in ("seq_mean_token_sum_norm", "sum_const")
    if needs_constant and (constant is None or not constant > 0):
        raise ValueError(f"agg={agg!r} needs a positive constant, got constant={constant!r}")
    counted = flat.mask.to(dtype)
    if agg == "sum_const":
        return counted / constant
    if agg == "token_mean":
        return counted / normaliser(num_tokens, counted.sum(), "num_tokens")
    lengths = flat.lengths(dtype)
    seqs = normaliser(num_seqs, (lengths > 0).to(dtype).sum(), "num_seqs")
    if agg == "seq_mean_token_sum_norm":
        return counted / (seqs * constant)
    return counted / (seqs * flat.gather(lengths).clamp(min=1))


def normaliser(override: float | Tensor | None, local: Tensor, name: str) -> Tensor:
    """The normaliser: the caller's global count, or the local one (clamped to 1 so an empty batch gives 0)."""
    if override is None:
        return local.clamp(min=1)
    if not isinstance(override, Tensor) and not override > 0:
        raise ValueError(f"{name} must be positive, got {override!r}")
    return torch.as_tensor(override, dtype=local.dtype, device=local.device)


def aggregate(values: Tensor, mask: Tensor, agg: str = "token_mean", *, seq_index: Tensor | None = None,
              constant: float | None = None, num_tokens: float | Tensor | None = None,
              num_seqs: float | Tensor | None = None) -> Tensor:
    """Reduce per-token `values` ([B,T], or [N] with `seq_index`) to a scalar with aggregator `agg`."""
    flat, x = flatten(values, mask, seq_index, None, validate=False)
    w = token_weights(flat, agg, values.dtype, constant=constant, num_tokens=num_tokens, num_seqs=num_seqs)
    return (w * x["logp"]).sum()
