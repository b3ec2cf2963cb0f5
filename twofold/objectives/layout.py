"""Two layouts, one flat view, and the input checks every loss shares.

Padded layout (other trainers): per-token tensors [B,T], a mask [B,T], per-sequence tensors [B].
Packed layout (the engine): per-token tensors [N], a mask [N], `seq_index` [N] (int, which sequence each token
belongs to), per-sequence tensors [S].

`flatten` turns either into a `Flat`: the padded one is reshaped to [B*T] with seq_index = row number, so the loss
math exists once, on [N] tensors. Masked-out tokens are replaced by 0 *before* any math (torch.where, not a
multiply), so padding that holds -inf or NaN never leaks into a value or a gradient; their gradient is exactly 0.

Validation: shape checks are free and always on. Value checks (NaN/inf on counted tokens, reward sets, group sizes,
seq_index range) need a host sync, so every loss takes `validate=True`; the engine validates once per rollout batch
and passes `validate=False` on the hot path.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

from twofold.objectives.token_local import with_entropy_bonus


@dataclass(frozen=True)
class Flat:
    """Flat view of a batch. `size` is the per-sequence buffer length (B padded, S or N packed)."""

    mask: Tensor  # [N] bool, tokens that count
    seq: Tensor  # [N] int64 in [0, size)
    size: int

    def seq_sum(self, x: Tensor) -> Tensor:
        """[N] -> [size]: per-sequence sum over counted tokens (differentiable)."""
        x = torch.where(self.mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return torch.zeros(self.size, dtype=x.dtype, device=x.device).index_add(0, self.seq, x)

    def lengths(self, dtype: torch.dtype) -> Tensor:
        """[size] number of counted tokens per sequence."""
        return self.seq_sum(torch.ones(self.mask.shape, dtype=dtype, device=self.mask.device))

    def gather(self, per_seq: Tensor) -> Tensor:
        """[size] -> [N]: broadcast a per-sequence value to its tokens."""
        return per_seq[self.seq]


def flatten(logp: Tensor, mask: Tensor, seq_index: Tensor | None, size: int | None,
            validate: bool, **token_inputs: Tensor | None) -> tuple[Flat, dict[str, Tensor | None]]:
    """Check shapes, build the `Flat` view and return flat, masked-to-zero copies of logp and `token_inputs`.

    `size` is the per-sequence length for the packed layout (None: N, enough for any seq_index).
    """
    check_float("logp", logp)
    if logp.dim() == 2:
        if seq_index is not None:
            raise ValueError(f"seq_index is only for the packed layout; logp is padded {tuple(logp.shape)}")
        rows = torch.arange(logp.shape[0], device=logp.device)
        seq, size = rows.repeat_interleave(logp.shape[1]), logp.shape[0]
    elif logp.dim() == 1:
        if seq_index is None:
            raise ValueError("the packed layout (logp of shape [N]) needs seq_index [N]")
        check_shape("seq_index", seq_index, logp.shape)
        if seq_index.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"seq_index must be int64 or int32, got {seq_index.dtype}")
        seq, size = seq_index.long(), logp.shape[0] if size is None else size
    else:
        raise ValueError(f"logp must be [B,T] (padded) or [N] (packed), got shape {tuple(logp.shape)}")
    flat_mask = as_mask("mask", mask, logp.shape, validate).reshape(-1)
    flat = Flat(flat_mask, seq, size)
    if validate and logp.dim() == 1 and flat.seq.numel() and not bool(((seq >= 0) & (seq < size)).all()):
        raise ValueError(f"seq_index must lie in [0, {size}) (the number of sequences)")
    out = {"logp": _masked(flat, "logp", logp, validate)}
    for name, x in token_inputs.items():
        if x is not None:
            check_shape(name, x, logp.shape)
            check_float(name, x)
        out[name] = None if x is None else _masked(flat, name, x.detach(), validate)
    return flat, out


def pg_weight(x: dict[str, Tensor | None]) -> Tensor | float:
    """The rollout correction's per-token importance weight from `flatten(..., is_weight=...)`, 1 without one."""
    return 1.0 if x.get("is_weight") is None else x["is_weight"]


def _masked(flat: Flat, name: str, x: Tensor, validate: bool) -> Tensor:
    x = x.reshape(-1)
    if validate and not bool(torch.isfinite(x.detach()[flat.mask]).all()):
        raise ValueError(f"{name} has NaN or inf on tokens where mask is true")
    return torch.where(flat.mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def as_mask(name: str, mask: Tensor, shape: torch.Size, validate: bool) -> Tensor:
    """Bool mask from bool or 0/1 numbers."""
    check_shape(name, mask, shape)
    if mask.dtype == torch.bool:
        return mask
    if validate and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must be bool or 0/1")
    return mask != 0


def check_shape(name: str, x: Tensor, shape: torch.Size | tuple[int, ...]) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)}, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def check_float(name: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor (float32 or float64), got {x.dtype}")


def per_seq(name: str, x: Tensor, flat: Flat, validate: bool, dtype: torch.dtype | None = None) -> Tensor:
    """Check a per-sequence input ([B] padded, [S] packed) and return it (cast to `dtype` if given)."""
    if not isinstance(x, Tensor) or x.dim() != 1:
        raise ValueError(f"{name} must be a 1-d per-sequence tensor, got {getattr(x, 'shape', type(x))}")
    if x.shape[0] != flat.size:
        raise ValueError(f"{name} has {x.shape[0]} sequences, expected {flat.size}")
    if validate and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has NaN or inf")
    return x.detach() if dtype is None else x.detach().to(dtype)


def per_seq_or_token(name: str, x: Tensor, flat: Flat, logp: Tensor, validate: bool) -> Tensor:
    """[N] per-token values (in logp's dtype) from a per-sequence input ([B] padded, [S] packed) or, in the padded
    layout, a per-token one shaped like logp ([B,T]: verl's and TRL's per-token advantages; 0 where mask is false)."""
    if logp.dim() == 2 and isinstance(x, Tensor) and x.dim() == 2:
        check_shape(name, x, logp.shape)
        check_float(name, x)
        return _masked(flat, name, x.detach().to(logp.dtype), validate)
    return flat.gather(per_seq(name, x, flat, validate, logp.dtype))


def binary(name: str, rewards: Tensor, dtype: torch.dtype, validate: bool) -> Tensor:
    """Correctness in {0,1} from bools, 0/1 numbers or +-1 numbers (the form verl/NFT/OREAL code uses)."""
    if validate and rewards.dtype != torch.bool:
        zero_one = ((rewards == 0) | (rewards == 1)).all()
        plus_minus = ((rewards == -1) | (rewards == 1)).all()
        if not bool(zero_one | plus_minus):
            raise ValueError(f"{name} must be binary: bool, 0/1 or -1/+1")
    return (rewards > 0).to(dtype)


class _TokenLocal(torch.autograd.Function):
    """A scalar with a given value whose gradients w.r.t. logp (and the per-token entropy) are given tensors."""

    @staticmethod
    def forward(ctx, logp, entropy, value, grad, grad_entropy):
        ctx.save_for_backward(grad, grad_entropy)
        return value

    @staticmethod
    def backward(ctx, grad_out):
        grad, grad_entropy = ctx.saved_tensors
        return grad_out * grad, grad_out * grad_entropy if ctx.needs_input_grad[1] else None, None, None, None


def with_grad(logp: Tensor, value: Tensor, grad: Tensor, entropy: Tensor | None = None,
              grad_entropy: Tensor | None = None) -> Tensor:
    """Attach an explicit gradient: returns `value` (scalar) with d value / d logp = grad (and
    d value / d entropy = grad_entropy when the per-token entropy is an input).

    This is how every token-local loss reuses its `token_local` function (the one the fused kernel applies)
    instead of a second autograd copy of the formula.
    """
    if entropy is None:
        return _TokenLocal.apply(logp, None, value.detach(), grad.detach(), grad.new_zeros(0))
    return _TokenLocal.apply(logp, entropy, value.detach(), grad.detach(), grad_entropy.detach())


def masked_mean(x: Tensor, flat: Flat, where: Tensor | None = None) -> Tensor:
    """Detached mean of x over counted tokens, or over the tokens of `where` (a subset of them); 0 when there are
    none: for metrics."""
    mask = flat.mask if where is None else where
    x = torch.where(mask, x.detach(), torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() / mask.sum().clamp(min=1)


def entropy_inputs(flat: Flat, logp: Tensor, entropy: Tensor | None, entropy_coef: float, weight: Tensor,
                   validate: bool) -> dict[str, Tensor]:
    """The entropy bonus' inputs of a token-local function: {} when entropy_coef is 0, else the flat per-token
    entropy (keeping its graph, 0 off the mask) and entropy_weight = entropy_coef * w_t."""
    if entropy_coef == 0:
        return {}
    if entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef!r} needs the per-token entropy `entropy` (shaped like logp; "
                         "the engine takes it from the same LM-head pass)")
    check_shape("entropy", entropy, logp.shape)
    check_float("entropy", entropy)
    flat_entropy = entropy.reshape(-1)
    if validate and not bool(torch.isfinite(flat_entropy.detach()[flat.mask]).all()):
        raise ValueError("entropy has NaN or inf on tokens where mask is true")
    zero = torch.zeros((), dtype=flat_entropy.dtype, device=flat_entropy.device)
    return {"entropy": torch.where(flat.mask, flat_entropy, zero), "entropy_weight": entropy_coef * weight}


# The engine's fused head reads an objective's token-local form from the objective's own call (no second copy of
# its inputs): inside `recording_token_local()`, every apply_token_local call also records (logp, fn, inputs),
# inputs holding `entropy_weight` when the call has an entropy bonus (the kernel computes the entropy itself).
_RECORDING: ContextVar[list | None] = ContextVar("token_local_recording", default=None)


@contextmanager
def recording_token_local():
    """Yield a list that collects (logp, fn, inputs) of each `apply_token_local` call made inside the context."""
    calls: list = []
    token = _RECORDING.set(calls)
    try:
        yield calls
    finally:
        _RECORDING.reset(token)


def apply_token_local(logp: Tensor, fn, *, entropy: Tensor | None = None, entropy_weight: Tensor | None = None,
                      **inputs) -> tuple[Tensor, Tensor]:
    """Run a `token_local` function on flat logp: (scalar loss carrying its explicit gradient, [N] losses).
    With `entropy` / `entropy_weight` (from `entropy_inputs`) the function carries the entropy bonus."""
    calls = _RECORDING.get()
    if calls is not None:
        calls.append((logp, fn, inputs if entropy is None else {**inputs, "entropy_weight": entropy_weight}))
    if entropy is None:
        with torch.no_grad():
            loss_t, grad_t = fn(logp.detach(), **inputs)
        return with_grad(logp, loss_t.sum(), grad_t), loss_t
    with torch.no_grad():
        loss_t, grad_t, grad_h = with_entropy_bonus(fn)(logp.detach(), entropy=entropy.detach(),
                                                        entropy_weight=entropy_weight, **inputs)
    return with_grad(logp, loss_t.sum(), grad_t, entropy, grad_h), loss_t
