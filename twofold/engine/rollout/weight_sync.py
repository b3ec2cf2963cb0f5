"""Trained weights -> sampler, in memory: FSDP2 unit by unit, in bounded buckets, timed and counted.

Each FSDP2 unit (a decoder layer, then the root's own embeddings / final norm / LM head) is all-gathered with
`unshard()` in the compute dtype (one collective per unit, half the bytes of fp32 when training in bf16), its
tensors go to the sampler in buckets of at most `bucket_bytes` (a larger tensor goes alone), and the unit is
resharded before the next one: at most one unit is ever unsharded. Every rank runs the same gathers; each rank
loads the full weights into its own engine. A model without FSDP2 (one process, plain module) is sent as is.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import PreTrainedModel

from twofold.engine.rollout.sampler import Bucket, Sampler

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class SyncStats:
    seconds: float
    bytes: int
    tensors: int
    buckets: int
    largest_bucket_bytes: int

    @property
    def gib_per_s(self) -> float:
        return self.bytes / 2**30 / max(self.seconds, 1e-9)


def sync_weights(model: nn.Module, sampler: Sampler) -> SyncStats:
    """Push the current weights of `model` (a `PolicyModel`, sharded or not, or a transformers model) into the
    sampler, then reset its prefix cache; call after every optimizer step that the next rollout must see."""
    stats = SyncStats(seconds=0.0, bytes=0, tensors=0, buckets=0, largest_bucket_bytes=0)
    start = time.perf_counter()
    sampler.load_weights(_counted(weight_buckets(model, sampler.cfg.sync_bucket_mb << 20,
                                                 DTYPES[sampler.cfg.dtype]), stats))
    stats.seconds = time.perf_counter() - start
    return stats


def _counted(buckets: Iterator[Bucket], stats: SyncStats) -> Iterator[Bucket]:
    for bucket in buckets:
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        stats.bytes += size
        stats.tensors += len(bucket)
        stats.buckets += 1
        stats.largest_bucket_bytes = max(stats.largest_bucket_bytes, size)
        yield bucket


@torch.no_grad()
def weight_buckets(model: nn.Module, bucket_bytes: int, dtype: torch.dtype) -> Iterator[Bucket]:
    """(Hugging Face name, full tensor) buckets. A bucket is consumed before the generator resumes: its tensors
    may alias the unit's unsharded storage, which the reshard after the unit frees."""
    prefix = hf_prefix(model)
    for unit in fsdp_units(model):
        if isinstance(unit, FSDPModule):
            unit.unshard()
        bucket, size = [], 0
        for name, param in owned_parameters(unit, model):
            tensor = param.detach().to(dtype).contiguous()
            nbytes = tensor.numel() * tensor.element_size()
            if bucket and size + nbytes > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append((name.removeprefix(prefix), tensor))
            size += nbytes
        if bucket:
            yield bucket
        if isinstance(unit, FSDPModule):
            unit.reshard()


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    return units or [model]


def owned_parameters(unit: nn.Module, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters that `unit` gathers (not those of nested FSDP units), named from `model`'s root."""
    unit_name = next(n for n, m in model.named_modules() if m is unit)
    nested = [n for n, m in unit.named_modules() if n and isinstance(m, FSDPModule)]
    for name, param in unit.named_parameters():  # shared (tied) parameters appear once
        if not any(name.startswith(f"{n}.") for n in nested):
            yield (f"{unit_name}.{name}" if unit_name else name), param


def hf_prefix(model: nn.Module) -> str:
    """Name prefix of the transformers model inside `model` ("causal_lm." in a PolicyModel, "" for itself)."""
    name = next((n for n, m in model.named_modules() if isinstance(m, PreTrainedModel)), None)
    if name is None:
        raise ValueError(f"{type(model).__name__} holds no transformers model to take parameter names from")
    return f"{name}." if name else ""
