"""Rollout: prompts -> n samples each (in-process sampler) -> verifier rewards -> informative groups -> the
training sequences of one online step, with the per-sequence / per-token fields each objective reads.

Dynamic sampling (`ObjectiveSpec.group_filter`): generation batches of `gen_batch_prompts` prompts are drawn until
`prompts_per_step` groups have mixed rewards (0 < correct < n) or `max_gen_batches` batches were drawn; the step
trains on the informative groups found (the first `prompts_per_step`). Every rank samples its share of each batch;
rank 0 verifies and broadcasts the scores, so all ranks build the same batch. Seeds follow the prompt position in
the stream, so a resumed run samples exactly what the uninterrupted one would have.

Rewards (`reward.*`): the pool's score per sample, the verifier's 0/1 correctness unless reward functions or
weights make it something else. A sample is positive when its score is >= `reward.positive_threshold`. Samples of
reference rows (`Problem.verifiable` false, data.answers reference or mixed) are not verified: they score 0 and
leave rollout/accuracy and rollout/reward_mean, which are means over the verified samples.

Sequences, by the objective's builder (`ObjectiveSpec.sequences`, docs/objectives.md): `rewards` gives every sample
its 0/1 reward (positive or not) and the group's `correct_rate`; `advantages` gives it `advantages` from
`objectives.group_advantages` (the spec's estimator) of the scores themselves when they are not 0/1, else of the
0/1 (or +-1) rewards, plus the overlong penalty when the spec asks for it; `contrast_pair` keeps one positive and one
negative per prompt with advantages of the +-1 rewards of the whole group; `gold_answer` appends the gold answer
after each sampled chain of thought, cut at `rollout.answer_start` (`cot_mask`, `answer_mask`, `valid` = format
check).

rollout.mask_truncated: truncated samples are dropped from the step's sequences after the group statistics
(advantages, r_hat) are computed from all samples, so they leave the loss and every normaliser (token and
sequence counts); a contrast pair is picked among the untruncated samples, a gold-answer group is its untruncated
samples.

Every sequence keeps the sampler's log-prob of each sampled token as the per-token field `behavior_logp` (both
backends return them: log-softmax at the sampling temperature); an appended gold answer was not sampled, so those
sequences also carry `sampled` (1 on the chain of thought, 0 on the answer) and 0 as the answer's behaviour
log-prob.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from twofold.engine.run.schema import RewardConfig, RolloutConfig
from twofold.engine.data.loading import BatchStream
from twofold.engine.train.packing import Sequence
from twofold.engine.rollout.sampler import GenerationParams, Sample, Sampler, sample_distributed
from twofold.engine.data.tasks import Problem
from twofold.engine.verifier import VerifierPool, math_rewards, overlong_penalty
from twofold.engine.verifier.pool import RewardBatch, RewardFunctionError
from twofold.objectives import ObjectiveSpec, get_spec, group_advantages


@dataclass
class Group:
    problem: Problem
    samples: list[Sample]
    correct: list[float]
    """The pool's score of each sample (0/1 correctness, or the configured reward)."""
    threshold: float = 0.5
    """reward.positive_threshold: a score >= this is a positive sample."""

    @property
    def positives(self) -> list[bool]:
        return [c >= self.threshold for c in self.correct]

    @property
    def informative(self) -> bool:
        """Positives and negatives both present (what the binary objectives and the 0/1 GRPO family learn from)."""
        return 0 < sum(self.positives) < len(self.correct)

    @property
    def rewards_differ(self) -> bool:
        return max(self.correct) > min(self.correct)


@dataclass
class RolloutStats:
    gen_batches: int = 0
    prompts: int = 0
    samples: int = 0
    checked: int = 0
    """Samples of verifiable rows (reference rows are not scored): the denominator of the score means."""
    correct: float = 0.0
    """Positive samples (score >= reward.positive_threshold), of verifiable rows."""
    reward: float = 0.0
    """Sum of the scores of verifiable rows."""
    verified: int = 0
    """Samples the answer check judged (all of them unless reward.verifier_weight=0 with reward functions)."""
    verified_correct: float = 0.0
    """Of those, the ones it judged correct: rollout/accuracy, whatever the reward functions add."""
    informative: int = 0
    response_tokens: int = 0
    truncated: int = 0
    verifier_timeouts: int = 0
    no_answer: int = 0
    generate_s: float = 0.0
    verify_s: float = 0.0
    functions: dict[str, dict] = field(default_factory=dict)
    """Per reward function: {"sum", "values", "calls", "errors", "first_error"} of this step's calls."""
    extra: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        n, checked = max(self.samples, 1), max(self.checked, 1)
        accuracy = {"rollout/accuracy": self.verified_correct / self.verified} if self.verified else {}
        terms = {}
        for name, f in self.functions.items():  # TRL logs one mean per reward function too
            terms |= {f"reward/{name}/mean": f["sum"] / max(f["values"], 1), f"reward/{name}/errors": f["errors"]}
        return {**accuracy, "rollout/positive_frac": self.correct / checked, "rollout/reward_mean": self.reward / checked,
                "rollout/verified_frac": self.checked / n,
                "rollout/informative_groups": self.informative,
                "rollout/prompts": self.prompts, "rollout/gen_batches": self.gen_batches,
                "rollout/response_len": self.response_tokens / n, "rollout/truncated_frac": self.truncated / n,
                "rollout/verifier_timeouts": self.verifier_timeouts, "rollout/no_answer": self.no_answer,
                "time/generate_s": self.generate_s, "time/verify_s": self.verify_s,
                "rollout/generate_tokens_per_s": self.response_tokens / max(self.generate_s, 1e-9), **terms,
                **self.extra}

    def add(self, batch: RewardBatch) -> None:
        """Count the verdicts and each reward function's values and failures of one verified batch."""
        verdicts = [c for c in batch.correct if c is not None]
        self.verified += len(verdicts)
        self.verified_correct += sum(verdicts)
        for name, values in batch.values.items():
            f = self.functions.setdefault(name, {"sum": 0.0, "values": 0, "calls": 0, "errors": 0,
                                                 "first_error": None})
            ok = [v for v in values if v is not None]
            f["sum"], f["values"] = f["sum"] + sum(ok), f["values"] + len(ok)
            f["calls"], f["errors"] = f["calls"] + batch.calls[name], f["errors"] + len(batch.errors[name])
            f["first_error"] = f["first_error"] or next(iter(batch.errors[name]), None)


def verify_groups(pool: VerifierPool, problems: list[Problem], groups: list[list[Sample]], timeout: float,
                  stats: RolloutStats) -> list[list[float]]:
    """Scores of every sample; rank 0 checks, everyone receives (a timeout must not differ between ranks). Samples
    of reference rows are not verified and score 0."""
    start = time.perf_counter()
    payload: list = [None]
    checked = [(p, g) for p, g in zip(problems, groups) if p.verifiable]
    if not dist.is_initialized() or dist.get_rank() == 0:
        texts = [s.text for _, g in checked for s in g]
        golds = [p.answer for p, g in checked for _ in g]
        before = pool.stats.as_dict()
        batch = pool.reward_batch(texts, golds, timeout=timeout)
        after = pool.stats.as_dict()
        payload = [(batch, after["timeouts"] - before["timeouts"], after["no_answer"] - before["no_answer"])]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    batch, timeouts, no_answer = payload[0]
    stats.verifier_timeouts += timeouts
    stats.no_answer += no_answer
    stats.verify_s += time.perf_counter() - start
    stats.add(batch)
    flat = batch.scores
    scores, position = [], 0
    for p, g in zip(problems, groups):
        scores.append(flat[position:position + len(g)] if p.verifiable else [0.0] * len(g))
        position += len(g) if p.verifiable else 0
    return scores


def merged(totals: dict[str, dict], step: dict[str, dict]) -> dict[str, dict]:
    """Reward-function call and failure counts of `totals` plus those of `step`."""
    out = {}
    for name in {**totals, **step}:
        a, b = totals.get(name, {}), step.get(name, {})
        out[name] = {"calls": a.get("calls", 0) + b.get("calls", 0), "errors": a.get("errors", 0) + b.get("errors", 0),
                     "first_error": a.get("first_error") or b.get("first_error")}
    return out


def check_reward_errors(totals: dict[str, dict], max_error_frac: float) -> None:
    """Stop the run once a reward function's failed calls pass reward.max_error_frac of its calls so far."""
    for name, f in totals.items():
        if f["errors"] and f["errors"] > max_error_frac * f["calls"]:
            raise RewardFunctionError(
                f"reward function {name} failed on {f['errors']} of its {f['calls']} calls so far "
                f"({f['errors'] / f['calls']:.0%} > reward.max_error_frac={max_error_frac:g}); first error: "
                f"{f['first_error']}. Fix the function (its traceback is in the log above) or raise "
                "reward.max_error_frac")


class RolloutCollector:
    """Draws prompts from a resumable stream and returns the step's groups (dynamic sampling included)."""

    def __init__(self, sampler: Sampler, pool: VerifierPool, cfg: RolloutConfig, objective: str,
                 verifier_timeout: float, seed: int, reward: RewardConfig | None = None):
        self.sampler, self.pool, self.cfg = sampler, pool, cfg
        self.verifier_timeout, self.seed = verifier_timeout, seed
        self.reward = reward or RewardConfig()
        self.function_totals: dict[str, dict] = {}
        """Every reward function's calls and failures in this invocation, against reward.max_error_frac."""
        spec = get_spec(objective)
        self.filter = spec.group_filter == "mixed" or (cfg.dynamic_sampling and spec.group_filter == "dynamic")
        # advantages of graded rewards are informative in any group whose rewards differ
        self.graded = spec.sequences == "advantages" and not binary(self.reward)

    def informative(self, group: Group) -> bool:
        return group.rewards_differ if self.graded else group.informative

    def params(self, position: int) -> GenerationParams:
        # prompt i of this batch gets seed + i * n: unique per stream position, identical after a resume
        base = self.seed * 1_000_003 + position * self.cfg.samples_per_prompt
        return GenerationParams(n=self.cfg.samples_per_prompt, temperature=self.cfg.temperature,
                                top_p=self.cfg.top_p, top_k=self.cfg.top_k, max_new_tokens=self.cfg.max_new_tokens,
                                seed=base, logprobs=True, kept=replays_kept(self.cfg))

    def collect(self, stream: BatchStream) -> tuple[list[Group], RolloutStats]:
        stats, kept = RolloutStats(), []
        while stats.gen_batches < self.cfg.max_gen_batches and len(kept) < self.cfg.prompts_per_step:
            position = stream.consumed
            problems: list[Problem] = stream.next_batch()
            start = time.perf_counter()
            samples = sample_distributed(self.sampler, [list(p.prompt_ids) for p in problems],
                                         self.params(position))
            stats.generate_s += time.perf_counter() - start
            scores = verify_groups(self.pool, problems, samples, self.verifier_timeout, stats)
            check_reward_errors(merged(self.function_totals, stats.functions), self.reward.max_error_frac)
            groups = [Group(p, s, c, self.reward.positive_threshold) for p, s, c in zip(problems, samples, scores)]
            self.count(groups, stats)
            kept += [g for g in groups if self.informative(g) or not self.filter]
            if not self.filter:
                break
        stats.informative = sum(self.informative(g) for g in kept)
        self.function_totals = merged(self.function_totals, stats.functions)
        return kept[:self.cfg.prompts_per_step], stats

    @staticmethod
    def count(groups: list[Group], stats: RolloutStats) -> None:
        stats.gen_batches += 1
        stats.prompts += len(groups)
        for g in groups:
            stats.samples += len(g.samples)
            stats.response_tokens += sum(len(s.token_ids) for s in g.samples)
            stats.truncated += sum(s.truncated for s in g.samples)
            if g.problem.verifiable:
                stats.checked += len(g.samples)
                stats.correct += sum(g.positives)
                stats.reward += sum(g.correct)


# ---- groups -> training sequences ------------------------------------------------------------------------------

def binary(reward: RewardConfig) -> bool:
    """Scores are the verifier's 0/1 correctness (no reward functions, weight 1)."""
    return not reward.functions and reward.verifier_weight == 1.0


def build_sequences(objective: str, groups: list[Group], cfg: RolloutConfig, tokenizer,
                    reward: RewardConfig | None = None) -> list[Sequence]:
    """The step's training sequences with the fields `objective` reads (group_ids = index of the group), by its
    spec's builder (`ObjectiveSpec.sequences`)."""
    spec = get_spec(objective)
    return BUILDERS[spec.sequences](spec, groups, cfg, tokenizer, reward)


def reward_sequences(spec: ObjectiveSpec, groups: list[Group], cfg: RolloutConfig, tokenizer,
                     reward: RewardConfig | None) -> list[Sequence]:
    """Every sample with its 0/1 reward (positive or not) and its group's `correct_rate`."""
    seqs = []
    for gid, g in enumerate(groups):
        rate = sum(g.positives) / len(g.correct)
        for j, (sample, positive) in enumerate(zip(g.samples, g.positives)):
            fields = {"group_ids": gid, "rewards": float(positive), "correct_rate": rate}
            seqs.append(sample_sequence(g.problem, sample, j, fields))
    return untruncated(seqs, groups, cfg.mask_truncated)


def advantage_sequences(spec: ObjectiveSpec, groups: list[Group], cfg: RolloutConfig, tokenizer,
                        reward: RewardConfig | None) -> list[Sequence]:
    """Every sample with the group advantage (`spec.advantage`) of its shaped reward: the score itself when scores
    are graded, else the 0/1 (or +-1) reward, plus the overlong penalty when the spec asks for it."""
    graded = reward is not None and not binary(reward)
    seqs, rewards = [], []
    for gid, g in enumerate(groups):
        for j, (sample, correct, positive) in enumerate(zip(g.samples, g.correct, g.positives)):
            seqs.append(sample_sequence(g.problem, sample, j, {"group_ids": gid}))
            rewards.append(shaped_reward(correct if graded else float(positive), len(sample.token_ids), cfg,
                                         graded, spec.overlong_penalty))
    ids = torch.tensor([s.fields["group_ids"] for s in seqs], dtype=torch.long)  # int64 when empty too
    advantages = group_advantages(torch.tensor(rewards, dtype=torch.float64), ids, spec.advantage)
    for s, a in zip(seqs, advantages.tolist()):
        s.fields["advantages"] = a
    return untruncated(seqs, groups, cfg.mask_truncated)


def untruncated(seqs: list[Sequence], groups: list[Group], mask_truncated: bool) -> list[Sequence]:
    """With mask_truncated, the sequences (one per sample, in group order) whose sample was not truncated."""
    if not mask_truncated:
        return seqs
    truncated = [s.truncated for g in groups for s in g.samples]
    return [seq for seq, cut in zip(seqs, truncated, strict=True) if not cut]


def shaped_reward(correct: float, length: int, cfg: RolloutConfig, graded: bool = False,
                  overlong: bool = False) -> float:
    """Correctness reward (1 / rollout.negative_reward; a graded score as it is) plus, with `overlong`, DAPO's
    overlong penalty."""
    penalty = 0.0
    if overlong and cfg.overlong_buffer:
        penalty = overlong_penalty(length, cfg.max_new_tokens, cfg.overlong_buffer)
    return (correct if graded else math_rewards([correct], negative=cfg.negative_reward)[0]) + penalty


def replays_kept(cfg: RolloutConfig) -> bool:
    """Top-k or top-p sampling: the sampler records each token's kept set and the trainer renormalises to it
    (unless `rollout.replay_kept_set` is false)."""
    return cfg.replay_kept_set and (cfg.top_k > 0 or cfg.top_p < 1)


def sample_sequence(problem: Problem, sample: Sample, index: int, fields: dict) -> Sequence:
    prompt = list(problem.prompt_ids)
    return Sequence(prompt + list(sample.token_ids), len(prompt), row_id=f"{problem.row_id}/{index}",
                    fields=dict(fields), token_fields=behavior_fields(sample, len(sample.token_ids)),
                    kept=sample.kept)


def behavior_fields(sample: Sample, sampled: int, appended: int = 0) -> dict[str, list[float]]:
    """{"behavior_logp"} of the first `sampled` tokens (+ `sampled` and 0 for `appended` tokens that were not
    sampled); {} for a sample generated without log-probs."""
    if sample.logprobs is None:
        return {}
    if len(sample.logprobs) != len(sample.token_ids):
        raise ValueError(f"sample of prompt {sample.prompt_index} has {len(sample.logprobs)} log-probs for "
                         f"{len(sample.token_ids)} tokens")
    fields = {"behavior_logp": list(sample.logprobs[:sampled]) + [0.0] * appended}
    if appended:
        fields["sampled"] = [1.0] * sampled + [0.0] * appended
    return fields


def contrast_pair_sequences(spec: ObjectiveSpec, groups: list[Group], cfg: RolloutConfig, tokenizer,
                            reward: RewardConfig | None) -> list[Sequence]:
    """One positive and one negative per (mixed) group; advantages (`spec.advantage`, OREAL: RLOO) of the group's
    +-1 rewards. With mask_truncated the pair comes from the untruncated samples (a group without one on either
    side is dropped)."""
    seqs = []
    for gid, g in enumerate(groups):
        pm = torch.tensor([1.0 if positive else -1.0 for positive in g.positives], dtype=torch.float64)
        adv = group_advantages(pm, torch.zeros(len(pm), dtype=torch.long), spec.advantage).tolist()
        usable = [i for i, s in enumerate(g.samples) if not (cfg.mask_truncated and s.truncated)]
        picks = [next((i for i in usable if pm[i] == want), None) for want in (1.0, -1.0)]
        if None in picks:
            continue
        for want, j in zip((1.0, -1.0), picks):
            seqs.append(sample_sequence(g.problem, g.samples[j], j, {"group_ids": gid, "rewards": float(want > 0),
                                                                      "advantages": adv[j]}))
    return seqs


def jepo_sequences(spec: ObjectiveSpec, groups: list[Group], cfg: RolloutConfig, tokenizer,
                   reward: RewardConfig | None = None) -> list[Sequence]:
    """prompt + chain of thought (the sampled tokens up to `rollout.answer_start`) + gold answer + EOS. A sample
    without the delimiter fails the format check (valid 0, format reward -format_penalty, which the loss normalises
    like the advantage); a group needs >= 2 valid samples for the leave-one-out baseline, else none of it is
    valid. Verifiable and reference rows alike: JEPO learns from the reference answer's likelihood."""
    seqs = []
    for gid, g in enumerate(groups):
        kept = [j for j, s in enumerate(g.samples) if not (cfg.mask_truncated and s.truncated)]
        parts = {j: answer_parts(g.samples[j], g.problem.answer, tokenizer, cfg.answer_start, cfg.answer_end)
                 for j in kept}
        enough = sum(valid for _, _, valid in parts.values()) >= 2
        for j, (cot, answer, valid) in parts.items():
            if g.samples[j].kept is not None:
                raise ValueError("rollout.top_k / top_p < 1 replay the sampler's kept sets, and the answer tokens "
                                 "this objective appends were never sampled: set rollout.top_p=1 and top_k=0")
            ok = valid and enough
            prompt = list(g.problem.prompt_ids)
            cot_mask = [1.0] * len(cot) + [0.0] * len(answer)
            seqs.append(Sequence(prompt + cot + answer, len(prompt), row_id=f"{g.problem.row_id}/{j}",
                                 fields={"group_ids": gid, "valid": float(ok),
                                         "format_rewards": 0.0 if valid else -cfg.format_penalty},
                                 token_fields={"cot_mask": cot_mask, "answer_mask": [1 - x for x in cot_mask],
                                               **behavior_fields(g.samples[j], len(cot), len(answer))}))
    return seqs


def answer_parts(sample: Sample, gold: str, tokenizer, start: str = "\\boxed{", end: str = "}"
                 ) -> tuple[list[int], list[int], bool]:
    """(CoT token ids, appended answer token ids, format ok): the sample up to and including its last `start`
    (format ok when `end` follows it), then gold + end + EOS; without `start`, the whole sample and then
    start + gold + end + EOS."""
    eos = tokenizer.eos_token_id
    ids = [t for t in sample.token_ids if t != eos]
    at = sample.text.rfind(start)
    if at < 0 or (end and sample.text.find(end, at + len(start)) < 0):
        answer = tokenizer(f"{start}{gold}{end}", add_special_tokens=False).input_ids
        return ids or [eos], answer + [eos], False
    cot = token_prefix(ids, at + len(start), tokenizer)
    answer = tokenizer(f"{gold}{end}", add_special_tokens=False).input_ids
    return cot, answer + [eos], True


def token_prefix(ids: list[int], chars: int, tokenizer) -> list[int]:
    """The shortest prefix of `ids` whose text covers the first `chars` characters (binary search)."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=True)) >= chars:
            hi = mid
        else:
            lo = mid + 1
    return ids[:lo]


# ObjectiveSpec.sequences -> its builder: (spec, groups, rollout config, tokenizer, reward config) -> sequences
BUILDERS = {"rewards": reward_sequences, "advantages": advantage_sequences, "contrast_pair": contrast_pair_sequences,
            "gold_answer": jepo_sequences}
