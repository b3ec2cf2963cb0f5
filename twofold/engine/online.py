"""The online loop (NFT, RFT, GRPO, DAPO, Dr. GRPO, OREAL, JEPO): one rollout step =

    sample n per prompt (in-process sampler) -> verify -> dynamic sampling -> training sequences
    -> old log-probs (trainer weights, only when a rollout feeds more than one update)
    -> reference log-probs (frozen initial policy, only when the objective's KL coefficient is > 0)
    -> [OREAL: one token-RM update on the batch, then its token scores]
    -> ppo_epochs x mini_batches optimizer steps over whole groups -> weight sync into the sampler

`train.steps` counts rollout steps. Every step logs the time split (generate / verify / old_logp / train / sync),
training and generation tokens/s, and MFU on GPU. Checkpoints hold the policy, optimizer, schedule, the prompt
stream position, the rollout step and the token RM; with seeds tied to stream positions, a resumed run repeats the
uninterrupted one.
"""
from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from twofold.engine.checkpoint import export_hf, save_checkpoint
from twofold.engine.config import Config, objective_kwargs, optimizer_steps, updates_per_step
from twofold.engine.data import BatchStream, Fields
from twofold.engine.distributed import DistEnv
from twofold.engine.eval import evaluate
from twofold.engine.model import build_policy, load_hf_config
from twofold.engine.packing import Sequence
from twofold.engine.rollout import RolloutCollector, build_sequences
from twofold.engine.sampler import Sampler, build_sampler, write_model_dir
from twofold.engine.tasks import load_problems
from twofold.engine.token_rm import TokenRewardModel
from twofold.engine.tracking import Tracker
from twofold.engine.trainer import Trainer, sequence_logprobs
from twofold.engine.verifier import VerifierPool
from twofold.engine.weight_sync import sync_weights
from twofold.objectives import OBJECTIVES

log = logging.getLogger("twofold")


def needs_old_logp(config: Config) -> bool:
    """Ratios differ from 1 only when one rollout feeds several updates; otherwise old = sg[current] exactly."""
    params = inspect.signature(OBJECTIVES[config.objective.name]).parameters
    return "old_logp" in params and updates_per_step(config) > 1


def needs_ref_logp(config: Config) -> bool:
    params = inspect.signature(OBJECTIVES[config.objective.name]).parameters
    if "ref_logp" not in params:
        return False
    return float(config.objective.kwargs.get("beta", params["beta"].default)) > 0


def sampler_model_dir(config: Config, tokenizer) -> str:
    """A model path the sampler can read: the checkpoint itself, or config + tokenizer for a preset (weights
    always arrive by sync)."""
    if config.model.path:
        return config.model.path
    return write_model_dir(load_hf_config(config.model), tokenizer, Path(config.run_dir) / "sampler_model")


class OnlineRun:
    def __init__(self, config: Config, env: DistEnv, tokenizer, sampler: Sampler | None = None,
                 pool: VerifierPool | None = None):
        self.config, self.env, self.tokenizer = config, env, tokenizer
        data, seed = config.data, config.train.seed
        self.budget, self.pad = data.max_tokens_per_microbatch, tokenizer.pad_token_id or 0
        self.sampler = sampler or build_sampler(config.sampler, sampler_model_dir(config, tokenizer), env.rank)
        self.own_sampler, self.own_pool = sampler is None, pool is None and env.is_main
        tolerance = config.verifier.numeric_tolerance
        self.pool = pool if pool is not None or not env.is_main else VerifierPool(
            config.verifier.workers, config.verifier.timeout,
            check_kwargs={"numeric_tolerance": tolerance} if tolerance else None)
        fields, max_prompt = Fields.from_config(data), config.sampler.max_model_len
        self.problems = load_problems(data.path, tokenizer, fields, max_prompt, data.format,
                                      check_golds=self.check_golds)
        self.eval_problems = (load_problems(config.eval.path, tokenizer, fields, max_prompt, data.format,
                                            config.eval.max_prompts, self.check_golds).problems
                              if config.eval.path else [])
        batch_prompts = config.rollout.gen_batch_prompts or config.rollout.prompts_per_step
        self.stream = BatchStream(self.problems.problems, batch_prompts, data.shuffle, seed)
        self.policy = build_policy(config.model, env, seed=seed)
        self.trainer = Trainer(self.policy, env, config.optim, objective=config.objective.name,
                               objective_kwargs=objective_kwargs(config), total_steps=optimizer_steps(config),
                               max_tokens_per_microbatch=self.budget, pad_token_id=self.pad)
        self.ref = build_policy(config.model, env, seed=seed) if needs_ref_logp(config) else None
        self.token_rm = (TokenRewardModel(config.model, env, config.rollout.token_rm_lr, seed, self.budget, self.pad)
                         if config.objective.name == "oreal" and config.rollout.token_rm else None)
        self.collector = RolloutCollector(self.sampler, self.pool, config.rollout, config.objective.name,
                                          config.verifier.timeout, seed)
        self.rollout_steps = 0

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
                        step=self.rollout_steps)

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
        batch = build_sequences(self.config.objective.name, groups, self.config.rollout, self.tokenizer)
        if self.token_rm is not None and batch:
            metrics |= self.token_rm.update(batch)  # first, so that its scores already reflect this batch
        t = time.perf_counter()
        self.add_token_fields(batch)
        metrics["time/old_logp_s"] = time.perf_counter() - t
        t = time.perf_counter()
        metrics |= self.train(batch)
        metrics["time/train_s"] = time.perf_counter() - t
        t = time.perf_counter()
        sync = sync_weights(self.policy, self.sampler)
        metrics |= {"time/sync_s": time.perf_counter() - t, "sync/bytes": sync.bytes}
        metrics["step_time_s"] = time.perf_counter() - start
        self.rollout_steps += 1
        return metrics

    def add_token_fields(self, batch: list[Sequence]) -> None:
        """No-grad passes: old log-probs, reference log-probs, token-RM scores, as per-token fields."""
        if not batch:
            return
        sources = {"old_logp": self.policy if needs_old_logp(self.config) else None, "ref_logp": self.ref}
        for name, model in sources.items():
            if model is not None:
                for seq, values in zip(batch, sequence_logprobs(model, batch, self.env, self.budget, self.pad)):
                    seq.token_fields[name] = values
        if self.token_rm is not None:
            for seq, values in zip(batch, self.token_rm.scores(batch)):
                seq.token_fields["token_scores"] = values

    def train(self, batch: list[Sequence]) -> dict[str, float]:
        """ppo_epochs x mini_batches optimizer steps over whole groups; metrics averaged over the updates."""
        out: dict[str, float] = {}
        frozen = self.rollout_steps < self.config.rollout.freeze_actor_steps
        if not batch or frozen:
            return out | {"loss": 0.0, "grad_norm": 0.0, "lr": self.trainer.last_lr, "tokens": 0.0,
                          "tokens_per_s": 0.0, "skipped": 1.0, "actor_frozen": float(frozen)}
        updates = [self.trainer.step(mini) for _ in range(self.config.rollout.ppo_epochs)
                   for mini in split_groups(batch, self.config.rollout.mini_batches)]
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
        sync_weights(self.policy, self.sampler)
        cfg, history = self.config, []
        end = cfg.train.steps if not cfg.train.stop_after_steps else min(
            cfg.train.steps, self.rollout_steps + cfg.train.stop_after_steps)
        tracker = Tracker(cfg, self.env.is_main, self.rollout_steps)
        if self.eval_problems and self.rollout_steps == 0:
            tracker.log_eval(0, self.evaluate())
        saved_at = self.rollout_steps
        while self.rollout_steps < end:
            metrics = self.step()
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
        return evaluate(self.sampler, self.pool, self.eval_problems, self.config)

    def close(self) -> None:
        if self.own_sampler:
            self.sampler.close()
        if self.own_pool:
            self.pool.close()


def split_groups(batch: list[Sequence], parts: int) -> list[list[Sequence]]:
    """`parts` mini-batches of whole groups (consecutive group ids), as even as the group count allows."""
    ids = list(dict.fromkeys(s.fields["group_ids"] for s in batch))
    parts = min(parts, len(ids))
    chunks = [set(ids[i * len(ids) // parts:(i + 1) * len(ids) // parts]) for i in range(parts)]
    return [[s for s in batch if s.fields["group_ids"] in chunk] for chunk in chunks]
