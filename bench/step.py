"""Step benchmark: one full training step (packed micro-batches, FSDP2, an objective, AdamW) of the engine.

    python -m bench.step                     # CPU: cpu-bench-qwen2 (V=32000), SFT, the three heads
    python -m bench.step --objective nft     # a ratio objective (rewards and groups in the synthetic batch)
    python -m bench.step --device cuda       # GPU: Qwen2.5-1.5B-shaped random model, bf16, MFU of every head
    python -m bench.step --device cuda --attn sdpa   # pin the attention kernel (default auto: flash-attn if there)
    python -m bench.step --heads fused --steps 2 --batch-tokens 1024 --out step.json

Heads: `fused` is the engine's default (`train.head=fused`: `fused_linear_loss`, loss and gradient in one pass,
6NHV); `logprobs` is `train.head=logprobs` (kernels.linear_logprobs + the objective through autograd, 8NHV);
`eager` is materialised fp32 logits + log_softmax + gather (what HF-style trainers do). Each head's step runs in
a fresh subprocess so peak-memory numbers do not leak between them. Reported per head: median tokens/s over the
timed steps (after warm-up), step time, MFU (CUDA only: model FLOPs / (time x peak bf16 FLOP/s)), peak memory of
a step (CUDA: max_memory_allocated; CPU: growth of the resident set over the step, VmHWM - VmRSS), and the head
alone: forward + backward of the head on the step's own micro-batches (their final hidden states, computed
once), every head in one process, interleaved, median and [min-max] over `--head-repeats`, and its share of the
step time. Prints a table, then the results as one JSON line.
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

from bench.harness import reset_peak_rss, rss_bytes, time_call
from twofold.engine.config import ModelConfig, OptimConfig
from twofold.engine.distributed import init_distributed, shutdown_distributed
from twofold.engine.heads import LogprobsHead, make_head
from twofold.engine.model import build_policy
from twofold.engine.packing import IGNORE_INDEX, Sequence
from twofold.engine.trainer import Trainer, batch_totals

HEADS = ("fused", "logprobs", "eager")


class EagerHead(LogprobsHead):
    """The baseline head: [N,V] fp32 logits, log_softmax, gather, then the objective through autograd."""

    @staticmethod
    def logprobs(hidden, weight, targets, temperature, entropy=False):
        logits = F.linear(hidden, weight).float() / temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        keep = targets != IGNORE_INDEX
        logp = logp_all.gather(-1, torch.where(keep, targets, 0)[:, None])[:, 0]
        logp = torch.where(keep, logp, torch.zeros_like(logp))
        return (logp, -(logp_all.exp() * logp_all).sum(-1)) if entropy else logp


def head_factory(head, objective, call_objective, correction=None, entropy=False):
    if head == "eager":
        return EagerHead(call_objective, correction, entropy)
    return make_head(head, objective, call_objective, correction, entropy)


def synthetic_batch(batch_tokens: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list[Sequence]:
    """Random sequences with lengths uniform in [min_len, max_len] until `batch_tokens`; the first quarter of
    each is the prompt."""
    rng = random.Random(seed)
    out, total = [], 0
    while total < batch_tokens:
        length = rng.randint(min_len, max_len)
        i = len(out)  # fields for the RL objectives: groups of 4, mixed rewards
        fields = {"group_ids": i // 4, "rewards": float(i % 2), "advantages": 1.0 if i % 2 else -1.0}
        out.append(Sequence([rng.randrange(vocab) for _ in range(length)], max(1, length // 4), row_id=i,
                            fields=fields))
        total += length
    return out


def run_head(args, head: str) -> dict:
    env = init_distributed()
    try:
        cfg = ModelConfig(preset=args.preset, dtype=args.dtype, activation_checkpointing=not args.no_ac,
                          attn_implementation=args.attn)
        policy = build_policy(cfg, env)
        trainer = make_trainer(args, policy, env, head)
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
                "attn": policy.causal_lm.config._attn_implementation, "objective": args.objective,
                "tokens": rows[0]["tokens"], "microbatches": rows[0]["microbatches"],
                **summary}
    finally:
        shutdown_distributed()


def make_trainer(args, policy, env, head: str) -> Trainer:
    trainer = Trainer(policy, env, OptimConfig(lr=1e-5), objective=args.objective,
                      total_steps=args.warmup + args.steps + 1, max_tokens_per_microbatch=args.budget,
                      head="logprobs" if head == "eager" else head)
    trainer.head_factory = head_factory
    return trainer


def head_times(args, heads: list[str]) -> dict[str, list[float]]:
    """Seconds of every head's forward + backward over the step's micro-batches (hidden states computed once),
    heads interleaved within each repeat."""
    env = init_distributed()
    try:
        policy = build_policy(ModelConfig(preset=args.preset, dtype=args.dtype, activation_checkpointing=False,
                                          attn_implementation=args.attn), env)
        trainer = make_trainer(args, policy, env, "fused")
        batch = synthetic_batch(args.batch_tokens, args.min_len, args.max_len, policy.causal_lm.config.vocab_size)
        totals, dtype = batch_totals(batch), next(policy.parameters()).dtype
        causal_lm = policy.causal_lm
        policy.unshard()  # the root's own parameters (embeddings, head) in full, as inside the step's forward
        weight = causal_lm.get_output_embeddings().weight.detach().to(torch.bfloat16 if args.dtype == "bfloat16"
                                                                      else torch.float32).requires_grad_()
        work = []
        with torch.no_grad():
            for mb in trainer.plan(batch):
                mb = mb.to(env.device)
                hidden = causal_lm.get_decoder()(input_ids=mb.input_ids[None], position_ids=mb.position_ids[None],
                                                 use_cache=False).last_hidden_state[0]
                work.append((mb, hidden.to(weight.dtype)))

        def run(head: str):
            for mb, hidden in work:
                h = hidden.clone().requires_grad_()
                out = head_factory(head, args.objective, trainer.objective_call(mb, totals))(h, weight, mb.targets,
                                                                                            1.0)
                out.loss.backward()
            weight.grad = None

        times = {h: [] for h in heads}
        for r in range(1 + args.head_repeats):
            for h in heads:
                seconds = time_call(lambda: run(h), env.device)
                if r:
                    times[h].append(seconds)
        return times
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
    p.add_argument("--objective", default="sft", help="a twofold objective whose fields the synthetic batch has "
                   "(sft, rft, grpo, dapo, drgrpo, nft, oreal)")
    p.add_argument("--head-repeats", type=int, default=5, help="timed repeats of the head-alone measurement")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--_one", choices=HEADS, help=argparse.SUPPRESS)
    p.add_argument("--_heads", action="store_true", help=argparse.SUPPRESS)
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
    heads = args.heads.split(",")
    if args._one:
        print(json.dumps(run_head(args, args._one)))
        return
    if args._heads:
        print(json.dumps(head_times(args, heads)))
        return
    results = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for head in heads:
        results.append(_subprocess([*passthrough, "--_one", head], f"head {head}"))
        if args.out:  # after every head: a run stopped part-way keeps the heads it finished
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    alone = _subprocess([*passthrough, "--_heads"], "head timing")
    for r in results:
        t = alone[r["head"]]
        r |= {"head_s": statistics.median(t), "head_s_min": min(t), "head_s_max": max(t),
              "head_share": statistics.median(t) / r["step_time_s"]}
    print(f"{'head':8} {'tokens/s':>10} {'step s':>8} {'head s [min-max]':>22} {'share':>6} {'peak GiB':>9} "
          f"{'MFU':>6}  ({args.preset}, {args.dtype}, {args.objective}, {results[0]['tokens']:.0f} tokens, "
          f"{results[0]['microbatches']:.0f} micro-batches)")
    for r in results:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        span = f"{r['head_s']:.3f} [{r['head_s_min']:.3f}-{r['head_s_max']:.3f}]"
        print(f"{r['head']:8} {r['tokens_per_s']:10.0f} {r['step_time_s']:8.3f} {span:>22} {r['head_share']:6.1%} "
              f"{r['peak_mem_gib']:9.3f} {mfu:>6}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps(results))


def _subprocess(args: list[str], what: str):
    done = subprocess.run([sys.executable, "-m", "bench.step", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{what} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
