"""Kernel microbenchmark: per-token log-probs from hidden states and the LM-head weight, ours vs the anchors.

    python -m bench.kernels                       # CPU, N=8192 H=512 V=32000 fp32, writes nothing
    python -m bench.kernels --out results.json    # also write the table as JSON
    python -m bench.kernels --quick               # small shape, seconds
    python -m bench.kernels --device cuda --anchors   # S1-S6 vs Liger/CCE/torch native (bench/anchors.py)

Cases (same inputs, one run): `eager` materialises logits and takes log_softmax (the autograd baseline),
`torch_native` is F.linear_cross_entropy with chunking options (cross-entropy only), `ours` is
kernels.linear_logprobs. Modes: `fwd` (no grad: old/reference log-probs) and `fwd+bwd` (random upstream
gradient through autograd). Timing and memory methods: bench/harness.py (printed with the table).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from bench.harness import (DTYPES, add_shape_arguments, finish_shape_arguments, median_times, memory_in_subprocess,
                           device_name, memory_method, peak_extra_memory, shape_probe_args)
from twofold.kernels import linear_logprobs

CASES = ("eager", "torch_native", "ours")
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


def run_case(case, mode, hidden, weight, targets, upstream):
    if mode == "fwd":
        with torch.no_grad():
            return FUNCS[case](hidden, weight, targets)
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    logp = FUNCS[case](h, w, targets)
    logp.backward(upstream)
    return h.grad


def flops(n, h, v, mode, case):
    # fwd: logits GEMM. fwd+bwd: eager and native keep/produce gradients in 6NHV; ours recomputes logits (8NHV).
    if mode == "fwd":
        return 2 * n * h * v
    return (8 if case == "ours" else 6) * n * h * v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p)
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
    runs = {(c, m): (lambda c=c, m=m: run_case(c, m, *inputs)) for c in CASES for m in MODES}
    times = median_times(runs, device, args.warmup, args.repeats)
    rows = []
    for (case, mode), sec in times.items():
        mem = (peak_extra_memory(runs[(case, mode)], device) if device.type == "cuda" else
               memory_in_subprocess("bench.kernels", [case, mode, *shape_probe_args(args)]))
        rows.append({"case": case, "mode": mode, "time_ms": sec * 1e3, "peak_extra_mib": mem / 2**20,
                     "gflops": flops(args.n, args.h, args.v, mode, case) / sec / 1e9})
    report = {
        "shape": {"N": args.n, "H": args.h, "V": args.v, "dtype": args.dtype},
        "device": device_name(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "warmup": args.warmup,
        "memory_method": memory_method(device),
        "rows": rows, "ratios_vs_eager": ratios(rows),
    }
    print_table(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")


def ratios(rows):
    by = {(r["case"], r["mode"]): r for r in rows}
    out = {}
    for case in CASES[1:]:
        for mode in MODES:
            r, e = by[(case, mode)], by[("eager", mode)]
            out[f"{case}/{mode}"] = {"time": r["time_ms"] / e["time_ms"],
                                     "memory": r["peak_extra_mib"] / max(e["peak_extra_mib"], 1e-9)}
    return out


def print_table(report):
    s = report["shape"]
    print(f"linear log-probs  N={s['N']} H={s['H']} V={s['V']} {s['dtype']}  on {report['device']} "
          f"({report['threads']} threads, torch {report['torch']}), median of {report['repeats']}")
    print(f"memory: {report['memory_method']}")
    print(f"{'case':<14}{'mode':<9}{'time ms':>10}{'GFLOP/s':>10}{'extra MiB':>11}{'time/eager':>12}{'mem/eager':>11}")
    rat = report["ratios_vs_eager"]
    for r in report["rows"]:
        q = rat.get(f"{r['case']}/{r['mode']}", {"time": 1.0, "memory": 1.0})
        print(f"{r['case']:<14}{r['mode']:<9}{r['time_ms']:>10.1f}{r['gflops']:>10.1f}{r['peak_extra_mib']:>11.1f}"
              f"{q['time']:>11.2f}x{q['memory']:>10.3f}x")


if __name__ == "__main__":
    main()
