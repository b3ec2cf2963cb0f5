"""Public entry points: `linear_logprobs` and `linear_cross_entropy`, with argument checks and backend dispatch.

Every backend has the same contract (see `chunked_linear_logprobs`), so a new one (Triton) registers itself with
`register_backend` and is reached through the same two functions.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from twofold.kernels.chunked import chunked_linear_logprobs, no_autocast
from twofold.kernels.fused import fused_linear_loss
from twofold.kernels.inputs import describe as _describe, fold_bias
from twofold.kernels.kept import check_kept, kept_linear_logprobs, kept_positions

_BACKENDS: dict[str, Callable] = {"torch": chunked_linear_logprobs}


def register_backend(name: str, fn: Callable) -> None:
    """Make `backend=name` available; `fn` follows the contract of `chunked_linear_logprobs`."""
    _BACKENDS[name] = fn


def _resolve_backend(backend: str, device: torch.device) -> Callable:
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and "triton" in _BACKENDS else "torch"
    if backend not in _BACKENDS:
        known = ", ".join(sorted(_BACKENDS))
        raise ValueError(f"backend={backend!r} is not available here (available: auto, {known})")
    return _BACKENDS[backend]


def _check_inputs(hidden, weight, targets, temperature, ignore_index, check_targets):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3) or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating tensor of shape [N,H] or [B,T,H], got {_describe(hidden)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V,H] with H={hidden.shape[-1]} (hidden's last dim), got {_describe(weight)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an int64 or int32 tensor, got {_describe(targets)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] {tuple(hidden.shape[:-1])}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"hidden, weight and targets must share a device, got {hidden.device}, {weight.device}, "
                         f"{targets.device}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if check_targets:
        vocab = weight.shape[0]
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            where = bad.nonzero()[0].tolist()
            raise ValueError(f"targets{where} = {int(targets[tuple(where)])} is outside [0, {vocab}) and is not "
                             f"ignore_index={ignore_index}")


def _check_call(hidden, weight, targets, temperature, ignore_index, check_targets, chunk_size, kept):
    """The checks of both entry points, before any backend runs."""
    _check_inputs(hidden, weight, targets, temperature, ignore_index, check_targets)
    if kept is not None:
        check_kept(kept, targets, weight.shape[0], check_targets)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                    ignore_index: int = -100, return_entropy: bool = False, return_lse: bool = False,
                    chunk_size: int | None = None, backend: str = "auto", check_targets: bool = True,
                    bias: torch.Tensor | None = None, kept: torch.Tensor | None = None):
    """Per-token log-prob of `targets` under softmax((hidden @ weight.T + bias) / temperature), never forming [N, V].

    hidden [N,H] or [B,T,H]; weight [V,H] (same dtype); targets [N] or [B,T]; bias [V] or None (see `fold_bias`).
    Returns fp32 (fp64 for fp64 input)
    log-probs shaped like targets, then the entropy of the softmax if `return_entropy`, then the log-sum-exp of the
    tempered logits if `return_lse`. Ignored positions give 0 and get no gradient. Gradients flow to hidden and
    weight from any upstream gradient on log-probs and entropy. `check_targets` costs one host sync on CUDA; turn
    it off in loops whose token ids are known to be in range.

    kept: the sampler's kept sets (top-k / top-p), shaped like targets plus a trailing dim [..., K_max], ids padded
    with -1: log-probs, entropy and lse are then those of the softmax renormalised to each token's kept set, from
    only its |K| rows of the weight (`twofold.kernels.kept`, which gives the exact torch equivalent).
    """
    _check_call(hidden, weight, targets, temperature, ignore_index, check_targets, chunk_size, kept)
    hidden, weight = fold_bias(hidden, weight, bias)
    shape = targets.shape
    h2, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()
    if kept is not None:
        logp, entropy, lse = kept_linear_logprobs(h2, weight, y, kept.reshape(-1, kept.shape[-1]),
                                                  ignore_index=ignore_index, temperature=float(temperature),
                                                  want_entropy=return_entropy, backend=backend,
                                                  check_targets=check_targets)
    else:
        impl = _resolve_backend(backend, hidden.device)
        with no_autocast(hidden.device):  # the head picks its precision; the chunked backward turns it off too
            logp, entropy, lse = impl(h2, weight, y, ignore_index=ignore_index, temperature=float(temperature),
                                      chunk_size=chunk_size, want_entropy=return_entropy)
    out = [logp.view(shape)]
    if return_entropy:
        out.append(entropy.view(shape))
    if return_lse:
        out.append(lse.view(shape))
    return out[0] if len(out) == 1 else tuple(out)


def linear_cross_entropy(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                         ignore_index: int = -100, reduction: str = "mean", temperature: float = 1.0,
                         num_items_in_batch: int | torch.Tensor | None = None, chunk_size: int | None = None,
                         backend: str = "auto", check_targets: bool = True,
                         bias: torch.Tensor | None = None, kept: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of `input @ weight.T` against `target`, positional-compatible with
    `torch.nn.functional.linear_cross_entropy(input, linear_weight, target)`.

    reduction: "mean" (over non-ignored tokens; 0 when every token is ignored, never NaN), "sum" or "none" (shaped
    like target, 0 at ignored positions). `num_items_in_batch` (HF Trainer's convention) replaces the mean's
    denominator, for gradient accumulation over a global token count. kept: as in `linear_logprobs`.

    "mean" and "sum" run the fused pass (`twofold.kernels.fused.fused_linear_loss` with unit SFT weights): loss
    and gradients in one vocab pass, nothing recomputed in the backward. "none" returns per-token NLL that takes
    any upstream gradient, through `linear_logprobs` (whose backward recomputes the logits).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if reduction == "none":  # an arbitrary upstream per token: the log-probs path and its recomputing backward
        return -linear_logprobs(input, weight, target, temperature=temperature, ignore_index=ignore_index,
                                chunk_size=chunk_size, backend=backend, check_targets=check_targets, bias=bias,
                                kept=kept)
    # A scalar loss: its upstream is one number, so the fused pass forms the gradients in the forward (6NHV FLOPs,
    # not the 8NHV of log-probs + a backward that recomputes the logits); SFT with unit weights is the summed NLL.
    _check_call(input, weight, target, temperature, ignore_index, check_targets, chunk_size, kept)
    if kept is not None and check_targets:  # as linear_logprobs does: the fused pass trusts its kept sets
        kept_positions(kept.reshape(-1, kept.shape[-1]).long(), target.reshape(-1).long(), ignore_index, True)
    total = fused_linear_loss(input, weight, target, "sft", inputs={"weight": 1.0}, temperature=temperature,
                              ignore_index=ignore_index, chunk_size=chunk_size, backend=backend, bias=bias,
                              kept=kept).loss
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / (target != ignore_index).sum().clamp(min=1)
