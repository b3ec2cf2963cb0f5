"""Per-group statistics, computed once per rollout batch with no grad (docs/objectives.md §0.2).

All take per-sequence `rewards` [B] and `group_ids` [B] (any integers; equal id = same prompt) and return [B]
(a group value broadcast to its members). Groups are found by a sort, so there is no host sync and no [B,B] matrix.
These helpers always validate their inputs (one host sync per rollout batch, off the hot path).
"""
from __future__ import annotations

import torch
from torch import Tensor

from twofold.objectives.layout import binary, check_shape

ADVANTAGES = ("grpo", "drgrpo", "rloo")


def group_index(group_ids: Tensor) -> Tensor:
    """[B] dense group number in [0, B) for arbitrary integer ids."""
    sorted_ids, order = torch.sort(group_ids)
    starts = torch.ones_like(sorted_ids, dtype=torch.long)
    starts[1:] = (sorted_ids[1:] != sorted_ids[:-1]).long()
    return torch.empty_like(order).scatter_(0, order, starts.cumsum(0) - 1)


def group_sum(x: Tensor, index: Tensor) -> Tensor:
    """[B] -> [B]: the sum over each sequence's group."""
    return torch.zeros_like(x).index_add(0, index, x)[index]


def _rewards(rewards: Tensor, group_ids: Tensor) -> Tensor:
    if not isinstance(rewards, Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-d tensor [B], got {getattr(rewards, 'shape', type(rewards))}")
    check_shape("group_ids", group_ids, rewards.shape)
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    values = rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())
    if not bool(torch.isfinite(values).all()):
        raise ValueError("rewards has NaN or inf")
    return values


def group_sizes(group_ids: Tensor) -> Tensor:
    """[B] number of sequences in each sequence's group."""
    index = group_index(group_ids)
    return group_sum(torch.ones(index.shape, dtype=torch.long, device=index.device), index)


def r_hat(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """[B] per-group correctness rate r_hat_q (NFT) = p (OREAL) of binary rewards (bool, 0/1 or +-1)."""
    values = _rewards(rewards, group_ids)
    correct = binary("rewards", rewards, values.dtype, validate=True)
    index = group_index(group_ids)
    return group_sum(correct, index) / group_sum(torch.ones_like(correct), index)


def group_advantages(rewards: Tensor, group_ids: Tensor, kind: str = "grpo", *, unbiased_std: bool = True,
                     eps_std: float = 1e-6) -> Tensor:
    """[B] advantages from real-valued rewards (no grad).

    grpo:   (r - mean) / (std + eps_std). unbiased_std=True is verl (a one-sample group gets mean 0, std 1);
            False is the population std, the form under which NFT's gradient equals GRPO's.
    drgrpo: r - mean.
    rloo:   r - mean of the others = G/(G-1) (r - mean); needs G >= 2.
    """
    if kind not in ADVANTAGES:
        raise ValueError(f"kind must be one of {ADVANTAGES}, got {kind!r}")
    r = _rewards(rewards, group_ids).detach()
    index = group_index(group_ids)
    size = group_sum(torch.ones_like(r), index)
    centred = r - group_sum(r, index) / size
    if kind == "drgrpo":
        return centred
    if kind == "rloo":
        if bool((size < 2).any()):
            raise ValueError("group_ids: rloo needs at least 2 sequences per group, found a group of 1")
        return centred * size / (size - 1)
    if not unbiased_std:
        return centred / ((group_sum(centred**2, index) / size).sqrt() + eps_std)
    single = size == 1  # verl: mean 0 and std 1 for a one-sample group
    std = (group_sum(centred**2, index) / (size - 1).clamp(min=1)).sqrt()
    return torch.where(single, r, centred) / (torch.where(single, torch.ones_like(std), std) + eps_std)


def dynamic_sampling_mask(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """[B] bool: True for sequences whose group's rewards are not all equal (DAPO dynamic sampling; verl
    filter_groups keeps a group iff std(acc) > 0). With binary rewards: 0 < #correct < G."""
    r = _rewards(rewards, group_ids)
    index = group_index(group_ids)
    highest = torch.full_like(r, -torch.inf).scatter_reduce(0, index, r, "amax")[index]
    lowest = torch.full_like(r, torch.inf).scatter_reduce(0, index, r, "amin")[index]
    return highest > lowest


def overlong_reward(lengths: Tensor, max_len: int, cache_len: int, factor: float = 1.0) -> Tensor:
    """[B] DAPO soft overlong punishment (eq. 13), added to the +-1 correctness reward.

    0 up to max_len - cache_len, then linear down to -factor at max_len, and -factor beyond (paper: -1).
    Equals verl's min(-(|y| - (max_len - cache_len)) / cache_len * factor, 0) for |y| <= max_len.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"cache_len must be in (0, max_len={max_len}], got {cache_len}")
    if lengths.is_floating_point() and not bool(torch.isfinite(lengths).all()):
        raise ValueError("lengths has NaN or inf")
    excess = (lengths.to(torch.get_default_dtype()) - (max_len - cache_len)) / cache_len
    return -excess.clamp(min=0, max=1) * factor
