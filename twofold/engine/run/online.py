"""The online loop (the objectives whose `ObjectiveSpec.modes` hold `online`): one rollout step =

    sample n per prompt (in-process sampler) -> verify -> dynamic sampling -> training sequences
    -> mini-batches of whole groups, each planned and packed once (`Trainer.pack`); every pass below writes its
       per-token values into those packed micro-batches as [N] tensors
    -> old log-probs (trainer weights, when a rollout feeds more than one update or a correction needs them)
    -> reference log-probs (the frozen initial policy, `model.build_reference`, only when the spec needs them and
       the objective's KL coefficient is > 0)
    -> [spec needs token_rm: one token-RM update on the batch, then its token scores]
    -> mismatch metrics and the rollout correction (sampler vs trainer log-probs, `engine.correction`)
    -> ppo_epochs x mini_batches optimizer steps on those packed mini-batches -> weight sync into the sampler
    -> canary

All trainer log-probs (policy, old, reference) are at `rollout.temperature`, the distribution that was sampled.
`train.steps` counts rollout steps. Every step logs the time split (generate / verify / old_logp / train / sync),
training and generation tokens/s, the mismatch metrics, and MFU on GPU. The weight-sync canary (every
`sampler.canary_every` syncs) samples a few fixed prompts and scores them with the trainer: a large gap means the
sampler runs other weights than the trainer (a stale or half-finished sync), and the run stops. Checkpoints hold
the policy, optimizer, schedule, the prompt stream position, the rollout step and the token RM; with seeds tied to
stream positions, a resumed run repeats the uninterrupted one.
"""
from __future__ import annotations

import inspect
import logging
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from twofold.engine.train.checkpoint import export_hf, save_checkpoint
from twofold.engine.run.config import (answers_mode, correction_mode, learns_from_reference, objective_kwargs,
                                       optimizer_steps, to_yaml, updates_per_step)
from twofold.engine.run.schema import Config
from twofold.engine.rollout.correction import correct_micro, log_ratios, micro_ratios, mismatch_metrics
from twofold.engine.data.loading import BatchStream, Fields
from twofold.engine.train.distributed import DistEnv
from twofold.engine.run.eval import evaluate
from twofold.engine.train.model import build_policy, build_reference, load_hf_config
from twofold.engine.train.packing import PackedBatch, Sequence
from twofold.engine.rollout.build import RolloutCollector, build_sequences, replays_kept
from twofold.engine.rollout.backends import build_sampler
from twofold.engine.rollout.sampler import GenerationParams, Sampler, quiet_vllm, sample_distributed, write_model_dir
from twofold.engine.data.tasks import load_problems
from twofold.engine.rollout.token_rm import TokenRewardModel
from twofold.engine.run.tracking import Tracker
from twofold.engine.train.trainer import Trainer, score_packed, sequence_logprobs
from twofold.engine.verifier import VerifierPool, build_pool
from twofold.engine.rollout.weight_sync import sync_weights
from twofold.objectives import get_spec

log = logging.getLogger("twofold")


def needs_old_logp(config: Config) -> bool:
    """The trainer's log-probs under the sampling weights, before any update: the ratios' old log-probs when one
    rollout feeds several updates (otherwise old = sg[current] exactly, and the mismatch metrics come from the
    update's own forward), and the input of a rollout correction."""
    return updates_per_step(config) > 1 or (config.train.mode == "online" and correction_mode(config) != "none")


class CanaryError(RuntimeError):
    """The sampler's log-probs of the canary prompts are far from the trainer's: its weights are not the
    trainer's."""


def needs_ref_logp(config: Config) -> bool:
    """The objective's spec needs the reference's per-token log-probs and its KL coefficient `beta` is > 0."""
    spec = get_spec(config.objective.name)
    if "reference" not in spec.needs:
        return False
    return float(config.objective.kwargs.get("beta", inspect.signature(spec.loss).parameters["beta"].default)) > 0


def sampler_model_dir(config: Config, tokenizer) -> str:
    """A model path the sampler can read: the checkpoint itself, or config + tokenizer for a preset (weights
    always arrive by sync)."""
    if config.model.path:
        return config.model.path
    return write_model_dir(load_hf_config(config.model), tokenizer, Path(config.run_dir) / "sampler_model")


def resident_mib() -> float | None:
    """This process's resident set now (Linux: /proc/self/status VmRSS), in MiB; None where that is unknown."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return None


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: /proc, 10 ms resolution); None where that is unknown."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime: clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


class StartupClock:
    """Where an online run's start-up goes: consecutive phases (`lap`), logged once as one line after the first
    step (which adds its rollout) and written into that step's metrics row as `startup/<phase>_s`, with the
    resident set at the end of each phase as `startup/<phase>_rss_mib`."""

    LABELS = {"process": "process start to the run (imports, config, tokenizer, any earlier stage)",
              "sampler": "sampler engine", "data": "verifier + prompts", "policy": "policy + optimizer",
              "reference": "reference", "token_rm": "token RM", "resume": "resume", "first_sync": "first weight sync",
              "canary": "its canary", "eval": "eval before training"}

    def __init__(self):
        self.times: dict[str, float] = {}
        self.rss: dict[str, float | None] = {}
        age = process_age_s()
        if age is not None:
            self.times["process"], self.rss["process"] = age, resident_mib()
        self.last = time.perf_counter()

    def lap(self, phase: str, **parts: float) -> None:
        """The time since the last lap is `phase`'s, less the named `parts` of it (their own phases)."""
        now = time.perf_counter()
        self.times[phase] = now - self.last - sum(parts.values())
        self.times |= parts
        self.rss[phase] = resident_mib()
        self.last = now

    def metrics(self) -> dict[str, float]:
        rss = {f"startup/{phase}_rss_mib": mib for phase, mib in self.rss.items() if mib is not None}
        return {f"startup/{phase}_s": seconds for phase, seconds in self.times.items()} | rss | {
            "startup/total_s": sum(self.times.values())}

    def line(self, first_rollout_s: float) -> str:
        parts = ", ".join(f"{self.LABELS[phase]} {seconds:.1f} s" for phase, seconds in self.times.items())
        return (f"start-up {sum(self.times.values()):.1f} s to the first step: {parts}; then the first rollout "
                f"{first_rollout_s:.1f} s")


class OnlineRun:
    def __init__(self, config: Config, env: DistEnv, tokenizer, sampler: Sampler | None = None,
                 pool: VerifierPool | None = None):
        self.clock = StartupClock()
        answers = answers_mode(config)
        if answers != "verifiable" and not learns_from_reference(config.objective.name):
            raise ValueError(f"data.answers={answers} keeps rows no verifier scores, which objective "
                             f"{config.objective.name!r} cannot learn from (it needs rewards); use an objective "
                             "that learns from the reference answer's likelihood (jepo) or data.answers=verifiable")
        self.config, self.env, self.tokenizer = config, env, tokenizer
        data = config.data
        self.budget, self.pad = data.max_tokens_per_microbatch, tokenizer.pad_token_id or 0
        self.own_sampler, self.own_pool = sampler is None, pool is None and env.is_main
        self.sampler, self.pool = sampler, pool
        try:
            self._build(config, env, tokenizer, answers)
        except BaseException:
            # the verifier workers and the vLLM engine must stop now, while the process groups the engine's
            # shutdown destroys still exist: left to interpreter exit, it raises after our error line
            self.close()
            raise

    def _build(self, config: Config, env: DistEnv, tokenizer, answers: str) -> None:
        data, seed, sampler = config.data, config.train.seed, self.sampler
        if self.own_pool:
            self.pool = build_pool(config)
        # the prompts before the sampler engine (15-45 s): a data error ends the run before it starts
        fields, max_prompt = Fields.from_config(data), config.sampler.max_model_len
        # the built-in check scores 0 against a gold answer it cannot parse: such rows are skipped and counted
        golds = self.check_golds if config.verifier.check == "twofold" and config.reward.verifier_weight > 0 else None
        self.problems = load_problems(data.path, tokenizer, fields, max_prompt, data.format, check_golds=golds,
                                      split=data.split, answers=answers)
        self.eval_problems = (load_problems(config.eval.path, tokenizer, fields, max_prompt, data.format,
                                            config.eval.max_prompts, golds, data.split, answers).problems
                              if config.eval.path else [])
        batch_prompts = config.rollout.gen_batch_prompts or config.rollout.prompts_per_step
        self.stream = BatchStream(self.problems.problems, batch_prompts, data.shuffle, seed)
        self.clock.lap("data")
        if sampler is None and not config.log.verbose:
            quiet_vllm()
        self.sampler = sampler or build_sampler(config.sampler, sampler_model_dir(config, tokenizer), env.rank)
        self.clock.lap("sampler")
        self.policy = build_policy(config.model, env, seed=seed)
        self.temperature = config.rollout.temperature
        self.trainer = Trainer(self.policy, env, config.optim, objective=config.objective.name,
                               objective_kwargs=objective_kwargs(config), total_steps=optimizer_steps(config),
                               max_tokens_per_microbatch=self.budget, pad_token_id=self.pad,
                               head=config.train.head, temperature=self.temperature)
        self.clock.lap("policy")
        self.ref = None
        if needs_ref_logp(config):
            self.ref = build_reference(config.model, env, self.policy)  # before any update or resume
            self.clock.lap("reference")
        self.token_rm = None
        if "token_rm" in get_spec(config.objective.name).needs and config.rollout.token_rm:
            self.token_rm = TokenRewardModel(config.model, env, config.rollout.token_rm_lr, seed, self.budget, self.pad)
            self.clock.lap("token_rm")
        self.collector = RolloutCollector(self.sampler, self.pool, config.rollout, config.objective.name,
                                          config.verifier.timeout, seed, config.reward)
        self.rollout_steps = 0
        self.syncs = 0

    def check_golds(self, golds: list[str]) -> list[str | None]:
        """Rank 0's verifier workers parse the gold answers (under its timeout); every rank gets the same verdicts,
        so that all ranks keep the same prompts."""
        verdicts = [self.pool.check_golds(golds) if self.env.is_main else None]
        if self.env.world_size > 1:
            dist.broadcast_object_list(verdicts, src=0)
        return verdicts[0]

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def extras(self) -> dict:
        return {"token_rm": (self.token_rm.model, self.token_rm.optimizer)} if self.token_rm else {}

    def save(self) -> None:
        state = {"prompts": self.stream.state_dict(), "rollout_steps": self.rollout_steps}
        save_checkpoint(self.config.run_dir, self.trainer, state, self.config.checkpoint.keep_last, self.extras(),
                        step=self.rollout_steps, tokenizer=self.tokenizer, run_config=to_yaml(self.config))

    def load(self, resume: Callable[[dict], tuple[Path, dict] | None]) -> None:
        """`resume(extras)` loads the newest intact checkpoint into the trainer and extras (train.resume)."""
        resumed = resume(self.extras())
        if resumed is None:
            return
        path, state = resumed
        self.stream.load_state_dict(state["prompts"])
        self.rollout_steps = state["rollout_steps"]
        log.info("resumed from %s at rollout step %d", path, self.rollout_steps)

    # ---- one rollout step ----------------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        start = time.perf_counter()
        groups, stats = self.collector.collect(self.stream)
        metrics = {"step": self.rollout_steps + 1, **stats.metrics()}  # 1..N, as offline
        batch = build_sequences(self.config.objective.name, groups, self.config.rollout, self.tokenizer,
                                self.config.reward)
        # one plan and one pack per mini-batch for the whole step: every pass below reads and extends these
        packs = [self.trainer.pack(mini) for mini in split_groups(batch, self.config.rollout.mini_batches)]
        if self.token_rm is not None and packs:  # first, so that its scores already reflect this batch
            metrics |= self.token_rm.update([mb for p in packs for mb in p.micro], len(batch))
        t = time.perf_counter()
        self.add_token_fields(packs)
        behavior = bool(batch) and "behavior_logp" in batch[0].token_fields
        off_policy = needs_old_logp(self.config)
        if behavior and off_policy:
            metrics |= self.correct(packs)
        metrics["time/old_logp_s"] = time.perf_counter() - t
        t = time.perf_counter()
        on_policy = behavior and not off_policy
        self.trainer.keep_logp = on_policy  # the first (only) update's forward scores the sampling weights
        metrics |= self.train(packs)
        if on_policy and self.trainer.step_logp:  # the update ran, on the one mini-batch
            metrics |= self.mismatch([r for mb, logp in zip(packs[0].micro, self.trainer.step_logp)
                                      for r in micro_ratios(mb, logp)])
        self.trainer.keep_logp, self.trainer.step_logp = False, []
        metrics["time/train_s"] = time.perf_counter() - t
        metrics |= self.sync()
        metrics["step_time_s"] = time.perf_counter() - start
        self.rollout_steps += 1
        return metrics

    def add_token_fields(self, packs: list[PackedBatch]) -> None:
        """No-grad passes over the packed micro-batches: old log-probs, reference log-probs, token-RM scores, as
        [N] per-token fields of those micro-batches."""
        sources = {"old_logp": self.policy if needs_old_logp(self.config) else None, "ref_logp": self.ref}
        for packed in packs:
            for name, model in sources.items():
                if model is not None:
                    for mb, values in zip(packed.micro, score_packed(model, packed.micro, self.env,
                                                                     self.temperature)):
                        mb.token_fields[name] = values
            if self.token_rm is not None:
                for mb, values in zip(packed.micro, self.token_rm.packed_scores(packed.micro)):
                    mb.token_fields["token_scores"] = values

    # ---- sampler / trainer mismatch ------------------------------------------------------------------------------
    def mismatch(self, ratios: list[torch.Tensor], weights: list[torch.Tensor] | None = None) -> dict[str, float]:
        """The mismatch metrics over every rank's sequences (`ratios`, `weights`: this rank's)."""
        parts = [(ratios, weights)]
        if self.env.world_size > 1:
            parts = [None] * self.env.world_size
            dist.all_gather_object(parts, (ratios, weights))
        return mismatch_metrics([r for rs, _ in parts for r in rs],
                                None if weights is None else [w for _, ws in parts for w in ws])

    def correct(self, packs: list[PackedBatch]) -> dict[str, float]:
        """Mismatch metrics from the trainer's log-probs under the sampling weights (`old_logp`); with a
        correction, each micro-batch's [N] `is_weight` (a weight mode) or `correction_mask` (a rejection mask)."""
        r = self.config.rollout
        mode = correction_mode(self.config)
        ratios, weights = [], []
        for mb in (mb for packed in packs for mb in packed.micro):
            got, w = correct_micro(mb, mb.token_fields["old_logp"], mode, r.correction_c_low, r.correction_c_high)
            ratios += got
            weights += w or []
        return self.mismatch(ratios, None if mode == "none" else weights)

    # ---- weight sync and its canary --------------------------------------------------------------------------------
    def sync(self) -> dict[str, float]:
        t = time.perf_counter()
        stats = sync_weights(self.policy, self.sampler)
        self.syncs += 1
        out = {"time/sync_s": time.perf_counter() - t, "sync/bytes": stats.bytes}
        every = self.config.sampler.canary_every
        if every and (self.syncs - 1) % every == 0:
            t = time.perf_counter()
            out |= self.canary()
            out["time/canary_s"] = time.perf_counter() - t
        return out

    def canary(self) -> dict[str, float]:
        """Sample the first `canary_prompts` training prompts (fixed seed) and score the tokens with the trainer;
        warn above `sampler.canary_warn`, stop above `sampler.canary_stop` (largest per-token |r|)."""
        cfg = self.config.sampler
        problems = self.problems.problems[:cfg.canary_prompts]
        r = self.config.rollout
        params = GenerationParams(n=1, temperature=self.temperature, top_p=r.top_p, top_k=r.top_k,
                                  max_new_tokens=cfg.canary_tokens, seed=self.config.train.seed, logprobs=True,
                                  kept=replays_kept(r))
        samples = [g[0] for g in sample_distributed(self.sampler, [list(p.prompt_ids) for p in problems], params)]
        seqs = [Sequence(list(p.prompt_ids) + list(s.token_ids), len(p.prompt_ids), row_id=f"canary/{p.row_id}",
                         token_fields={"behavior_logp": list(s.logprobs)}, kept=s.kept)
                for p, s in zip(problems, samples)]
        scored = sequence_logprobs(self.policy, seqs, self.env, self.budget, self.pad, self.temperature)
        gap = mismatch_metrics(log_ratios(scored, [s.token_fields["behavior_logp"] for s in seqs]))
        worst = gap["mismatch/max_abs_logp_diff"]
        if worst > cfg.canary_stop:
            raise CanaryError(
                f"weight-sync canary after sync {self.syncs}: the sampler's log-probs differ from the trainer's by "
                f"up to {worst:.3g} per token (sampler.canary_stop={cfg.canary_stop}); the sampler is not running "
                "the trainer's weights (stale or partly loaded sync). Stopping before it generates a rollout.")
        if worst > cfg.canary_warn:
            log.warning("weight-sync canary after sync %d: sampler/trainer log-probs differ by up to %.3g per token "
                        "(sampler.canary_warn=%g)", self.syncs, worst, cfg.canary_warn)
        return {"canary/max_abs_logp_diff": worst, "canary/k3_kl": gap["mismatch/k3_kl"]}

    def train(self, packs: list[PackedBatch]) -> dict[str, float]:
        """ppo_epochs x mini_batches optimizer steps over the packed mini-batches of whole groups; metrics
        averaged over the updates. Sequences a correction dropped entirely leave their mini-batch, and a
        mini-batch left with no counted token makes no update."""
        out: dict[str, float] = {}
        frozen = self.rollout_steps < self.config.rollout.freeze_actor_steps
        if not frozen:
            packs = [p for p in packs if self.trainer.prepare(p)["num_tokens"] > 0]
        if not packs or frozen:
            return out | {"loss": 0.0, "grad_norm": 0.0, "lr": self.trainer.last_lr, "tokens": 0.0,
                          "tokens_per_s": 0.0, "skipped": 1.0, "actor_frozen": float(frozen)}
        updates = [self.trainer.step(packed) for _ in range(self.config.rollout.ppo_epochs) for packed in packs]
        for key in updates[0]:
            if key not in ("step", "lr"):
                out[key] = sum(u.get(key, 0.0) for u in updates) / len(updates)
        out |= {"lr": updates[0]["lr"], "optimizer_steps": float(self.trainer.steps_done),
                "tokens": sum(u["tokens"] for u in updates),
                "tokens_per_s": sum(u["tokens"] for u in updates) / sum(u["step_time_s"] for u in updates)}
        return out

    # ---- the run ---------------------------------------------------------------------------------------------------
    def run(self, resume: Callable[[dict], tuple[Path, dict] | None] | None = None) -> list[dict]:
        if resume is not None:
            self.load(resume)
            if self.rollout_steps:
                self.clock.lap("resume")
        first = self.sync()
        self.clock.lap("first_sync", **({"canary": first["time/canary_s"]} if "time/canary_s" in first else {}))
        cfg, history = self.config, []
        end = cfg.train.steps if not cfg.train.stop_after_steps else min(
            cfg.train.steps, self.rollout_steps + cfg.train.stop_after_steps)
        tracker = Tracker(cfg, self.env.is_main, self.rollout_steps)
        if self.eval_problems and self.rollout_steps == 0:
            tracker.log_eval(0, self.evaluate())
            self.clock.lap("eval")
        saved_at = self.rollout_steps
        while self.rollout_steps < end:
            metrics = self.step()
            if not history:
                metrics |= self.clock.metrics()
                if self.env.is_main:
                    log.info(self.clock.line(metrics["time/generate_s"]))
            history.append(metrics)
            tracker.log(metrics)
            if self.eval_due():
                tracker.log_eval(self.rollout_steps, self.evaluate())
            if cfg.checkpoint.every and self.rollout_steps % cfg.checkpoint.every == 0:
                self.save()
                saved_at = self.rollout_steps
        if saved_at != self.rollout_steps:
            self.save()
        tracker.close(plot=cfg.log.plot and self.rollout_steps >= cfg.train.steps)
        if self.rollout_steps >= cfg.train.steps and cfg.checkpoint.export_hf:
            export_hf(self.policy, self.tokenizer, Path(cfg.run_dir) / "hf", cfg.checkpoint.export_dtype)
        return history

    def eval_due(self) -> bool:
        every = self.config.eval.every
        done = self.rollout_steps >= self.config.train.steps
        return bool(self.eval_problems) and (done or (every > 0 and self.rollout_steps % every == 0))

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.sampler, self.pool, self.eval_problems, self.config, self.tokenizer, self.score)

    def score(self, seqs: list[Sequence]) -> list[list[float]]:
        """The policy's log-probs of the response tokens at temperature 1 (the held-out likelihood)."""
        return sequence_logprobs(self.policy, seqs, self.env, self.budget, self.pad)

    def close(self) -> None:
        """Stop the engine and the workers this run built (all, or those built before its construction failed)."""
        if self.own_sampler and self.sampler is not None:
            self.sampler.close()
        if self.own_pool and self.pool is not None:
            self.pool.close()


def split_groups(batch: list[Sequence], parts: int) -> list[list[Sequence]]:
    """`parts` mini-batches of whole groups (consecutive group ids), as even as the group count allows (none for
    an empty batch)."""
    ids = list(dict.fromkeys(s.fields["group_ids"] for s in batch))
    parts = min(parts, len(ids))
    chunks = [set(ids[i * len(ids) // parts:(i + 1) * len(ids) // parts]) for i in range(parts)]
    return [[s for s in batch if s.fields["group_ids"] in chunk] for chunk in chunks]
