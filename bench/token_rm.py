"""Can OREAL's token reward model learn here? Train `twofold.engine.rollout.token_rm.TokenRewardModel` offline, the way
the online loop does (one AdamW step per batch of 16 right + 16 wrong traces), on the teacher's traces of
`bench.tasks`, from the shared SFT start of `bench.algorithms`, and score held-out traces.

    python -m bench.token_rm --model runs/algorithms/sft/hf [--lrs 1e-3,4e-3] [--steps 40] [--label steps]

Prints, per learning rate and per token alignment (`TokenScorer.score_own_token`: True scores each token with the
hidden state that has read it, False is the former behaviour, one token early), the held-out BCE and sequence
accuracy after 5, 10, 20, ... updates, and the mean OREAL token weights w+ on right traces and w- on wrong ones
(what the policy's gradient is multiplied by). Writes bench/results/token-rm-<label>-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.tasks import problem_sets, trace, wrong_trace
from twofold.engine.run.schema import ModelConfig
from twofold.engine.train.distributed import init_distributed, shutdown_distributed
from twofold.engine.train.packing import Sequence
from twofold.engine.rollout.token_rm import TokenRewardModel
from twofold.engine.data.tokenizer import load_tokenizer
from twofold.engine.train.trainer import plan_rank
from twofold.objectives import oreal_token_weights
from twofold.objectives.layout import flatten


def traces(tokenizer, count: int, seed: int, label: str = "correct") -> list[Sequence]:
    """`count` pairs (+1 then 0), traces ending in EOS. label="correct": a problem's right and wrong trace.
    label="steps", the control: the right traces of a 3-step and of a 1-step problem (a label any trunk can read,
    so a probe that learns it shows that the loss, optimizer and inputs work)."""
    problems, _ = problem_sets(seed, 3 * count, 0)
    rng, out = random.Random(seed), []
    if label == "correct":
        pairs = [((p, trace(p)[0]), (p, wrong_trace(p, rng)[0])) for p in problems[:count]]
    else:
        long, short = [p for p in problems if p.level == 3], [p for p in problems if p.level == 1]
        pairs = [((a, trace(a)[0]), (b, trace(b)[0])) for a, b in zip(long[:count], short)]
    for pair in pairs:
        for (p, text), reward in zip(pair, (1.0, 0.0)):
            prompt = tokenizer(p.prompt).input_ids
            response = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            out.append(Sequence(prompt + response, len(prompt), fields={"rewards": reward}))
    return out


def held_out_scores(rm: TokenRewardModel, batch: list[Sequence]) -> dict[str, float]:
    """BCE and accuracy of sigma(mean score) against correctness, and the mean OREAL weights w+ / w-."""
    scores = rm.scores(batch)
    mean = torch.tensor([sum(s) / len(s) for s in scores], dtype=torch.float64)
    y = torch.tensor([s.fields["rewards"] for s in batch], dtype=torch.float64)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(mean, y).item()
    flat_scores = torch.tensor([v for s in scores for v in s], dtype=torch.float64)
    seq = torch.tensor([i for i, s in enumerate(scores) for _ in s])
    flat, _ = flatten(flat_scores, torch.ones_like(seq, dtype=torch.bool), seq, len(scores), False)
    w_pos, w_neg = oreal_token_weights(flat_scores, flat)
    right, wrong = y[seq] > 0, y[seq] == 0
    return {"bce": bce, "accuracy": ((mean > 0).double() == y).double().mean().item(),
            "w_pos_on_right": w_pos[right].mean().item(), "w_neg_on_wrong": w_neg[wrong].mean().item()}


def probe(model: str, lr: float, own_token: bool, steps: int, train: list[Sequence], test: list[Sequence],
          checkpoints: list[int]) -> list[dict]:
    env = init_distributed()
    try:
        rm = TokenRewardModel(ModelConfig(path=model, dtype="float32", activation_checkpointing=False,
                                          attn_implementation="sdpa"), env, lr, 0, 8192, 0)
        rm.model.score_own_token = own_token
        rows, rng = [], random.Random(0)
        for step in range(1, steps + 1):
            pairs = rng.sample(range(len(train) // 2), 16)  # 16 prompts, their right and wrong trace
            batch = [train[2 * i + k] for i in pairs for k in (0, 1)]
            metrics = rm.update(plan_rank(batch, rm.budget, env, rm.pad_token_id), len(batch))
            if step in checkpoints:
                rows.append({"updates": step, "train_bce": metrics["token_rm/loss"],
                             **held_out_scores(rm, test)})
        return rows
    finally:
        shutdown_distributed()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.token_rm", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/algorithms/sft/hf")
    parser.add_argument("--lrs", default="1e-4,1e-3,4e-3")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--label", choices=["correct", "steps"], default="correct",
                        help="what the probe learns: correctness, or the control (3 steps vs 1)")
    parser.add_argument("--alignments", default="early,own", help="early (the former scores), own, or both")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    start = time.perf_counter()
    tokenizer = load_tokenizer(type("C", (), {"model": ModelConfig(path=args.model)})())
    train, test = traces(tokenizer, 400, 11, args.label), traces(tokenizer, 100, 12, args.label)
    checkpoints = [c for c in (5, 10, 20, 40, 60, 100, 200) if c <= args.steps]
    results = {}
    for own in [a == "own" for a in args.alignments.split(",")]:
        for lr in [float(x) for x in args.lrs.split(",")]:
            key = f"{args.label}: lr={lr:g} {'own token' if own else 'one token early'}"
            results[key] = probe(args.model, lr, own, args.steps, train, test, checkpoints)
            print(key, json.dumps(results[key][-1]), flush=True)
    print(f"\nheld-out BCE / accuracy / mean w+ on right / mean w- on wrong, after N updates "
          f"(16 right + 16 wrong traces each), {time.perf_counter() - start:.0f} s")
    for key, rows in results.items():
        print(f"{key:<28}" + "  ".join(f"{r['updates']}: {r['bce']:.3f}/{r['accuracy']:.2f}/"
                                       f"{r['w_pos_on_right']:.2f}/{r['w_neg_on_wrong']:.2f}" for r in rows))
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / f"token-rm-{args.label}-{date}.json"
    out.write_text(json.dumps({"model": args.model, "label": args.label, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
