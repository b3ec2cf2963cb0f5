"""Kernel microbenchmark: per-token log-probs from hidden states and the LM-head weight, ours vs the anchors.

    python -m bench.kernels                       # CPU, N=8192 H=512 V=32000 fp32, writes nothing
    python -m bench.kernels --out results.json    # also write the table as JSON
    python -m bench.kernels --quick               # small shape, seconds
    python -m bench.kernels --device cuda --anchors   # S1-S6 vs Liger/CCE/torch native (bench/anchors.py)

Cases (same inputs, one run): `eager` materialises logits and takes log_softmax (the autograd baseline),
`torch_native` is F.linear_cross_entropy with chunking options (cross-entropy only), `ours` is
kernels.linear_logprobs, `ideal` runs only the GEMMs any exact method needs (logits; + dX and dW in fwd+bwd,
2NHV / 6NHV FLOPs) on 1024-token chunks in the input dtype, no softmax: the time no head beats without skipping
FLOPs. Modes: `fwd` (no grad: old/reference log-probs) and `fwd+bwd` (random upstream gradient through autograd).
Timing and memory methods: bench/harness.py (printed with the table); times are median [min-max] over the repeats
and ratios are taken repeat by repeat.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from bench.harness import (DTYPES, LoadWatch, add_shape_arguments, device_name, finish_shape_arguments, median_times,
                           memory_in_subprocess, memory_method, peak_extra_memory, ratio, shape_probe_args)
from twofold.kernels import linear_logprobs

CASES = ("eager", "torch_native", "ours", "ideal")
MODES = ("fwd", "fwd+bwd")


def make_inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) / h**0.25).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.25).to(device, dtype)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    upstream = torch.randn(n, generator=g).to(device)
    return hidden, weight, targets, upstream


def eager_logprobs(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


def native_logprobs(hidden, weight, targets):
    # Cross-entropy only: -CE per token is the target log-prob; the chunked path needs options.
    opts = torch.nn.LinearCrossEntropyOptions()
    return -F.linear_cross_entropy(hidden, weight, targets, reduction="none", options=opts)


FUNCS = {"eager": eager_logprobs, "torch_native": native_logprobs,
         "ours": lambda h, w, y: linear_logprobs(h, w, y)}
IDEAL_CHUNK = 1024


def ideal_gemms(mode, hidden, weight):
    """The GEMMs of the head and nothing else: z = h W^T per chunk; fwd+bwd also dX = z W and dW += z^T h."""
    grad_w = torch.zeros_like(weight) if mode == "fwd+bwd" else None
    for s in range(0, hidden.shape[0], IDEAL_CHUNK):
        h = hidden[s:s + IDEAL_CHUNK]
        z = h @ weight.t()
        if grad_w is not None:
            z @ weight
            grad_w.addmm_(z.t(), h)
    return grad_w


def run_case(case, mode, hidden, weight, targets, upstream):
    if case == "ideal":
        with torch.no_grad():
            return ideal_gemms(mode, hidden, weight)
    if mode == "fwd":
        with torch.no_grad():
            return FUNCS[case](hidden, weight, targets)
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    logp = FUNCS[case](h, w, targets)
    logp.backward(upstream)
    return h.grad


def flops(n, h, v, mode, case):
    # fwd: logits GEMM. fwd+bwd: eager, native and ideal need 6NHV; ours recomputes the logits in backward (8NHV).
    if mode == "fwd":
        return 2 * n * h * v
    return (8 if case == "ours" else 6) * n * h * v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    p.add_argument("--no-memory", action="store_true",
                   help="skip the memory probes (on CPU each is a fresh process running a warm-up and one call)")
    p.add_argument("--_memory-probe", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--anchors", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="run bench.anchors instead (shapes S1-S6 with Liger, CCE, torch native; "
                        "e.g. --device cuda --anchors --shapes S1 S3)")
    return finish_shape_arguments(p.parse_args(argv))


def main(argv=None):
    args = parse_args(argv)
    if args.anchors is not None:
        from bench.anchors import main as anchors_main
        anchors_main(["--device", args.device, *args.anchors])
        return
    device = torch.device(args.device)
    inputs = make_inputs(args.n, args.h, args.v, DTYPES[args.dtype], device)
    if args._memory_probe:
        print(peak_extra_memory(lambda: run_case(*args._memory_probe, *inputs), device))
        return
    cases = [c for c in CASES if c in args.cases.split(",")]
    if "eager" not in cases:
        raise SystemExit("--cases must include eager (the anchor of every ratio)")
    load = LoadWatch(threads=torch.get_num_threads())
    runs = {(c, m): (lambda c=c, m=m: run_case(c, m, *inputs)) for c in cases for m in MODES}
    times = median_times(runs, device, args.warmup, args.repeats, progress="bench.kernels")
    rows = []
    for (case, mode), sec in times.items():
        mem = None if args.no_memory else measure_memory(args, device, runs, case, mode)
        rows.append({"case": case, "mode": mode, "time_ms": sec * 1e3, "time_ms_min": sec.low * 1e3,
                     "time_ms_max": sec.high * 1e3, "peak_extra_mib": None if mem is None else mem / 2**20,
                     "gflops": flops(args.n, args.h, args.v, mode, case) / sec / 1e9})
    load.stop()
    report = {
        "shape": {"N": args.n, "H": args.h, "V": args.v, "dtype": args.dtype},
        "device": device_name(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "warmup": args.warmup,
        "memory_method": memory_method(device), **load.as_dict(), "load_lines": load.lines(),
        "rows": rows, "ratios_vs_eager": ratios(rows, times), "ratios_vs_ideal": ratios(rows, times, "ideal"),
    }
    print_table(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")


def measure_memory(args, device, runs, case, mode):
    print(f"[bench.kernels] memory of {case} {mode}", file=sys.stderr, flush=True)
    if device.type == "cuda":
        return peak_extra_memory(runs[(case, mode)], device)
    return memory_in_subprocess("bench.kernels", [case, mode, *shape_probe_args(args)])


def ratios(rows, times, anchor="eager"):
    """case/mode -> time ratio to the anchor (median [min-max] of the per-repeat ratios) and memory ratio."""
    by = {(r["case"], r["mode"]): r for r in rows}
    out = {}
    for (case, mode), r in by.items():
        if case == anchor or (anchor, mode) not in by:
            continue
        q = ratio(times[(case, mode)], times[(anchor, mode)])
        mem, anchor_mem = r["peak_extra_mib"], by[(anchor, mode)]["peak_extra_mib"]
        out[f"{case}/{mode}"] = {"time": float(q), "time_min": q.low, "time_max": q.high,
                                 "memory": None if mem is None else mem / max(anchor_mem, 1e-9)}
    return out


def print_table(report):
    s = report["shape"]
    print(f"linear log-probs  N={s['N']} H={s['H']} V={s['V']} {s['dtype']}  on {report['device']} "
          f"({report['threads']} threads, torch {report['torch']}), {report['repeats']} repeats, cases interleaved")
    print(f"memory: {report['memory_method']}")
    for line in report["load_lines"]:
        print(line)
    print(f"{'case':<14}{'mode':<9}{'time ms':>24}{'GFLOP/s':>9}{'extra MiB':>11}{'time/eager':>22}"
          f"{'mem/eager':>10}{'time/ideal':>12}")
    rat, ideal = report["ratios_vs_eager"], report["ratios_vs_ideal"]
    one = {"time": 1.0, "time_min": 1.0, "time_max": 1.0, "memory": 1.0}
    for r in report["rows"]:
        key = f"{r['case']}/{r['mode']}"
        q, i = rat.get(key, one), ideal.get(key, one if r["case"] == "ideal" else None)
        t = f"{r['time_ms']:.1f} [{r['time_ms_min']:.1f}-{r['time_ms_max']:.1f}]"
        qt = f"{q['time']:.2f} [{q['time_min']:.2f}-{q['time_max']:.2f}]"
        it = f"{i['time']:.2f}" if i else "n/a"
        mib = "n/a" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}"
        mem = "n/a" if q["memory"] is None or r["peak_extra_mib"] is None else f"{q['memory']:.3f}x"
        print(f"{r['case']:<14}{r['mode']:<9}{t:>24}{r['gflops']:>9.1f}{mib:>11}{qt:>22}{mem:>10}{it:>12}")


if __name__ == "__main__":
    main()
