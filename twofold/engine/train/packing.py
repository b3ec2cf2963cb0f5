"""Sequence packing: prompt+response sequences -> token-budget micro-batches, the same count on every rank.

Legend: S sequences in a micro-batch, N tokens in it (N <= budget), L one sequence's length.

A sequence of L tokens costs L-1 packed positions: its last token is never an input whose next token is scored,
so it is dropped, and nothing is padded. Position p of a sequence holds token p and predicts token p+1; it is a
loss position when token p+1 belongs to the response. `position_ids` restart at 0 for every sequence, which is what
keeps attention inside each sequence: flash-attn varlen on GPU, and on CPU (or GPU without flash-attn) SDPA per
sequence through `PackedLayout` (attention costs sum_s L_s^2, not N^2 as SDPA over the row with a mask would).

Planning (all ranks compute the same plan from the same mini-batch, then each takes its share):
1. first-fit-decreasing gives a lower bound on the bin count; round it up to a multiple of the world size W;
2. worst-fit-decreasing into that many bins (each sequence goes to the least-filled bin where it fits), which
   leaves the bins balanced; if something does not fit, add W bins and repeat;
3. deal bins to ranks, heaviest first, to the least-loaded rank that still has room: every rank gets exactly
   n_bins / W micro-batches and close to the same number of tokens.
A rank with fewer sequences than micro-batches (tiny mini-batches) gets a one-token placeholder micro-batch with no
loss positions, so the FSDP collectives of every rank still line up.

A mini-batch is planned and packed once (`PackedBatch`, `trainer.Trainer.pack`); what later passes compute per
token (old and reference log-probs, token-RM scores, the rollout correction) is written into the packed
micro-batches as [N] tensors, and `drop_sequences` removes sequences from them without planning again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class KeptSets:
    """The kept set of every sampled token of one sample (the ids the sampler's top-k / top-p step left), compact:
    token t's ids, ascending, are the next counts[t] entries of `ids`."""

    ids: Tensor  # int32 [sum_t |K_t|]
    counts: Tensor  # int64 [T]

    @classmethod
    def from_mask(cls, mask: Tensor) -> "KeptSets":
        """From a [T, V] bool mask of the kept ids (True = kept)."""
        return cls(mask.nonzero()[:, 1].to(torch.int32), mask.sum(1))

    @classmethod
    def from_rows(cls, rows: list[Tensor]) -> "KeptSets":
        rows = list(rows)
        return cls(torch.cat(rows).to(torch.int32) if rows else torch.zeros(0, dtype=torch.int32),
                   torch.tensor([len(r) for r in rows], dtype=torch.long))

    def __len__(self) -> int:
        return len(self.counts)

    def padded(self, k_max: int | None = None) -> Tensor:
        """[T, k_max] int64, each row the token's ids then -1 (the layout of `linear_logprobs(kept=)`)."""
        k_max = int(self.counts.max()) if k_max is None else k_max
        out = torch.full((len(self), k_max), -1, dtype=torch.long)
        col = torch.arange(k_max)[None, :] < self.counts[:, None]
        out[col] = self.ids.long()
        return out

    def contains(self, token_ids: list[int]) -> bool:
        """Whether every token t is in its own kept set (a sampler's record must satisfy it)."""
        return bool((self.padded() == torch.tensor(list(token_ids))[:, None]).any(1).all())


@dataclass
class Sequence:
    """One training sequence. `token_fields` hold one value per response token (a list or a 1-d tensor)."""

    tokens: list[int]
    prompt_len: int
    row_id: int | str = -1
    fields: dict[str, float] = field(default_factory=dict)
    token_fields: dict[str, list[float]] = field(default_factory=dict)
    kept: KeptSets | None = None
    """Each response token's kept set from the sampler (top-k / top-p replay), or None: the full vocabulary."""

    @property
    def packed_len(self) -> int:
        return len(self.tokens) - 1

    @property
    def response_len(self) -> int:
        return len(self.tokens) - self.prompt_len


def check_sequence(seq: Sequence, budget: int) -> str | None:
    """Why this sequence cannot be trained on (None when it can)."""
    if seq.prompt_len < 1:
        return "empty prompt (the first response token needs a token to predict it from)"
    if seq.response_len < 1:
        return "empty response (no token to train on)"
    if seq.packed_len > budget:
        return f"{len(seq.tokens)} tokens exceed data.max_tokens_per_microbatch={budget} (+1 for the dropped last token)"
    for name, values in seq.token_fields.items():
        if len(values) != seq.response_len:
            return f"token field {name!r} has {len(values)} values for {seq.response_len} response tokens"
    if seq.kept is not None and len(seq.kept) != seq.response_len:
        return f"{len(seq.kept)} kept sets for {seq.response_len} response tokens"
    return None


@dataclass
class MicroBatch:
    """Flat packed tensors of one micro-batch (N tokens, S sequences)."""

    input_ids: Tensor  # [N] int64
    position_ids: Tensor  # [N] int64, restarting at 0 per sequence
    targets: Tensor  # [N] int64 next token at loss positions, IGNORE_INDEX elsewhere
    seq_index: Tensor  # [N] int64 in [0, S)
    seq_fields: dict[str, Tensor]  # name -> [S] float32 (integer fields such as group ids: int64)
    token_fields: dict[str, Tensor]  # name -> [N] float32, 0 off loss positions
    sequence_ids: list[int]  # index of each sequence in the mini-batch
    kept: Tensor | None = None  # [N, K_max] int64 kept-set ids, -1 padded (all -1 off loss positions), or None

    @property
    def loss_mask(self) -> Tensor:
        return self.targets != IGNORE_INDEX

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device) -> "MicroBatch":
        move = lambda d: {k: v.to(device, non_blocking=True) for k, v in d.items()}  # noqa: E731
        return MicroBatch(self.input_ids.to(device), self.position_ids.to(device), self.targets.to(device),
                          self.seq_index.to(device), move(self.seq_fields), move(self.token_fields),
                          self.sequence_ids, None if self.kept is None else self.kept.to(device, non_blocking=True))


@dataclass
class PackedBatch:
    """One mini-batch, planned and packed once: every rank holds all its sequences and packs only its own share."""

    sequences: list[Sequence]  # the global mini-batch, in order (MicroBatch.sequence_ids index it)
    micro: list[MicroBatch]  # this rank's micro-batches (CPU tensors); per-token passes add [N] fields to them
    lengths: list[float] | None = None  # counted response tokens per sequence, once corrections are applied
    totals: dict | None = None  # the mini-batch normalisers, set with `lengths` before the first update


def loss_counts(mb: MicroBatch) -> list[int]:
    """Loss positions of each sequence of the micro-batch, in order."""
    return torch.bincount(mb.seq_index[mb.loss_mask], minlength=len(mb.sequence_ids)).tolist()


def per_sequence(values: Tensor, mb: MicroBatch) -> list[Tensor]:
    """[N] per-token values -> one tensor per sequence of the micro-batch: its values at its loss positions.
    `collate` lays each sequence out contiguously, in order, so this is one selection and a split."""
    if not mb.sequence_ids:
        return []
    return list(values[mb.loss_mask].split(loss_counts(mb)))


def drop_sequences(mb: MicroBatch, keep: Tensor) -> MicroBatch:
    """The micro-batch without the sequences where `keep` ([S] bool) is False: their tokens and fields leave it
    (a placeholder with no loss position if none is left). Position ids restart per sequence, so the others are
    packed exactly as before."""
    if bool(keep.all()) or not mb.sequence_ids:
        return mb
    if not bool(keep.any()):
        return _placeholder(int(mb.input_ids[0]), mb.seq_fields, mb.token_fields)
    tokens = keep[mb.seq_index]
    renumber = keep.long().cumsum(0) - 1
    return MicroBatch(mb.input_ids[tokens], mb.position_ids[tokens], mb.targets[tokens],
                      renumber[mb.seq_index[tokens]], {k: v[keep] for k, v in mb.seq_fields.items()},
                      {k: v[tokens] for k, v in mb.token_fields.items()},
                      [i for i, kept in zip(mb.sequence_ids, keep.tolist()) if kept],
                      None if mb.kept is None else mb.kept[tokens])


@dataclass
class PackedLayout:
    """Where the sequences of one packed row sit, grouped into right-padded batches for per-sequence attention.

    Sequence boundaries are where `position_ids` does not step by one (the rule transformers applies to packed rows).
    Sequences are sorted by length and cut into buckets whose members are longer than half the bucket's longest,
    so padding at most doubles a sequence's length and there are at most log2(longest) + 1 buckets. Padded slots
    repeat the sequence's last token: under a causal mask a real query never sees a slot after it, the outputs at
    padded slots are dropped by `unpad`, so they receive no gradient either.
    """

    shapes: list[tuple[int, int]]  # (sequences, padded length) per bucket
    gather: Tensor  # [sum of rows * length] packed index held by each padded slot
    scatter: Tensor  # [N] padded-slot index of each packed token

    @classmethod
    def from_position_ids(cls, position_ids: Tensor) -> "PackedLayout":
        n = position_ids.numel()
        is_start = torch.ones(n, dtype=torch.bool, device=position_ids.device)
        is_start[1:] = position_ids[1:] != position_ids[:-1] + 1
        starts = is_start.nonzero().squeeze(1)
        lengths = torch.diff(starts, append=starts.new_tensor([n]))
        host_lengths = lengths.tolist()  # one host sync per layout
        shapes, members = [], []
        for s in sorted(range(len(host_lengths)), key=lambda s: (-host_lengths[s], s)):
            if not members or 2 * host_lengths[s] <= shapes[-1][1]:
                shapes.append((0, host_lengths[s]))
                members.append([])
            members[-1].append(s)
            shapes[-1] = (shapes[-1][0] + 1, shapes[-1][1])
        slot_base = torch.empty_like(starts)
        gather, base = [], 0
        for (rows, length), seqs in zip(shapes, members):
            index = starts.new_tensor(seqs)
            first, last = starts[index], starts[index] + lengths[index] - 1
            steps = torch.arange(length, device=starts.device)
            gather.append(torch.minimum(first[:, None] + steps, last[:, None]).reshape(-1))
            slot_base[index] = base + torch.arange(rows, device=starts.device) * length
            base += rows * length
        seq = is_start.long().cumsum(0) - 1
        offset = torch.arange(n, device=starts.device) - starts[seq]
        return cls(shapes, torch.cat(gather), slot_base[seq] + offset)

    def pad(self, x: Tensor) -> list[Tensor]:
        """x [N, ...] in packed order -> one [rows, length, ...] tensor per bucket."""
        parts = x.index_select(0, self.gather).split([rows * length for rows, length in self.shapes])
        return [part.view(rows, length, *x.shape[1:]) for part, (rows, length) in zip(parts, self.shapes)]

    def unpad(self, parts: list[Tensor]) -> Tensor:
        """The inverse of `pad` on per-bucket outputs [rows, length, ...] -> [N, ...], padded slots dropped."""
        flat = torch.cat([part.reshape(-1, *part.shape[2:]) for part in parts])
        return flat.index_select(0, self.scatter)


def plan_microbatches(lengths: list[int], budget: int, world_size: int,
                      units: list[int] | None = None) -> list[list[list[int]]]:
    """plan[rank][micro] = indices into `lengths` (packed lengths); every rank gets the same number of micro-batches.
    Sequences with equal `units` entries (e.g. the two sides of a preference pair) share a micro-batch."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    members: dict[int, list[int]] = {}
    for i, unit in enumerate(units if units is not None else range(len(lengths))):
        members.setdefault(unit, []).append(i)
    groups = list(members.values())
    sizes = [sum(lengths[i] for i in g) for g in groups]
    for g, n in zip(groups, sizes):
        if not 0 < n <= budget:
            raise ValueError(f"sequence(s) {g} have packed length {n}, outside [1, budget={budget}]")
    order = sorted(range(len(groups)), key=lambda i: (-sizes[i], i))
    n_bins = world_size * max(1, math.ceil(_first_fit_bin_count(order, sizes, budget) / world_size))
    while (bins := _worst_fit(order, sizes, budget, n_bins)) is None:
        n_bins += world_size
    plan = _deal_to_ranks(bins, sizes, world_size)
    return [[sorted(i for g in micro for i in groups[g]) for micro in rank] for rank in plan]


def _first_fit_bin_count(order: list[int], lengths: list[int], budget: int) -> int:
    free: list[int] = []
    for i in order:
        slot = next((b for b, room in enumerate(free) if room >= lengths[i]), None)
        if slot is None:
            free.append(budget - lengths[i])
        else:
            free[slot] -= lengths[i]
    return len(free)


def _worst_fit(order: list[int], lengths: list[int], budget: int, n_bins: int) -> list[list[int]] | None:
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    load = [0] * n_bins
    for i in order:
        b = min(range(n_bins), key=lambda k: (load[k], k))
        if load[b] + lengths[i] > budget:
            return None
        bins[b].append(i)
        load[b] += lengths[i]
    return bins


def _deal_to_ranks(bins: list[list[int]], lengths: list[int], world_size: int) -> list[list[list[int]]]:
    per_rank = len(bins) // world_size
    weight = [sum(lengths[i] for i in b) for b in bins]
    plan: list[list[list[int]]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for b in sorted(range(len(bins)), key=lambda k: (-weight[k], k)):
        rank = min((r for r in range(world_size) if len(plan[r]) < per_rank), key=lambda r: (load[r], r))
        plan[rank].append(bins[b])
        load[rank] += weight[b]
    return plan


def collate(sequences: list[Sequence], indices: list[int], pad_token_id: int = 0) -> MicroBatch:
    """Pack the chosen sequences into one flat micro-batch (a placeholder token when `indices` is empty)."""
    if not indices:
        template = sequences[:1] or [Sequence([0, 0], 1)]
        return _placeholder(pad_token_id, _seq_fields(template), _token_fields(template))
    chosen = [sequences[i] for i in indices]
    inputs, positions, targets, seq_index = [], [], [], []
    for s, seq in enumerate(chosen):
        n = seq.packed_len
        inputs.extend(seq.tokens[:-1])
        positions.extend(range(n))
        # position p predicts token p+1; it counts when token p+1 is a response token (p >= prompt_len - 1)
        targets.extend(IGNORE_INDEX if p + 1 < seq.prompt_len else seq.tokens[p + 1] for p in range(n))
        seq_index.extend([s] * n)
    long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return MicroBatch(long(inputs), long(positions), long(targets), long(seq_index), _seq_fields(chosen),
                      _token_fields(chosen), list(indices), _kept(chosen))


def _kept(chosen: list[Sequence]) -> Tensor | None:
    """[N, K_max] kept sets of the packed targets (rows of -1 where no response token is predicted), or None when
    no sequence has them; sequences with and without kept sets cannot share a micro-batch."""
    have = [seq.kept is not None for seq in chosen]
    if not any(have):
        return None
    if not all(have):
        row = chosen[have.index(False)].row_id
        raise ValueError(f"sequence of row {row!r} has no kept sets while others of its batch do: every sequence "
                         "of a top-k / top-p replayed batch needs the sampler's kept set of each response token")
    k_max = max(int(seq.kept.counts.max()) for seq in chosen)
    return torch.cat([torch.cat([torch.full((seq.prompt_len - 1, k_max), -1, dtype=torch.long),
                                 seq.kept.padded(k_max)]) for seq in chosen])


def _seq_fields(chosen: list[Sequence]) -> dict[str, Tensor]:
    names = chosen[0].fields.keys()
    out = {}
    for name in names:
        values = [seq.fields[name] for seq in chosen]
        is_int = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        out[name] = torch.tensor(values, dtype=torch.long if is_int else torch.float32)
    return out


def _token_fields(chosen: list[Sequence]) -> dict[str, Tensor]:
    out = {}
    for name in chosen[0].token_fields:
        parts = []
        for seq in chosen:
            # response token j is predicted at position prompt_len - 1 + j
            parts.append(torch.zeros(seq.prompt_len - 1))
            parts.append(torch.as_tensor(seq.token_fields[name], dtype=torch.float32))
        out[name] = torch.cat(parts)
    return out


def _placeholder(pad_token_id: int, seq_fields: dict[str, Tensor], token_fields: dict[str, Tensor]) -> MicroBatch:
    """One pad token, no loss position, zero fields with the names and dtypes of those given."""
    one = torch.tensor([pad_token_id], dtype=torch.long)
    zero = torch.zeros(1, dtype=torch.long)
    zeros = lambda fields: {k: torch.zeros(1, dtype=v.dtype) for k, v in fields.items()}  # noqa: E731
    return MicroBatch(one, zero, torch.full((1,), IGNORE_INDEX), zero.clone(), zeros(seq_fields),
                      zeros(token_fields), [])
