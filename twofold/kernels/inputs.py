"""Input handling the kernel entry points share (`api`, `fused`): kept apart so that neither imports the other."""
from __future__ import annotations

import torch


def describe(x) -> str:
    """A value as an error message names it: a tensor by shape and dtype, anything else by type."""
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def fold_bias(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """(hidden, weight) with an LM-head bias folded in as one more feature: [h, 1] @ [W, b]^T = h W^T + b.

    The kernels stay bias-free; this costs one copy of hidden and of the weight (O(NH + VH), never O(NV)), and
    autograd routes the gradients back to hidden, weight and bias through the concatenation.
    """
    if bias is None:
        return hidden, weight
    if not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] with V={weight.shape[0]} (weight's first dim), got {describe(bias)}")
    if bias.dtype != weight.dtype or bias.device != weight.device:
        raise ValueError(f"bias must match weight's dtype and device ({weight.dtype}, {weight.device}), got "
                         f"{bias.dtype}, {bias.device}")
    ones = torch.ones(*hidden.shape[:-1], 1, dtype=hidden.dtype, device=hidden.device)
    return torch.cat([hidden, ones], -1), torch.cat([weight, bias[:, None]], 1)
