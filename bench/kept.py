"""Kept-set head vs the full head: `linear_logprobs(..., kept=)` (top-k / top-p replay, twofold/kernels/kept.py)
against `linear_logprobs` over the whole vocabulary, same hidden states and weight.

    python -m bench.kept                      # CPU, one thread: N=256 H=1024, V in {32000, 151936}, |K| in {1, 20, 512}
    python -m bench.kept --n 64 --repeats 1   # seconds
    python -m bench.kept --no-memory          # times only (memory runs each case in a fresh process)
    python -m bench.kept --pool 4             # kept sets drawn from a shared pool of 4 |K| ids (overlapping sets)
    python -m bench.kept --sampler            # what recording kept sets costs vLLM's CPU sampler, per token

Kept sets are drawn at random: by default from the whole vocabulary, so tokens share few rows (the worst case:
the PyTorch backend gathers |K| rows of W per token, a batched GEMV); with `--pool P` from a shared pool of P |K|
ids, as tokens of responses to one prompt share their likely next tokens (the PyTorch backend then runs one GEMM
per 256 tokens against the union of their rows, twofold/kernels/kept.py `_plan`). Modes: `fwd` (no grad: old / reference log-probs) and `fwd+bwd`
(a random upstream gradient through autograd; dW is a dense [V, H] gradient in both). Head FLOPs: 2 N H V forward
and 8 N H V forward+backward for the full head (the backward recomputes the logits), the same with |K| for V on
kept sets. Times are the median of the repeats, wall and CPU (`time.process_time`) side by side, since the machine
is shared; memory is the peak RSS above the inputs in a fresh process (bench/harness.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from bench.harness import LoadWatch, device_name, memory_in_subprocess, peak_extra_memory
from twofold.kernels import linear_logprobs

VOCABS = (32000, 151936)
KEPT = (1, 20, 512)
MODES = ("fwd", "fwd+bwd")


def make_inputs(n: int, h: int, v: int, k: int | None, pool: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g) / h**0.25
    weight = torch.randn(v, h, generator=g) / h**0.25
    kept = None
    if k is not None:
        ids = torch.randperm(v, generator=g)[:min(v, pool * k)] if pool else torch.arange(v)
        kept = ids[torch.rand(n, len(ids), generator=g).topk(k, 1).indices]
    targets = torch.randint(0, v, (n,), generator=g) if kept is None else kept[:, 0].clone()
    return hidden, weight, targets, kept, torch.randn(n, generator=g)


def runner(mode: str, n: int, h: int, v: int, k: int | None, pool: int = 0):
    hidden, weight, targets, kept, upstream = make_inputs(n, h, v, k, pool)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return linear_logprobs(hidden, weight, targets, kept=kept)
        return run
    hidden.requires_grad_(), weight.requires_grad_()

    def run():
        hidden.grad = weight.grad = None
        (linear_logprobs(hidden, weight, targets, kept=kept) * upstream).sum().backward()
    return run


def head_flops(mode: str, n: int, h: int, width: int) -> float:
    return (2 if mode == "fwd" else 8) * n * h * width


def timed(run, repeats: int) -> tuple[float, float]:
    """(median wall s, median CPU s) after one warm-up call."""
    run()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def sampler_cost(v: int, repeats: int, top_p: float, top_k: int, gen: tuple[int, int, int]) -> None:
    """vLLM (in-process, CPU) on a random 2-layer Qwen2 with a V-token head: generation with and without the
    kept-set recorder (`twofold.engine.rollout.sampler_vllm.KeptSetRecorder`), interleaved, same seeds; the recorder's own
    time per recorded token, and the end-to-end difference per generated token."""
    import os
    import tempfile

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoModelForCausalLM, Qwen2Config
    from vllm import LLM, SamplingParams

    from twofold.engine.rollout.sampler_vllm import KeptSetRecorder
    from twofold.engine.train.tiny import build_char_tokenizer

    directory = tempfile.mkdtemp(prefix="bench_kept_")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=v, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    build_char_tokenizer().save_pretrained(directory)
    llm = LLM(model=directory, dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
              logprobs_mode="processed_logprobs", kv_cache_memory_bytes=2**28)
    recorder = KeptSetRecorder()
    llm.collective_rpc(recorder.install)
    num_prompts, n, max_tokens = gen
    prompts = [{"prompt_token_ids": [5 + i, 6, 7, 8]} for i in range(num_prompts)]
    params = SamplingParams(n=n, temperature=1.0, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                            ignore_eos=True, seed=1, logprobs=0, detokenize=False)
    times = {False: [], True: []}
    for _ in range(repeats + 1):
        for active in (False, True):
            recorder.active, recorder.cost_s, recorder.tokens = active, 0.0, 0
            w, c = time.perf_counter(), time.process_time()
            outs = llm.generate(prompts, params, use_tqdm=False)
            times[active].append((time.perf_counter() - w, time.process_time() - c, recorder.cost_s,
                                  recorder.tokens))
            if active:
                recorded_ids = sum(int(k.counts.sum()) for k in recorder.take(outs).values())
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    (w0, c0, _, _), (w1, c1, cost, recorded) = (
        tuple(statistics.median(x[i] for x in times[a][1:]) for i in range(4)) for a in (False, True))
    print(f"vLLM {v}-token head, {tokens} tokens per generate ({num_prompts} prompts x {n} samples x {max_tokens}), "
          f"top_p {top_p} top_k {top_k}, {torch.get_num_threads()} thread(s), median of {repeats}; mean |K| "
          f"{recorded_ids / max(recorded, 1):.0f}:")
    print(f"  generate without recording: wall {w0 * 1e3:.0f} ms, CPU {c0 * 1e3:.0f} ms")
    print(f"  generate while recording:   wall {w1 * 1e3:.0f} ms, CPU {c1 * 1e3:.0f} ms")
    print(f"  recorder: {cost / recorded * 1e6:.1f} us CPU per recorded token ({recorded} rows); end to end "
          f"{(w1 - w0) / tokens * 1e6:.1f} us wall, {(c1 - c0) / tokens * 1e6:.1f} us CPU per token")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--h", type=int, default=1024)
    p.add_argument("--vocabs", default=",".join(map(str, VOCABS)))
    p.add_argument("--kept", default=",".join(map(str, KEPT)), help="|K| values; the full head always runs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pool", type=int, default=0, help="draw each kept set from a shared pool of POOL x |K| ids")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", help="write the rows as JSON")
    p.add_argument("--sampler", action="store_true", help="measure the vLLM kept-set recorder instead")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--gen", default="16,4,64", help="--sampler: prompts, samples per prompt, tokens per sample")
    p.add_argument("--_memory-probe", nargs=6, metavar=("MODE", "N", "H", "V", "K", "POOL"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._memory_probe:
        mode, n, h, v, k, pool = args._memory_probe
        print(peak_extra_memory(runner(mode, int(n), int(h), int(v), None if k == "full" else int(k), int(pool)),
                                torch.device("cpu")))
        return
    if args.sampler:
        for v in map(int, args.vocabs.split(",")):
            sampler_cost(v, args.repeats, args.top_p, args.top_k, tuple(map(int, args.gen.split(","))))
        return
    watch = LoadWatch(args.threads)
    rows = []
    for v in map(int, args.vocabs.split(",")):
        for k in [None, *map(int, args.kept.split(","))]:
            for mode in MODES:
                print(f"[bench.kept] V={v} K={k or 'full'} {mode}", file=sys.stderr, flush=True)
                wall, cpu = timed(runner(mode, args.n, args.h, v, k, args.pool), args.repeats)
                mem = None if args.no_memory else memory_in_subprocess(
                    "bench.kept", [mode, str(args.n), str(args.h), str(v), str(k or "full"), str(args.pool),
                                   f"--threads={args.threads}"])
                rows.append({"V": v, "K": k or v, "head": "full" if k is None else "kept", "mode": mode,
                             "wall_ms": wall * 1e3, "cpu_ms": cpu * 1e3,
                             "head_gflop": head_flops(mode, args.n, args.h, k or v) / 1e9,
                             "peak_extra_mib": None if mem is None else mem / 2**20})
    print(f"{device_name(torch.device('cpu'))}, torch {torch.__version__}, {args.threads} thread(s), N={args.n} "
          f"H={args.h} fp32, kept sets {f'from a pool of {args.pool} |K|' if args.pool else 'spread over V'}, "
          f"{args.repeats} repeats; " + "; ".join(watch.stop().lines()[:2]))
    print(f"{'V':>7} {'|K|':>7} {'mode':<8} {'wall ms':>10} {'CPU ms':>10} {'head GFLOP':>11} {'extra MiB':>10} "
          f"{'full/this wall':>15} {'CPU':>8}")
    full = {(r["V"], r["mode"]): r for r in rows if r["head"] == "full"}
    for r in rows:
        mem = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
        ref = full[r["V"], r["mode"]]
        print(f"{r['V']:>7} {r['K'] if r['head'] == 'kept' else 'full':>7} {r['mode']:<8} {r['wall_ms']:>10.1f} "
              f"{r['cpu_ms']:>10.1f} {r['head_gflop']:>11.3f} {mem:>10} {ref['wall_ms'] / r['wall_ms']:>14.1f}x "
              f"{ref['cpu_ms'] / r['cpu_ms']:>7.1f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"n": args.n, "h": args.h, "threads": args.threads, "pool": args.pool, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
