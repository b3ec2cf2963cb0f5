"""The training step: one mini-batch of sequences -> packed micro-batches -> objective -> one optimizer step.

Contract: every rank passes the same global mini-batch (a list of `Sequence`, or the `PackedBatch` that `pack`
made of it); each rank plans it (the same plan everywhere), packs only its own share of micro-batches, once, and
runs them; the objective's aggregation uses the mini-batch totals (counted tokens and sequences over all
micro-batches and ranks). The online loop packs each mini-batch once per rollout step and its no-grad passes (old
and reference log-probs, token-RM scores, the correction) add [N] fields to those micro-batches; `prepare` then
drops corrected tokens, counts the totals and lets the objective check this rank's share, once for all epochs. Each micro-batch loss is therefore its exact share of the mini-batch
loss; FSDP2 sums (not averages) the gradients over ranks, so the accumulated gradient equals the gradient of the
whole mini-batch in one piece, at any world size and any token budget.

Objectives are called by parameter name from what the packed batch holds: `logp`, `mask`, `seq_index`,
`num_tokens`, `num_seqs`, per-sequence fields ([S]: rewards, advantages, group_ids, ...) and per-token fields
([N]: old_logp, ref_logp, ...), plus `objective.kwargs` from the config. Pair objectives
(`ObjectiveSpec.packing_unit` pair, a `chosen_logp` argument) get the pair view of the same tensors
(`pair_inputs`); their sequences carry the fields `pair_id` and `chosen` (1/0), and both sides of a pair are packed
into the same micro-batch.

Statistics that depend on the current policy's log-probs of the whole mini-batch (`ObjectiveSpec.statistics`,
JEPO's advantage moments) come from a no-grad pre-pass over this rank's micro-batches, summed over ranks,
and reach every micro-batch loss like `num_tokens` (skipped when the mini-batch is one micro-batch on one rank,
where the loss's own statistics are the mini-batch's). With `entropy_coef` the head also computes the per-token
entropy (with its gradient) for the loss's entropy bonus.

The head (`train.head`, `engine.heads`) runs inside the FSDP2 root's forward: the fused loss (default) or
log-probs + the objective through autograd; log-probs are at `temperature` (the sampling temperature online).
Rollout corrections (`engine.correction`): the per-token field `is_weight` reaches the objective by name (it
weights the policy-gradient term); the per-token field `correction_mask` is the trainer's: tokens it sets to 0
leave the loss and every normaliser, as if they were not in the batch.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import resource
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from twofold.engine.run.schema import OptimConfig
from twofold.engine.rollout.correction import CORRECTION_MASK, IS_WEIGHT
from twofold.engine.train.distributed import DistEnv, all_reduce_sum
from twofold.engine.train.heads import make_head
from twofold.engine.train.model import PolicyModel, count_parameters
from twofold.engine.train.packing import (IGNORE_INDEX, MicroBatch, PackedBatch, Sequence, check_sequence, collate,
                                    drop_sequences, loss_counts, plan_microbatches)
from twofold.objectives import get_spec
from twofold.objectives.groups import group_index

# Dense bf16 peak FLOP/s per GPU, for the MFU estimate (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Linear warm-up over `warmup_steps`, then constant or cosine down to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))




def counted_len(seq: Sequence) -> int:
    """Response tokens that count: all of them, less those a rollout rejection mask dropped."""
    weights = seq.token_fields.get(CORRECTION_MASK)
    return seq.response_len if weights is None else sum(w > 0 for w in weights)


def batch_totals(batch: list[Sequence], lengths: list[float] | None = None) -> dict[str, float]:
    """The mini-batch normalisers every micro-batch loss divides by (counted tokens, sequences, pairs, prompts,
    positive / negative tokens); an objective reads those its signature names. `lengths`: the counted tokens of
    each sequence (default `counted_len`); a sequence with none counts nowhere."""
    lengths = [counted_len(s) for s in batch] if lengths is None else lengths
    kept = [s for s, n in zip(batch, lengths) if n > 0]
    totals = {"num_tokens": float(sum(lengths)), "num_seqs": float(len(kept))}
    fields = batch[0].fields if batch else {}
    if "pair_id" in fields:
        totals["num_pairs"] = float(len({s.fields["pair_id"] for s in kept}))
    if "group_ids" in fields:
        totals["num_prompts"] = float(len({s.fields["group_ids"] for s in kept}))
    if "rewards" in fields:
        totals["num_pos_tokens"] = float(sum(n for s, n in zip(batch, lengths) if s.fields["rewards"] > 0))
        totals["num_neg_tokens"] = totals["num_tokens"] - totals["num_pos_tokens"]
    return totals


def check_pairs(batch: list[Sequence]) -> None:
    sides: dict[int, list[float]] = {}
    for seq in batch:
        if "pair_id" not in seq.fields or "chosen" not in seq.fields:
            raise ValueError(f"sequence of row {seq.row_id!r}: a pair objective needs the fields pair_id and chosen")
        sides.setdefault(seq.fields["pair_id"], []).append(seq.fields["chosen"])
    for pair, chosen in sides.items():
        if sorted(chosen) != [0, 1]:
            raise ValueError(f"pair_id {pair!r} must have exactly one chosen (1) and one rejected (0) sequence, "
                             f"got chosen={chosen}")


def pair_inputs(logp: torch.Tensor, mb: MicroBatch) -> dict[str, torch.Tensor]:
    """The packed pair view of a micro-batch: both sides read the same [N] log-probs through their own masks,
    indexed by the pair's number in this micro-batch; a per-sequence `ref_logp_sum` becomes ref_chosen/rejected."""
    pair = group_index(mb.seq_fields["pair_id"])  # [S] dense pair number
    chosen = mb.seq_fields["chosen"] > 0
    token_pair, token_chosen, mask = pair[mb.seq_index], chosen[mb.seq_index], mb.loss_mask
    out = {"chosen_logp": logp, "rejected_logp": logp, "chosen_mask": mask & token_chosen,
           "rejected_mask": mask & ~token_chosen, "chosen_seq_index": token_pair, "rejected_seq_index": token_pair}
    if "ref_logp_sum" in mb.seq_fields:
        ref, n_pairs = mb.seq_fields["ref_logp_sum"], int(pair.max()) + 1
        out["ref_chosen"] = torch.zeros(n_pairs, dtype=ref.dtype, device=ref.device).index_copy(
            0, pair[chosen], ref[chosen])
        out["ref_rejected"] = torch.zeros(n_pairs, dtype=ref.dtype, device=ref.device).index_copy(
            0, pair[~chosen], ref[~chosen])
    return out


def plan_rank(batch: list[Sequence], budget: int, env: DistEnv, pad_token_id: int,
              units: list | None = None) -> list[MicroBatch]:
    """This rank's packed micro-batches of a global batch (every rank gets the same number): one plan, one
    `collate` per micro-batch."""
    plan = plan_microbatches([s.packed_len for s in batch], budget, env.world_size, units)
    return [collate(batch, indices, pad_token_id) for indices in plan[env.rank]]


def drop_corrected(mb: MicroBatch) -> MicroBatch:
    """Tokens whose rejection mask is 0 stop being loss positions (and leave the objective's own masks); a
    sequence left with none leaves the micro-batch, as if it were not in the mini-batch."""
    weights = mb.token_fields.get(CORRECTION_MASK)
    if weights is None:
        return mb
    keep = weights > 0
    fields = {k: v * keep if k.endswith("_mask") else v for k, v in mb.token_fields.items()}
    mb = dataclasses.replace(mb, targets=torch.where(keep, mb.targets, IGNORE_INDEX), token_fields=fields)
    return drop_sequences(mb, torch.tensor(loss_counts(mb)) > 0)


def counted_lengths(micro: list[MicroBatch], size: int, env: DistEnv) -> list[float]:
    """Loss positions of each of the mini-batch's `size` sequences, from this rank's micro-batches, summed over
    ranks (each sequence sits in one micro-batch of one rank)."""
    counts = torch.zeros(size, dtype=torch.float64)
    for mb in micro:
        if mb.sequence_ids:
            counts[torch.tensor(mb.sequence_ids)] = torch.tensor(loss_counts(mb), dtype=torch.float64)
    if env.world_size > 1:
        counts = counts.to(env.device)
        dist.all_reduce(counts)
    return counts.tolist()


def objective_args(fn: Callable, name: str, logp: torch.Tensor, mb: MicroBatch, totals: dict, validate: bool,
                   kwargs: dict, entropy: torch.Tensor | None = None, strict: bool = True) -> dict:
    """The keyword arguments of `fn` (a loss, or its batch statistics) from what the micro-batch holds, the
    mini-batch totals and `objective.kwargs`; strict (the loss itself): every kwarg is passed, else only those
    `fn` takes."""
    available = {"logp": logp, "mask": mb.loss_mask, "seq_index": mb.seq_index, "validate": validate,
                 **totals, **mb.seq_fields, **mb.token_fields}
    if entropy is not None:
        available["entropy"] = entropy
    params = inspect.signature(fn).parameters
    if "chosen_logp" in params:
        available.update(pair_inputs(logp, mb))
    args = {k: available[k] for k in params if k in available and k not in kwargs}
    unset = [k for k, p in params.items()
             if p.default is inspect.Parameter.empty and k not in args and k not in kwargs]
    # a required-but-optional tensor (e.g. `old_logp: Tensor | None`) that the batch lacks means None
    args.update({k: None for k in unset if "None" in str(params[k].annotation)})
    missing = [k for k in unset if k not in args]
    if missing:
        have = sorted(set(mb.seq_fields) | set(mb.token_fields))
        raise ValueError(f"objective {name!r} needs {missing}, which the batch does not hold "
                         f"(per-sequence/per-token fields present: {have})")
    return args | (kwargs if strict else {k: v for k, v in kwargs.items() if k in params})


def sum_statistics(parts: list[dict[str, torch.Tensor]], env: DistEnv) -> dict[str, torch.Tensor]:
    """Sum additive batch statistics over this rank's micro-batches, then over ranks (one collective, fp64)."""
    sums: dict[str, torch.Tensor] = {}
    for part in parts:
        for k, v in part.items():
            sums[k] = sums[k] + v.double() if k in sums else v.double()
    names = sorted(sums)
    if not names:
        return {}
    flat = torch.cat([sums[k].reshape(-1).to(env.device) for k in names])
    if env.world_size > 1:
        dist.all_reduce(flat)
    pieces = flat.split([sums[k].numel() for k in names])
    return {k: p.reshape(sums[k].shape) for k, p in zip(names, pieces)}


@torch.no_grad()
def sequence_logprobs(model: PolicyModel, batch: list[Sequence], env: DistEnv, budget: int,
                      pad_token_id: int = 0, temperature: float = 1.0) -> list[list[float]]:
    """Per response token log-probs at `temperature` of every sequence under `model` (no grad; old / reference
    log-probs). Each rank scores its micro-batches; the result is gathered, so every rank returns the whole
    batch."""
    local: dict[int, list[float]] = {}
    micro = plan_rank(batch, budget, env, pad_token_id)
    for mb, logp in zip(micro, score_packed(model, micro, env, temperature)):
        local.update(split_by_sequence(logp, mb))
    return gather_sequences(local, len(batch), env)


@torch.no_grad()
def score_packed(model: PolicyModel, micro: list[MicroBatch], env: DistEnv,
                 temperature: float = 1.0) -> list[torch.Tensor]:
    """[N] fp32 CPU values of `model` (log-probs at `temperature`, or a scorer's per-token scores) at the loss
    positions of each micro-batch, 0 elsewhere (the layout of a packed per-token field). Every micro-batch runs,
    placeholders included, so the FSDP collectives of every rank line up."""
    out = []
    for mb in micro:
        dev = mb.to(env.device)
        values = model(dev.input_ids, dev.position_ids, dev.targets, temperature=temperature, kept=dev.kept).float().cpu()
        out.append(torch.where(mb.loss_mask, values, torch.zeros((), dtype=values.dtype)))
    return out


def split_by_sequence(logp: torch.Tensor, mb: MicroBatch) -> dict[int, list[float]]:
    """[N] per-token values of a micro-batch -> {sequence index in the mini-batch: its loss-position values}.
    `collate` lays each sequence's tokens out contiguously, in order: one selection and one `tolist` for the
    micro-batch, then list slices (a mask per sequence cost ~3 ms per call at the demo's 128 sequences)."""
    values, out, start = logp[mb.loss_mask].tolist(), {}, 0
    for index, count in zip(mb.sequence_ids, loss_counts(mb)):
        out[index], start = values[start:start + count], start + count
    return out


def gather_sequences(local: dict[int, list[float]], size: int, env: DistEnv) -> list[list[float]]:
    parts: list = [local]
    if env.world_size > 1:
        parts = [None] * env.world_size
        dist.all_gather_object(parts, local)
    merged = {k: v for part in parts for k, v in part.items()}
    return [merged[i] for i in range(size)]


class Trainer:
    """Owns the optimizer and schedule of a sharded `PolicyModel`; `step(batch)` runs one optimizer step."""

    def __init__(self, policy: PolicyModel, env: DistEnv, optim: OptimConfig, *, objective: str,
                 objective_kwargs: dict | None = None, total_steps: int, max_tokens_per_microbatch: int,
                 pad_token_id: int = 0, head: str = "fused", temperature: float = 1.0):
        self.policy, self.env, self.optim_cfg = policy, env, optim
        self.head, self.temperature = head, float(temperature)
        self.head_factory = make_head  # (head, objective, call, entropy) -> head; bench swaps it
        self.keep_logp = False  # set to keep the step's [N] log-probs of each micro-batch in `step_logp`
        self.step_logp: list[torch.Tensor] = []
        self.spec = get_spec(objective)
        self.loss_fn = self.spec.loss
        self.objective_name, self.objective_kwargs = objective, dict(objective_kwargs or {})
        self.budget, self.pad_token_id = max_tokens_per_microbatch, pad_token_id
        # foreach: torch picks the per-tensor loop for CPU (and DTensor) parameters, ~3x the Python time per step
        # for the same arithmetic (a test checks the two bitwise)
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                           eps=optim.eps, weight_decay=optim.weight_decay, foreach=True)
        schedule = dict(warmup_steps=optim.warmup_steps, total_steps=total_steps, schedule=optim.schedule,
                        min_lr_ratio=optim.min_lr_ratio)
        self.scheduler = LambdaLR(self.optimizer, lambda s: lr_lambda(s, **schedule))
        self.pairwise = self.spec.packing_unit == "pair"
        self.statistics_fn = self.spec.statistics
        self.wants_entropy = float(self.objective_kwargs.get("entropy_coef", 0.0)) != 0
        self.unit_field = self.spec.unit_field
        self.steps_done = 0
        self.skipped_steps = 0
        _, self.flop_params = count_parameters(policy)

    def pack(self, batch: list[Sequence]) -> PackedBatch:
        """Check the rows (by row id), then plan and pack the mini-batch once: this rank's micro-batches."""
        self.check_rows(batch)
        units = [s.fields[self.unit_field] for s in batch] if self.unit_field else None
        return PackedBatch(batch, plan_rank(batch, self.budget, self.env, self.pad_token_id, units))

    def plan(self, batch: list[Sequence]) -> list[MicroBatch]:
        """This rank's packed micro-batches of the mini-batch (CPU tensors)."""
        return self.pack(batch).micro

    def prepare(self, packed: PackedBatch) -> dict[str, float]:
        """Once per packed mini-batch, before its first update (later ones reuse it): tokens a correction set to 0
        leave the micro-batches, the mini-batch totals are counted (over ranks), and the objective checks this
        rank's share."""
        if packed.totals is None:
            packed.micro = [drop_corrected(mb) for mb in packed.micro]
            packed.lengths = counted_lengths(packed.micro, len(packed.sequences), self.env)
            packed.totals = batch_totals(packed.sequences, packed.lengths)
            self.check_share(packed)
        return packed.totals

    def step(self, batch: list[Sequence] | PackedBatch) -> dict[str, float]:
        """One optimizer step on a global mini-batch (packed here unless it comes packed); returns metrics (same
        values on every rank)."""
        packed = batch if isinstance(batch, PackedBatch) else self.pack(batch)
        totals = dict(self.prepare(packed))
        start = time.perf_counter()
        if self.env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.env.device)
        num_tokens, micro = totals["num_tokens"], packed.micro
        totals |= self.batch_statistics(micro)
        local_loss, weighted = torch.zeros((), dtype=torch.float64, device=self.env.device), {}
        kept_logp = []
        for mb in micro:
            loss, metrics = self.micro_step(mb.to(self.env.device), totals)
            if self.keep_logp:
                kept_logp.append(self.last_logp.cpu())
            local_loss += loss.detach().double()
            share = float(mb.loss_mask.sum()) / num_tokens  # objective metrics are per-micro-batch token means
            for k, v in metrics.items():
                if k in ("tokens", "pairs"):  # counts, reported exactly below, not as means
                    continue
                weighted[k] = weighted.get(k, 0.0) + float(v) * share
        packed_tokens = sum(mb.num_tokens for mb in micro)
        totals = all_reduce_sum([float(local_loss), float(packed_tokens), *weighted.values()], self.env.device)
        loss, packed_tokens = totals[0], totals[1]
        lr = self.last_lr  # the rate this update uses; apply_gradients advances the schedule
        grad_norm, applied = self.apply_gradients(loss)
        if self.keep_logp:
            self.step_logp = kept_logp
        elapsed = time.perf_counter() - start
        kept = [s for s, n in zip(packed.sequences, packed.lengths) if n > 0]
        return {"step": self.steps_done, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                "skipped": float(not applied), "tokens": packed_tokens, "loss_tokens": num_tokens,
                "microbatches": float(len(micro)), "tokens_per_s": packed_tokens / elapsed, "step_time_s": elapsed,
                **dict(zip(weighted, totals[2:])), **self.memory_and_mfu(kept, elapsed)}

    def micro_step(self, mb: MicroBatch, totals: dict):
        """Forward (trunk + head, inside the FSDP2 root) and backward of one micro-batch; keeps its log-probs."""
        head = self.head_factory(self.head, self.objective_name, self.objective_call(mb, totals), self.wants_entropy)
        out = self.policy(mb.input_ids, mb.position_ids, mb.targets, temperature=self.temperature, loss_head=head,
                          kept=mb.kept)
        out.loss.backward()
        self.last_logp = out.logp
        return out.loss, out.metrics

    def objective_call(self, mb: MicroBatch, totals: dict):
        """The loss bound to one micro-batch: (logp, entropy) -> (loss, metrics), for the head."""
        return lambda logp, entropy=None: self.call_objective(logp, mb, totals, validate=False, entropy=entropy)

    @torch.no_grad()
    def batch_statistics(self, micro: list[MicroBatch]) -> dict[str, torch.Tensor]:
        """The objective's mini-batch statistics (sums over this rank's micro-batches, then over ranks), or {}
        when the loss's own statistics already are the mini-batch's (one micro-batch on one rank)."""
        if self.statistics_fn is None or (len(micro) == 1 and self.env.world_size == 1):
            return {}
        parts = []
        for mb in micro:
            dev = mb.to(self.env.device)
            logp = self.policy(dev.input_ids, dev.position_ids, dev.targets, temperature=self.temperature,
                               kept=dev.kept)
            parts.append(self.call_objective(logp, dev, {}, validate=False, fn=self.statistics_fn))
        return sum_statistics(parts, self.env)

    def call_objective(self, logp: torch.Tensor, mb: MicroBatch, totals: dict, validate: bool,
                       entropy: torch.Tensor | None = None, fn: Callable | None = None):
        """Call the loss (or `fn`, e.g. its batch statistics) with the arguments its signature names."""
        fn = fn or self.loss_fn
        return fn(**objective_args(fn, self.objective_name, logp, mb, totals, validate, self.objective_kwargs,
                                   entropy, strict=fn is self.loss_fn))

    def check_rows(self, batch: list[Sequence]) -> None:
        """Reject bad sequences by row id (before planning: a too-long one would fail there less clearly)."""
        if len(batch) < 1:
            raise ValueError("the mini-batch is empty")
        fields, token_fields = set(batch[0].fields), set(batch[0].token_fields)
        for seq in batch:
            problem = check_sequence(seq, self.budget)
            if problem is None and (set(seq.fields) != fields or set(seq.token_fields) != token_fields):
                problem = f"fields {sorted(seq.fields)} differ from the first sequence's {sorted(fields)}"
            if problem:
                raise ValueError(f"sequence of row {seq.row_id!r}: {problem}")
        if self.pairwise:
            check_pairs(batch)

    def check_share(self, packed: PackedBatch) -> None:
        """Let the objective validate all its inputs on this rank's micro-batches, with the mini-batch totals, on
        CPU (off the device: no host sync on the hot path, where the loss runs with validate=False)."""
        takes_weight = IS_WEIGHT in inspect.signature(self.loss_fn).parameters
        for mb in packed.micro:
            if IS_WEIGHT in mb.token_fields and not takes_weight:
                raise ValueError(f"objective {self.objective_name!r} takes no `{IS_WEIGHT}` (a rollout correction's "
                                 "importance weight on its policy-gradient term); use a rejection mask "
                                 "(rollout.correction=token_mask, seq_mask or geo_mask) or none")
            if mb.sequence_ids:  # a placeholder holds no input
                zeros = torch.zeros(mb.num_tokens)
                self.call_objective(zeros, mb, packed.totals, validate=True,
                                    entropy=zeros if self.wants_entropy else None)

    def check_batch(self, batch: list[Sequence] | PackedBatch) -> PackedBatch:
        """The rows, then the objective on this rank's share (once per packed mini-batch); returns it packed."""
        packed = batch if isinstance(batch, PackedBatch) else self.pack(batch)
        self.prepare(packed)
        return packed

    def apply_gradients(self, loss: float) -> tuple[float, bool]:
        """Clip and step; on a non-finite loss or gradient norm skip the update (weights and optimizer state
        untouched), count it and move on. The schedule still advances: the mini-batch was consumed."""
        params = [p for p in self.policy.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        total = total.full_tensor() if isinstance(total, DTensor) else total
        norm = float(total)
        applied = math.isfinite(norm) and math.isfinite(loss)
        if applied:
            if self.optim_cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.optim_cfg.max_grad_norm, total, foreach=True)
            self.optimizer.step()
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.steps_done += 1
        return norm, applied

    @property
    def last_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def memory_and_mfu(self, batch: list[Sequence], elapsed: float) -> dict[str, float]:
        if self.env.device.type != "cuda":
            return {"peak_mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
        out = {"peak_mem_gib": torch.cuda.max_memory_allocated(self.env.device) / 2**30}
        name = torch.cuda.get_device_name(self.env.device)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        if peak is not None:
            out["mfu"] = self.step_flops(batch) / (elapsed * peak * self.env.world_size)
        return out

    def step_flops(self, batch: list[Sequence]) -> float:
        """Model FLOPs of forward+backward: 6 * matmul params * tokens + causal attention 6 * layers * d * sum L^2
        (recomputation by activation checkpointing is not counted, as MFU conventions require)."""
        cfg = self.policy.causal_lm.config
        # Llama/Qwen3 configs carry head_dim; in Qwen2 it is hidden_size / heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        d_attn = cfg.num_attention_heads * head_dim
        tokens = sum(s.packed_len for s in batch)
        squares = sum(s.packed_len ** 2 for s in batch)
        return 6.0 * self.flop_params * tokens + 6.0 * cfg.num_hidden_layers * d_attn * squares
