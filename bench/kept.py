"""Kept-set head vs the full head: `linear_logprobs(..., kept=)` (top-k / top-p replay, twofold/kernels/kept.py)
against `linear_logprobs` over the whole vocabulary, same hidden states and weight.

    python -m bench.kept                      # CPU, one thread: N=256 H=1024, V in {32000, 151936}, |K| in {1, 20, 512}
    python -m bench.kept --n 64 --repeats 1   # seconds
    python -m bench.kept --no-memory          # times only (memory runs each case in a fresh process)

Kept sets are drawn at random, distinct ids per token (no two tokens share a row on purpose: the worst case for the
gather, which reads |K| rows of W per token). Modes: `fwd` (no grad: old / reference log-probs) and `fwd+bwd`
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


def make_inputs(n: int, h: int, v: int, k: int | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g) / h**0.25
    weight = torch.randn(v, h, generator=g) / h**0.25
    kept = None if k is None else torch.rand(n, v, generator=g).topk(k, 1).indices
    targets = torch.randint(0, v, (n,), generator=g) if kept is None else kept[:, 0].clone()
    return hidden, weight, targets, kept, torch.randn(n, generator=g)


def runner(mode: str, n: int, h: int, v: int, k: int | None):
    hidden, weight, targets, kept, upstream = make_inputs(n, h, v, k)
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--h", type=int, default=1024)
    p.add_argument("--vocabs", default=",".join(map(str, VOCABS)))
    p.add_argument("--kept", default=",".join(map(str, KEPT)), help="|K| values; the full head always runs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", help="write the rows as JSON")
    p.add_argument("--_memory-probe", nargs=5, metavar=("MODE", "N", "H", "V", "K"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._memory_probe:
        mode, n, h, v, k = args._memory_probe
        print(peak_extra_memory(runner(mode, int(n), int(h), int(v), None if k == "full" else int(k)),
                                torch.device("cpu")))
        return
    watch = LoadWatch(args.threads)
    rows = []
    for v in map(int, args.vocabs.split(",")):
        for k in [None, *map(int, args.kept.split(","))]:
            for mode in MODES:
                print(f"[bench.kept] V={v} K={k or 'full'} {mode}", file=sys.stderr, flush=True)
                wall, cpu = timed(runner(mode, args.n, args.h, v, k), args.repeats)
                mem = None if args.no_memory else memory_in_subprocess(
                    "bench.kept", [mode, str(args.n), str(args.h), str(v), str(k or "full"),
                                   f"--threads={args.threads}"])
                rows.append({"V": v, "K": k or v, "head": "full" if k is None else "kept", "mode": mode,
                             "wall_ms": wall * 1e3, "cpu_ms": cpu * 1e3,
                             "head_gflop": head_flops(mode, args.n, args.h, k or v) / 1e9,
                             "peak_extra_mib": None if mem is None else mem / 2**20})
    print(f"{device_name(torch.device('cpu'))}, torch {torch.__version__}, {args.threads} thread(s), N={args.n} "
          f"H={args.h} fp32, {args.repeats} repeats; " + "; ".join(watch.stop().lines()[:2]))
    print(f"{'V':>7} {'|K|':>7} {'mode':<8} {'wall ms':>10} {'CPU ms':>10} {'head GFLOP':>11} {'extra MiB':>10} "
          f"{'wall vs full':>13}")
    full = {(r["V"], r["mode"]): r["wall_ms"] for r in rows if r["head"] == "full"}
    for r in rows:
        mem = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
        speed = full[r["V"], r["mode"]] / r["wall_ms"]
        print(f"{r['V']:>7} {r['K'] if r['head'] == 'kept' else 'full':>7} {r['mode']:<8} {r['wall_ms']:>10.1f} "
              f"{r['cpu_ms']:>10.1f} {r['head_gflop']:>11.3f} {mem:>10} {speed:>12.1f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"n": args.n, "h": args.h, "threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
