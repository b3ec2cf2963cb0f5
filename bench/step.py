"""Step benchmark: one full training step (packed micro-batches, FSDP2, an objective, AdamW) of the engine.

    python -m bench.step                     # CPU: cpu-bench-qwen2 (V=32000), SFT, the three heads
    python -m bench.step --objective nft     # a ratio objective (rewards and groups in the synthetic batch)
    python -m bench.step --shape demo --heads fused --attention packed,masked   # the CPU demo's online batch
    python -m bench.step --device cuda       # GPU: Qwen2.5-1.5B-shaped random model, bf16, MFU of both heads
    python -m bench.step --device cuda --attn sdpa   # pin the attention kernel (default auto: flash-attn if there)
    python -m bench.step --heads fused --steps 2 --batch-tokens 1024 --out step.json

Variants are heads x attentions. Heads: `fused` is the engine's default (`train.head=fused`: `fused_linear_loss`,
loss and gradient in one pass, 6NHV); `logprobs` is `train.head=logprobs` (kernels.linear_logprobs + the objective
through autograd, 8NHV); `eager` is materialised fp32 logits + log_softmax + gather, then the objective through
autograd (what HF-style trainers do). Attentions: `packed` is what the engine resolves `sdpa` to (SDPA per sequence of a packed row);
`masked` is transformers' sdpa over the whole packed row with a block-diagonal mask (the engine before per-sequence
attention, and the reference the tests compare it with).

Time: every variant is built in this process from the same seed and the same batch, and their steps are
interleaved (one step of each per repeat), so drift hits all alike; median [min-max] over the timed steps, and the
ratio of each variant to the first, repeat by repeat. `loss` of the first timed step is printed per variant: equal
results mean equal losses. One more step per variant runs under torch.profiler for the share of self CPU time spent
in scaled-dot-product attention kernels (CPU only). Memory: each variant in a fresh subprocess, growth of the
resident set over one step after the warm-up (VmHWM - VmRSS; CUDA: max_memory_allocated). MFU on CUDA only:
model FLOPs / (time x peak bf16 FLOP/s). The head alone: forward + backward of each head on the step's own
micro-batches (their final hidden states, computed once), heads interleaved, median [min-max] over
`--head-repeats`, and its share of the step. Prints a table, then the results as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench.harness import LoadWatch, Spread, device_name, ratio, reset_peak_rss, rss_bytes, time_call
from twofold.engine.run.schema import ModelConfig, OptimConfig
from twofold.engine.train.distributed import init_distributed, shutdown_distributed
from twofold.engine.train.heads import LogprobsHead, make_head
from twofold.engine.train.model import build_policy
from twofold.engine.train.packing import IGNORE_INDEX, Sequence
from twofold.engine.train.trainer import Trainer, batch_totals

HEADS = ("fused", "logprobs", "eager")
ATTENTIONS = ("packed", "masked")
# The CPU demo's online batch (configs/demo_nft.yaml): 16 prompts x 8 samples of 10-20 tokens (about 1810 packed
# tokens in one micro-batch) on its 2-layer model, fp32, no activation checkpointing.
DEMO_SHAPE = dict(preset="tiny-qwen2-vllm", dtype="float32", batch_tokens=1940, min_len=10, max_len=20,
                  budget=4096, no_ac=True)


class EagerHead(LogprobsHead):
    """The baseline head: [N,V] fp32 logits, log_softmax, gather, then the objective through autograd."""

    @staticmethod
    def logprobs(hidden, weight, targets, temperature, entropy=False, kept=None):
        if kept is not None:
            raise ValueError("the eager baseline head scores the full vocabulary: bench.step has no kept sets")
        logits = F.linear(hidden, weight).float() / temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        keep = targets != IGNORE_INDEX
        logp = logp_all.gather(-1, torch.where(keep, targets, 0)[:, None])[:, 0]
        logp = torch.where(keep, logp, torch.zeros_like(logp))
        return (logp, -(logp_all.exp() * logp_all).sum(-1)) if entropy else logp


def head_factory(head, objective, call_objective, entropy=False):
    if head == "eager":
        return EagerHead(call_objective, entropy)
    return make_head(head, objective, call_objective, entropy)


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


def build_variant(args, env, head: str, attention: str):
    cfg = ModelConfig(preset=args.preset, dtype=args.dtype, activation_checkpointing=not args.no_ac,
                      attn_implementation=args.attn)
    policy = build_policy(cfg, env)
    if attention == "masked":
        policy.causal_lm.config._attn_implementation = "sdpa"  # transformers' own: the block-diagonal mask
    trainer = make_trainer(args, policy, env, head)
    batch = synthetic_batch(args.batch_tokens, args.min_len, args.max_len, policy.causal_lm.config.vocab_size)
    return trainer, batch


def make_trainer(args, policy, env, head: str) -> Trainer:
    trainer = Trainer(policy, env, OptimConfig(lr=1e-5), objective=args.objective,
                      total_steps=args.warmup + args.steps + 2, max_tokens_per_microbatch=args.budget,
                      head="logprobs" if head == "eager" else head)
    trainer.head_factory = head_factory
    return trainer


def head_times(args, env, heads: list[str]) -> dict[str, Spread]:
    """Seconds of every head's forward + backward over the step's micro-batches (hidden states computed once),
    heads interleaved within each repeat."""
    policy = build_policy(ModelConfig(preset=args.preset, dtype=args.dtype, activation_checkpointing=False,
                                      attn_implementation=args.attn), env)
    trainer = make_trainer(args, policy, env, "fused")
    batch = synthetic_batch(args.batch_tokens, args.min_len, args.max_len, policy.causal_lm.config.vocab_size)
    totals, causal_lm = batch_totals(batch), policy.causal_lm
    policy.unshard()  # the root's own parameters (embeddings, head) in full, as inside the step's forward
    weight = causal_lm.get_output_embeddings().weight.detach().to(
        torch.bfloat16 if args.dtype == "bfloat16" else torch.float32).requires_grad_()
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
            head_factory(head, args.objective, trainer.objective_call(mb, totals))(h, weight, mb.targets,
                                                                                   1.0).loss.backward()
        weight.grad = None

    times = {h: [] for h in heads}
    for r in range(1 + args.head_repeats):
        for h in heads:
            seconds = time_call(lambda: run(h), env.device)
            if r:
                times[h].append(seconds)
    return {h: Spread(t) for h, t in times.items()}


def sdpa_share(trainer: Trainer, batch: list[Sequence]) -> float:
    """Share of one step's self CPU time spent in scaled-dot-product attention kernels (forward and backward)."""
    from torch.profiler import profile
    with profile() as prof:
        trainer.step(batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
    return attention / max(total, 1e-9)


def memory_of_one_step(args, head: str, attention: str) -> dict:
    """Subprocess body: peak memory growth over one step after the warm-up."""
    env = init_distributed()
    try:
        trainer, batch = build_variant(args, env, head, attention)
        for _ in range(max(1, args.warmup)):
            trainer.step(batch)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            trainer.step(batch)
            torch.cuda.synchronize()
            return {"peak_mem_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}
        base = reset_peak_rss()
        trainer.step(batch)
        return {"peak_mem_gib": (rss_bytes("VmHWM") - base) / 2**30}
    finally:
        shutdown_distributed()


def time_variants(args, variants: list[tuple[str, str]]) -> list[dict]:
    """Build every variant here, then interleave their steps; per variant: step time Spread, loss, SDPA share."""
    env = init_distributed()
    try:
        built = {v: build_variant(args, env, *v) for v in variants}
        times = {v: [] for v in variants}
        rows = {v: [] for v in variants}
        start = time.perf_counter()
        for r in range(args.warmup + args.steps):
            for v, (trainer, batch) in built.items():
                t0 = time.perf_counter()
                metrics = trainer.step(batch)
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                if r >= args.warmup:
                    times[v].append(time.perf_counter() - t0)
                    rows[v].append(metrics)
            phase = "warm-up" if r < args.warmup else "timed"
            print(f"[bench.step] {phase} step {r + 1}/{args.warmup + args.steps} of {len(variants)} variants, "
                  f"{time.perf_counter() - start:.0f} s elapsed", file=sys.stderr, flush=True)
        out = []
        for v in variants:
            first = rows[v][0]
            row = {"head": v[0], "attention": v[1], "preset": args.preset, "dtype": args.dtype,
                   "device": str(env.device), "attn": built[v][0].policy.causal_lm.config._attn_implementation,
                   "tokens": first["tokens"], "sequences": len(built[v][1]),
                   "microbatches": first["microbatches"], "loss": first["loss"], "step_s": Spread(times[v])}
            if "mfu" in first:
                row["mfu"] = sorted(m["mfu"] for m in rows[v])[len(rows[v]) // 2]
            if env.device.type == "cpu":
                row["sdpa_share"] = sdpa_share(*built[v])
            out.append(row)
        if args.head_repeats:
            print("[bench.step] the heads alone, interleaved", file=sys.stderr, flush=True)
            alone = head_times(args, env, sorted({v[0] for v in variants}, key=HEADS.index))
            for row in out:
                row["head_s"] = alone[row["head"]]
                row["head_share"] = float(alone[row["head"]]) / float(row["step_s"])
        return out
    finally:
        shutdown_distributed()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--shape", choices=("default", "demo"), default="default",
                   help="demo: the CPU demo's online batch (tiny-qwen2-vllm, ~128 sequences of 10-20 tokens)")
    p.add_argument("--preset", help="twofold.engine.train.tiny preset (default: cpu-bench-qwen2 on CPU, qwen2.5-1.5b-shape on CUDA)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--heads", default=",".join(HEADS), help="comma-separated subset of " + ",".join(HEADS))
    p.add_argument("--attention", default="packed", help="comma-separated subset of " + ",".join(ATTENTIONS))
    p.add_argument("--batch-tokens", type=int, help="tokens per step (default: 2048 CPU, 65536 CUDA)")
    p.add_argument("--budget", type=int, help="max tokens per micro-batch (default: 1024 CPU, 16384 CUDA)")
    p.add_argument("--min-len", type=int)
    p.add_argument("--max-len", type=int, help="default: 512 CPU, 4096 CUDA")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-ac", action="store_true", default=None, help="turn activation checkpointing off")
    p.add_argument("--attn", default="auto", choices=("auto", "sdpa", "flash_attention_2", "flex_attention", "eager"),
                   help="model.attn_implementation (auto: flash_attention_2 on CUDA when flash-attn is installed, "
                        "else sdpa); the `masked` attention variant replaces it with transformers' masked sdpa")
    p.add_argument("--objective", default="sft", help="a twofold objective whose fields the synthetic batch has "
                   "(sft, rft, grpo, dapo, drgrpo, nft, oreal, cispo)")
    p.add_argument("--head-repeats", type=int, default=3, help="timed repeats of the head-alone measurement "
                   "(0: skip it)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--_memory-probe", nargs=2, metavar=("HEAD", "ATTENTION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    shape = DEMO_SHAPE if args.shape == "demo" else {}
    defaults = dict(preset="qwen2.5-1.5b-shape" if cuda else "cpu-bench-qwen2", dtype="bfloat16" if cuda else "float32",
                    batch_tokens=65536 if cuda else 2048, budget=16384 if cuda else 1024, min_len=64,
                    max_len=4096 if cuda else 512, no_ac=False)
    for key, value in {**defaults, **shape}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name, given, known in (("--heads", args.heads, HEADS), ("--attention", args.attention, ATTENTIONS)):
        if not set(given.split(",")) <= set(known):
            p.error(f"{name} {given!r}: choose from {', '.join(known)}")
    return args


def print_table(report: dict) -> None:
    rows = report["rows"]
    first = rows[0]
    print(f"training step  {report['preset']} {report['dtype']} {report['objective']}  {first['sequences']} sequences, {first['tokens']:.0f} "
          f"packed tokens, {first['microbatches']:.0f} micro-batch(es)  on {report['device_name']} "
          f"({report['threads']} threads, torch {report['torch']}), {report['steps']} timed steps per variant, "
          f"interleaved")
    for line in report["load_lines"]:
        print(line)
    print(f"{'head':9}{'attention':10}{'step s':>24}{'x first':>22}{'head alone s':>24}{'share':>7}{'tokens/s':>10}"
          f"{'SDPA share':>11}{'peak GiB':>10}{'MFU':>7}  loss")
    for r in rows:
        share = f"{r['sdpa_share']:.0%}" if "sdpa_share" in r else "n/a"
        mem = f"{r['peak_mem_gib']:.3f}" if "peak_mem_gib" in r else "n/a"
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        alone = r["head_s"].fmt(".3f") if "head_s" in r else "n/a"
        head_share = f"{r['head_share']:.0%}" if "head_share" in r else "n/a"
        print(f"{r['head']:9}{r['attention']:10}{r['step_s'].fmt('.3f'):>24}{r['vs_first'].fmt('.2f'):>22}"
              f"{alone:>24}{head_share:>7}{r['tokens'] / r['step_s']:10.0f}{share:>11}{mem:>10}{mfu:>7}  "
              f"{r['loss']:.6f}")


def main(argv=None):
    args = parse_args(argv)
    if args._memory_probe:
        print(json.dumps(memory_of_one_step(args, *args._memory_probe)))
        return
    variants = [(h, a) for h in args.heads.split(",") for a in args.attention.split(",")]
    load = LoadWatch(threads=torch.get_num_threads())
    rows = time_variants(args, variants)
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for row in rows:
        row["vs_first"] = ratio(row["step_s"], rows[0]["step_s"])
    write_results(args, rows, load)  # now and after every memory probe: a run stopped part-way keeps its times
    for row in rows:
        if args.no_memory:
            break
        print(f"[bench.step] memory of {row['head']}/{row['attention']} in a fresh process", file=sys.stderr,
              flush=True)
        done = subprocess.run([sys.executable, "-m", "bench.step", *passthrough, "--_memory-probe", row["head"],
                               row["attention"]], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"memory probe {row['head']}/{row['attention']} failed:\n{done.stderr[-4000:]}")
        row.update(json.loads(done.stdout.strip().splitlines()[-1]))
        write_results(args, rows, load)
    load.stop()
    report = {"preset": args.preset, "dtype": args.dtype, "objective": args.objective, "device_name": device_name(torch.device(args.device)),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": args.steps,
              "load_lines": load.lines(), "rows": rows}
    print_table(report)
    results = write_results(args, rows, load)
    print(json.dumps(results))


def write_results(args, rows: list[dict], load: LoadWatch) -> list[dict]:
    """The rows as JSON-ready dicts (medians as plain numbers, spreads as dicts), written to --out if given."""
    results = [{**{k: v for k, v in r.items() if k not in ("step_s", "vs_first", "head_s")},
                **({"head_s": r["head_s"].as_dict()} if "head_s" in r else {}),
                "step_time_s": float(r["step_s"]), "step_s": r["step_s"].as_dict(),
                "tokens_per_s": r["tokens"] / r["step_s"], "date": time.strftime("%Y-%m-%d"),
                "steps": args.steps, "warmup": args.warmup, "load": load.as_dict(),
                **({"vs_first": r["vs_first"].as_dict()} if "vs_first" in r else {})} for r in rows]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
