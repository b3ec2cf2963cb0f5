"""Held-out evaluation: pass@1 with greedy decoding and the sampled avg@k (mean correctness of k samples at the
rollout temperature), scored by the verifier. Fixed seeds: the same weights always give the same numbers.

    python -m twofold.engine.eval CHECKPOINT DATA [--config C] [--out scores.json] [section.key=value ...]

scores a checkpoint (an HF directory, a Hub id or a step_* training checkpoint) on a dataset's prompts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from twofold.engine.config import Config
from twofold.engine.rollout import RolloutStats, verify_groups
from twofold.engine.sampler import GenerationParams, Sampler, sample_distributed
from twofold.engine.tasks import Problem
from twofold.engine.verifier import VerifierPool

EVAL_SEED = 1234


def pass_rate(sampler: Sampler, pool: VerifierPool, problems: list[Problem], params: GenerationParams,
              timeout: float, threshold: float = 0.5) -> float:
    """Mean over problems of the fraction of samples whose score is >= `threshold` (reward.positive_threshold)."""
    groups = sample_distributed(sampler, [list(p.prompt_ids) for p in problems], params)
    scores = verify_groups(pool, problems, groups, timeout, RolloutStats())
    return sum(sum(x >= threshold for x in s) / len(s) for s in scores) / len(scores)


def evaluate(sampler: Sampler, pool: VerifierPool, problems: list[Problem], config: Config) -> dict[str, float]:
    """{"eval/pass1_greedy": ..., "eval/avg@k": ..., "eval/time_s": ...} on the held-out problems."""
    start = time.perf_counter()
    ev, rollout = config.eval, config.rollout
    max_new = ev.max_new_tokens or rollout.max_new_tokens
    timeout, threshold = config.verifier.timeout, config.reward.positive_threshold
    out = {"eval/pass1_greedy": pass_rate(sampler, pool, problems, GenerationParams(
        temperature=0.0, max_new_tokens=max_new, seed=EVAL_SEED), timeout, threshold)}
    if ev.samples:
        sampled = GenerationParams(n=ev.samples, temperature=rollout.temperature, top_p=rollout.top_p,
                                   top_k=rollout.top_k, max_new_tokens=max_new, seed=EVAL_SEED)
        out[f"eval/avg@{ev.samples}"] = pass_rate(sampler, pool, problems, sampled, timeout, threshold)
    out["eval/time_s"] = time.perf_counter() - start
    return out


# ---- the command: score a checkpoint on a dataset ---------------------------------------------------------------

def evaluate_checkpoint(checkpoint: str | Path, config: Config, sampler: Sampler | None = None,
                        pool: VerifierPool | None = None) -> dict[str, float]:
    """Greedy pass@1 and avg@k of `checkpoint` (an HF directory, a Hub id or a step_* checkpoint, exported to a
    temporary HF directory first) on the prompts of `config.eval.path`. A given `sampler` (tests) gets the weights
    by sync; otherwise one is built that reads them from the directory."""
    from twofold.engine.data import Fields
    from twofold.engine.export import export_checkpoint, is_training_checkpoint
    from twofold.engine.hub import resolve_model_path
    from twofold.engine.sampler import build_sampler
    from twofold.engine.tasks import load_problems
    from twofold.engine.verifier import build_pool
    with tempfile.TemporaryDirectory(prefix="twofold-eval-") as tmp:
        path = Path(checkpoint)
        if is_training_checkpoint(path):
            model_dir = str(export_checkpoint(path, Path(tmp) / "hf", "float32"))
        else:
            model_dir = resolve_model_path(str(checkpoint), "checkpoint")
        tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or model_dir)
        data = config.data
        own_sampler, own_pool = sampler is None, pool is None
        pool = pool or build_pool(config)
        golds = pool.check_golds if config.verifier.check == "twofold" and config.reward.verifier_weight > 0 else None
        problems = load_problems(config.eval.path, tokenizer, Fields.from_config(data), config.sampler.max_model_len,
                                 data.format, config.eval.max_prompts, golds, data.split).problems
        if sampler is None:
            if not config.log.verbose:
                from twofold.engine.online import quiet_vllm
                quiet_vllm()
            sampler = build_sampler(dataclasses.replace(config.sampler, load_format="auto"), model_dir)
        else:
            from transformers import AutoModelForCausalLM
            from twofold.engine.weight_sync import sync_weights
            sync_weights(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), sampler)
        try:
            return {"eval/prompts": float(len(problems)), **evaluate(sampler, pool, problems, config)}
        finally:
            if own_sampler:
                sampler.close()
            if own_pool:
                pool.close()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        prog="python -m twofold.engine.eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score a checkpoint on a dataset: greedy pass@1 and sampled avg@k, checked by the verifier.",
        epilog="examples:\n"
               "  python -m twofold.engine.eval runs/demo/nft/hf runs/demo/data/eval.jsonl\n"
               "  python -m twofold.engine.eval runs/x/checkpoints/step_00000040 data/math500.jsonl eval.samples=8\n"
               "The config (sampling, verifier, data fields) is the run's config.yaml for a step_* checkpoint, else "
               "--config or the defaults; section.key=value overrides apply on top (see python -m "
               "twofold.engine.train --help).")
    parser.add_argument("checkpoint", help="Hugging Face directory or Hub id, or <run_dir>/checkpoints/step_*")
    parser.add_argument("data", help="prompts with gold answers (any data.path source)")
    parser.add_argument("--config", help="YAML config for sampling, verifier and data fields")
    parser.add_argument("--out", help="also write the scores here (JSON)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. eval.samples=8 rollout.temperature=0.6")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from twofold.engine.config import load_config
    from twofold.engine.export import is_training_checkpoint
    try:
        base = args.config
        if base is None and is_training_checkpoint(Path(args.checkpoint)):
            base = Path(args.checkpoint).resolve().parent.parent / "config.yaml"
        config = load_config(base, [*([f"model.path={args.checkpoint}"] if base is None else []), "train.mode=online",
                                    "objective.name=nft", f"data.path={args.data}", f"eval.path={args.data}",
                                    *args.overrides])
        scores = evaluate_checkpoint(args.checkpoint, config)
    except ValueError as err:
        sys.exit(f"error: {err}")
    print(json.dumps(scores, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(scores) + "\n")
    return scores


if __name__ == "__main__":
    main()
