"""Step benchmark: one full training step (packed micro-batches, FSDP2, SFT loss, AdamW) of the engine.

    python -m bench.step                     # CPU: cpu-bench-qwen2 (V=32000), fused head vs eager logits
    python -m bench.step --device cuda       # GPU: Qwen2.5-1.5B-shaped random model, bf16, MFU of both heads
    python -m bench.step --device cuda --attn sdpa   # pin the attention kernel (default auto: flash-attn if there)
    python -m bench.step --heads fused --steps 2 --batch-tokens 1024 --out step.json

Heads: `fused` is the engine (kernels.linear_logprobs on the final hidden states, never [N,V] logits); `eager`
is the same step with materialised fp32 logits + log_softmax + gather (what HF-style trainers do). Each head runs
in a fresh subprocess so peak-memory numbers do not leak between them. Reported per head: median tokens/s over
the timed steps (after warm-up), step time, MFU (CUDA only: model FLOPs / (time x peak bf16 FLOP/s)), and peak
memory of a step (CUDA: max_memory_allocated; CPU: growth of the resident set over the step, VmHWM - VmRSS).
Prints a table, then the results as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

from bench.harness import reset_peak_rss, rss_bytes
from twofold.engine.config import ModelConfig, OptimConfig
from twofold.engine.distributed import init_distributed, shutdown_distributed
from twofold.engine.model import PolicyModel, build_policy
from twofold.engine.packing import IGNORE_INDEX, Sequence
from twofold.engine.trainer import Trainer

HEADS = ("fused", "eager")


class EagerLogitsPolicy(PolicyModel):
    """The baseline head: [N,V] fp32 logits, log_softmax, gather."""

    def head_logprobs(self, hidden, head, targets, temperature, return_entropy):
        logits = F.linear(hidden, head).float() / temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        keep = targets != IGNORE_INDEX
        logp = logp_all.gather(-1, torch.where(keep, targets, 0)[:, None])[:, 0]
        return torch.where(keep, logp, torch.zeros_like(logp))


def synthetic_batch(batch_tokens: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list[Sequence]:
    """Random sequences with lengths uniform in [min_len, max_len] until `batch_tokens`; the first quarter of
    each is the prompt."""
    rng = random.Random(seed)
    out, total = [], 0
    while total < batch_tokens:
        length = rng.randint(min_len, max_len)
        out.append(Sequence([rng.randrange(vocab) for _ in range(length)], max(1, length // 4), row_id=len(out)))
        total += length
    return out


def run_head(args, head: str) -> dict:
    env = init_distributed()
    try:
        cfg = ModelConfig(preset=args.preset, dtype=args.dtype, activation_checkpointing=not args.no_ac,
                          attn_implementation=args.attn)
        policy = build_policy(cfg, env, policy_cls=EagerLogitsPolicy if head == "eager" else PolicyModel)
        trainer = Trainer(policy, env, OptimConfig(lr=1e-5), objective="sft", total_steps=args.warmup + args.steps,
                          max_tokens_per_microbatch=args.budget)
        batch = synthetic_batch(args.batch_tokens, args.min_len, args.max_len, policy.causal_lm.config.vocab_size)
        for _ in range(args.warmup):
            trainer.step(batch)
        rows = []
        for _ in range(args.steps):
            base = reset_peak_rss() if env.device.type == "cpu" else 0
            metrics = trainer.step(batch)
            if env.device.type == "cpu":
                metrics["peak_mem_gib"] = (rss_bytes("VmHWM") - base) / 2**30
            rows.append(metrics)
        keys = ("tokens_per_s", "step_time_s", "peak_mem_gib", "mfu")
        summary = {k: statistics.median(r[k] for r in rows) for k in keys if k in rows[0]}
        return {"head": head, "preset": args.preset, "dtype": args.dtype, "device": str(env.device),
                "attn": policy.causal_lm.config._attn_implementation,
                "tokens": rows[0]["tokens"], "microbatches": rows[0]["microbatches"], **summary}
    finally:
        shutdown_distributed()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--preset", help="twofold.engine.tiny preset (default: cpu-bench-qwen2 on CPU, qwen2.5-1.5b-shape on CUDA)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--heads", default=",".join(HEADS), help="comma-separated subset of " + ",".join(HEADS))
    p.add_argument("--batch-tokens", type=int, help="tokens per step (default: 2048 CPU, 65536 CUDA)")
    p.add_argument("--budget", type=int, help="max tokens per micro-batch (default: 1024 CPU, 16384 CUDA)")
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, help="default: 512 CPU, 4096 CUDA")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-ac", action="store_true", help="turn activation checkpointing off")
    p.add_argument("--attn", default="auto", choices=("auto", "sdpa", "flash_attention_2", "flex_attention", "eager"),
                   help="model.attn_implementation (auto: flash_attention_2 on CUDA when flash-attn is installed, "
                        "else sdpa)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--_one", choices=HEADS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    args.preset = args.preset or ("qwen2.5-1.5b-shape" if cuda else "cpu-bench-qwen2")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.batch_tokens = args.batch_tokens or (65536 if cuda else 2048)
    args.budget = args.budget or (16384 if cuda else 1024)
    args.max_len = args.max_len or (4096 if cuda else 512)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args._one:
        print(json.dumps(run_head(args, args._one)))
        return
    results = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for head in args.heads.split(","):
        done = subprocess.run([sys.executable, "-m", "bench.step", *passthrough, "--_one", head],
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"head {head} failed:\n{done.stderr[-4000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if args.out:  # after every head: a run stopped part-way keeps the heads it finished
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    print(f"{'head':8} {'tokens/s':>10} {'step s':>8} {'peak GiB':>9} {'MFU':>6}  ({args.preset}, {args.dtype}, "
          f"{results[0]['tokens']:.0f} tokens, {results[0]['microbatches']:.0f} micro-batches)")
    for r in results:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        print(f"{r['head']:8} {r['tokens_per_s']:10.0f} {r['step_time_s']:8.3f} {r['peak_mem_gib']:9.3f} {mfu:>6}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
