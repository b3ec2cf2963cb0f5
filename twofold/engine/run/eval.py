"""Held-out evaluation: pass@1 with greedy decoding and the sampled avg@k (mean correctness of k samples at the
rollout temperature), scored by the verifier, over the verifiable rows; and, where `eval.likelihood` is on (by
default for data.answers reference or mixed), the log-likelihood of each row's reference answer given the model's
own chain of thought (JEPO's measure for data nothing can verify, `reference_likelihood`). Fixed seeds: the same
weights always give the same numbers.

    python -m twofold.engine.run.eval CHECKPOINT DATA [--config C] [--out scores.json] [section.key=value ...]

scores a checkpoint (an HF directory, a Hub id or a step_* training checkpoint) on a dataset's prompts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from twofold.engine.run.config import answers_mode, likelihood_eval
from twofold.engine.run.schema import Config
from twofold.engine.train.packing import Sequence
from twofold.engine.rollout.build import RolloutStats, answer_parts, verify_groups
from twofold.engine.rollout.sampler import GenerationParams, Sampler, fit_to_model, sample_distributed
from twofold.engine.data.tasks import Problem
from twofold.engine.verifier import VerifierPool
from twofold.objectives import names

EVAL_SEED = 1234
# score(sequences) -> per sequence, the log-prob of each response token (at temperature 1: the model's likelihood)
Scorer = Callable[[list[Sequence]], list[list[float]]]


def pass_rate(sampler: Sampler, pool: VerifierPool, problems: list[Problem], params: GenerationParams,
              timeout: float, threshold: float = 0.5) -> float:
    """Mean over problems of the fraction of samples whose score is >= `threshold` (reward.positive_threshold)."""
    groups = sample_distributed(sampler, [list(p.prompt_ids) for p in problems], params)
    scores = verify_groups(pool, problems, groups, timeout, RolloutStats())
    return sum(sum(x >= threshold for x in s) / len(s) for s in scores) / len(scores)


def evaluate(sampler: Sampler, pool: VerifierPool, problems: list[Problem], config: Config, tokenizer=None,
             score: Scorer | None = None) -> dict[str, float]:
    """{"eval/pass1_greedy": ..., "eval/avg@k": ..., "eval/time_s": ...} on the held-out verifiable problems, plus
    `reference_likelihood` on all of them when eval.likelihood is on (it needs the tokenizer and a scorer)."""
    start = time.perf_counter()
    ev, rollout = config.eval, config.rollout
    max_new = ev.max_new_tokens or rollout.max_new_tokens
    timeout, threshold = config.verifier.timeout, config.reward.positive_threshold
    verifiable = [p for p in problems if p.verifiable]
    out = {"eval/verified_prompts": float(len(verifiable))}
    if verifiable:
        out["eval/pass1_greedy"] = pass_rate(sampler, pool, verifiable, GenerationParams(
            temperature=0.0, max_new_tokens=max_new, seed=EVAL_SEED), timeout, threshold)
        if ev.samples:
            sampled = GenerationParams(n=ev.samples, temperature=rollout.temperature, top_p=rollout.top_p,
                                       top_k=rollout.top_k, max_new_tokens=max_new, seed=EVAL_SEED)
            out[f"eval/avg@{ev.samples}"] = pass_rate(sampler, pool, verifiable, sampled, timeout, threshold)
    if likelihood_eval(config):
        if tokenizer is None or score is None:
            raise ValueError("eval.likelihood needs the tokenizer and a scorer (evaluate(..., tokenizer, score))")
        out |= reference_likelihood(sampler, problems, config, tokenizer, score)
    out["eval/time_s"] = time.perf_counter() - start
    return out


def reference_likelihood(sampler: Sampler, problems: list[Problem], config: Config, tokenizer,
                         score: Scorer) -> dict[str, float]:
    """The reference answer's log-likelihood given the model's own chain of thought (JEPO, arXiv 2503.19618).

    Per problem, k = max(eval.samples, 1) chains of thought at the rollout temperature (avg@k's seed), each cut at
    its last rollout.answer_start (the whole sample where it has none) and followed by the reference answer +
    answer_end + EOS, as JEPO trains on them; l*_i = the summed log-prob of those answer tokens at temperature 1.
    eval/ref_logp_per_answer = mean of l*_i; eval/ref_logp_per_token = mean of l*_i / |answer tokens|;
    eval/ref_logp_bound = mean over problems of log((1/k) sum_i e^(l*_i)), JEPO's multi-sample lower bound of
    log p(answer | prompt); eval/answer_format_ok = the fraction of chains that wrote answer_start (and answer_end).
    """
    ev, rollout = config.eval, config.rollout
    k = max(ev.samples, 1)
    params = GenerationParams(n=k, temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                              max_new_tokens=ev.max_new_tokens or rollout.max_new_tokens, seed=EVAL_SEED)
    groups = sample_distributed(sampler, [list(p.prompt_ids) for p in problems], params)
    seqs, answer_lens, formatted = [], [], 0
    for p, group in zip(problems, groups):
        for j, sample in enumerate(group):
            cot, answer, ok = answer_parts(sample, p.answer, tokenizer, rollout.answer_start, rollout.answer_end)
            seqs.append(Sequence(list(p.prompt_ids) + cot + answer, len(p.prompt_ids), row_id=f"{p.row_id}/{j}"))
            answer_lens.append(len(answer))
            formatted += ok
    logps = score(seqs)
    l_star = torch.tensor([sum(lp[-n:]) for lp, n in zip(logps, answer_lens)], dtype=torch.float64)
    bound = torch.logsumexp(l_star.view(len(problems), k), dim=1) - math.log(k)
    return {"eval/ref_logp_per_answer": float(l_star.mean()),
            "eval/ref_logp_per_token": float((l_star / torch.tensor(answer_lens, dtype=torch.float64)).mean()),
            "eval/ref_logp_bound": float(bound.mean()), "eval/answer_format_ok": formatted / len(seqs)}


def hf_scorer(model) -> Scorer:
    """A `Scorer` from a transformers causal LM (one forward per sequence, on the model's device)."""
    @torch.no_grad()
    def score(seqs: list[Sequence]) -> list[list[float]]:
        out = []
        for seq in seqs:
            ids = torch.tensor([seq.tokens], device=model.device)
            logits = model(input_ids=ids).logits[0, seq.prompt_len - 1:-1].float()
            targets = ids[0, seq.prompt_len:, None]
            out.append(torch.log_softmax(logits, dim=-1).gather(-1, targets)[:, 0].tolist())
        return out
    return score


# ---- the command: score a checkpoint on a dataset ---------------------------------------------------------------

def evaluate_checkpoint(checkpoint: str | Path, config: Config, sampler: Sampler | None = None,
                        pool: VerifierPool | None = None) -> dict[str, float]:
    """Greedy pass@1 and avg@k of `checkpoint` (an HF directory, a Hub id or a step_* checkpoint, exported to a
    temporary HF directory first) on the prompts of `config.eval.path`, and the reference answers' likelihood
    where eval.likelihood is on. A given `sampler` (tests) gets the weights by sync; otherwise one is built that
    reads them from the directory."""
    from twofold.engine.data.loading import Fields
    from twofold.engine.run.export import export_checkpoint, is_training_checkpoint
    from twofold.engine.data.hub import resolve_model_path
    from twofold.engine.rollout.backends import build_sampler
    from twofold.engine.data.tasks import load_problems
    from twofold.engine.verifier import build_pool
    with tempfile.TemporaryDirectory(prefix="twofold-eval-") as tmp:
        path = Path(checkpoint)
        if is_training_checkpoint(path):
            model_dir = str(export_checkpoint(path, Path(tmp) / "hf", "float32"))
        else:
            model_dir = resolve_model_path(str(checkpoint), "checkpoint")
        tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or model_dir)
        fitted = fit_to_model(config.sampler, AutoConfig.from_pretrained(model_dir), str(checkpoint))
        config = dataclasses.replace(config, sampler=fitted)
        data = config.data
        own_sampler, own_pool = sampler is None, pool is None
        pool = pool or build_pool(config)
        golds = pool.check_golds if config.verifier.check == "twofold" and config.reward.verifier_weight > 0 else None
        problems = load_problems(config.eval.path, tokenizer, Fields.from_config(data), config.sampler.max_model_len,
                                 data.format, config.eval.max_prompts, golds, data.split,
                                 answers_mode(config)).problems
        model = None
        if sampler is None:
            if not config.log.verbose:
                from twofold.engine.rollout.sampler import quiet_vllm
                quiet_vllm()
            sampler = build_sampler(dataclasses.replace(config.sampler, load_format="auto"), model_dir)
        else:
            from twofold.engine.rollout.weight_sync import sync_weights
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            sync_weights(model, sampler)
        score = None
        if likelihood_eval(config):
            model = model or AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            score = hf_scorer(model.to("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            return {"eval/prompts": float(len(problems)), **evaluate(sampler, pool, problems, config, tokenizer, score)}
        finally:
            if own_sampler:
                sampler.close()
            if own_pool:
                pool.close()


def eval_objective(base: str | Path | None) -> str:
    """The objective the eval config validates with: the run's own when it trained online (so that data.answers
    resolves as in training: JEPO's run keeps its reference rows), else the first online objective (any would do)."""
    import yaml
    name = (yaml.safe_load(Path(base).read_text()) or {}).get("objective", {}).get("name") if base else None
    return name if name in names("online") else names("online")[0]


def eval_base(checkpoint: Path, config: str | None) -> tuple[Path | str | None, list[str]]:
    """(the base config, model overrides): --config, else a step_* checkpoint's run config, else the defaults.
    The model is the checkpoint: a step_* checkpoint's own model/ directory (architecture and tokenizer) when it
    carries one, so that a copied checkpoint needs none of its run's files."""
    from twofold.engine.run.export import is_training_checkpoint, run_config_path
    from twofold.engine.train.checkpoint import CHECKPOINT_MODEL
    if not is_training_checkpoint(checkpoint):
        return config, [] if config else [f"model.path={checkpoint}"]
    own = checkpoint / CHECKPOINT_MODEL
    model = [f"model.path={own}", "model.preset=", "model.tokenizer="] if (own / "config.json").is_file() else []
    return config or run_config_path(checkpoint), model


def main(argv: list[str] | None = None) -> int:
    """The command; returns its exit status (0: scored), which the console script passes to sys.exit."""
    parser = argparse.ArgumentParser(
        prog="python -m twofold.engine.run.eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score a checkpoint on a dataset: greedy pass@1 and sampled avg@k, checked by the verifier.",
        epilog="examples:\n"
               "  python -m twofold.engine.run.eval runs/demo/nft/hf runs/demo/data/eval.jsonl\n"
               "  python -m twofold.engine.run.eval runs/x/checkpoints/step_00000040 data/math500.jsonl eval.samples=8\n"
               "The config (sampling, verifier, data fields) is the run's config.yaml for a step_* checkpoint, else "
               "--config or the defaults; section.key=value overrides apply on top (see python -m "
               "twofold.engine.run.train --help).")
    parser.add_argument("checkpoint", help="Hugging Face directory or Hub id, or <run_dir>/checkpoints/step_*")
    parser.add_argument("data", help="prompts with gold answers (any data.path source)")
    parser.add_argument("--config", help="YAML config for sampling, verifier and data fields")
    parser.add_argument("--out", help="also write the scores here (JSON)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. eval.samples=8 rollout.temperature=0.6")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from twofold.engine.run.config import load_config
    try:
        base, model = eval_base(Path(args.checkpoint), args.config)
        config = load_config(base, [*model, "train.mode=online", f"objective.name={eval_objective(base)}",
                                    "checkpoint.resume=never", f"data.path={args.data}", f"eval.path={args.data}",
                                    *args.overrides])
        scores = evaluate_checkpoint(args.checkpoint, config)
    except ValueError as err:
        sys.exit(f"error: {err}")
    print(json.dumps(scores, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(scores) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
