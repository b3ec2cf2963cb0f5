"""Fused token-local loss benchmark: NFT (or GRPO) loss forward+backward, fused vs eager logits + autograd.

    python -m bench.fused                     # CPU, N=8192 H=512 V=32000 fp32 (the issue's must-show shape)
    python -m bench.fused --quick             # small shape, seconds
    python -m bench.fused --objective grpo    # GRPO's clipped ratio loss instead of NFT's
    python -m bench.fused --no-memory         # times only (on CPU the memory probes are a fresh process per case)
    python -m bench.fused --device cuda --dtype bf16 --n 8192 --h 4096 --v 128256 --backend triton

Cases on identical inputs: `eager` materialises [N, V] logits, takes log_softmax and runs the NFT token-local
step (or GRPO's, `--objective grpo`) through `twofold.objectives.layout.apply_token_local` with autograd; `fused` is
`twofold.kernels.fused.fused_linear_loss` on the same objective, which forms the gradients during its single pass.
Both then backpropagate into hidden and weight. `ideal` is bench.kernels' anchor: the three GEMMs any exact method
needs (6NHV: logits, dX, dW on 1024-token chunks) and nothing else, the time no fused pass beats.
Timing and memory methods: bench/harness.py (as in bench.kernels).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from bench.harness import (DTYPES, LoadWatch, add_shape_arguments, device_name, finish_shape_arguments, median_times,
                           memory_in_subprocess, memory_method, peak_extra_memory, ratio, shape_probe_args)
from bench.kernels import ideal_gemms
from twofold.kernels import linear_logprobs
from twofold.kernels.fused import fused_linear_loss
from twofold.objectives.layout import apply_token_local
from twofold.objectives.token_local import TOKEN_LOCAL

CASES = ("eager", "fused", "ideal")
OBJECTIVES = ("nft", "grpo")


def make_inputs(n, h, v, dtype, device, seed=0, objective="nft"):
    """Hidden, weight, targets and the objective's per-token inputs (old log-probs near the current ones, as in
    RL; GRPO gets standard-normal advantages)."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) / h**0.25).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.25).to(device, dtype)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    with torch.no_grad():
        old = linear_logprobs(hidden, weight, targets) + 0.1 * torch.randn(n, generator=g).to(device)
    r_hat = (0.1 + 0.8 * torch.rand(n, generator=g)).to(device)
    nft = dict(weight=torch.full((n,), 1e-3, device=device), old_logp=old,
               correct=(torch.rand(n, generator=g) > 0.5).float().to(device), r_hat=r_hat, prompt_weight=1 - r_hat)
    if objective == "grpo":
        adv = torch.randn(n, generator=g).to(device)
        return hidden, weight, targets, dict(weight=nft["weight"], old_logp=old, adv=adv)
    return hidden, weight, targets, nft


def eager_step(hidden, weight, targets, inputs, backend, objective="nft"):
    logp = (hidden @ weight.t()).float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    loss, _ = apply_token_local(logp, TOKEN_LOCAL[objective], **inputs)
    return loss


def fused_step(hidden, weight, targets, inputs, backend, objective="nft"):
    return fused_linear_loss(hidden, weight, targets, objective, inputs=inputs, backend=backend).loss


STEPS = {"eager": eager_step, "fused": fused_step}


def run_case(case, hidden, weight, targets, inputs, backend, objective="nft"):
    if case == "ideal":
        with torch.no_grad():
            return ideal_gemms("fwd+bwd", hidden, weight)
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    STEPS[case](h, w, targets, inputs, backend, objective).backward()
    return h.grad, w.grad


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p)
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--objective", default="nft", choices=OBJECTIVES, help="token-local objective (default: nft)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the memory probes (on CPU each is a fresh process running a warm-up and one call)")
    p.add_argument("--_memory-probe", metavar="CASE", help=argparse.SUPPRESS)
    return finish_shape_arguments(p.parse_args(argv))


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    inputs = make_inputs(args.n, args.h, args.v, DTYPES[args.dtype], device, objective=args.objective)
    runs = {c: (lambda c=c: run_case(c, *inputs, args.backend, args.objective)) for c in CASES}
    if args._memory_probe:
        print(peak_extra_memory(runs[args._memory_probe], device))
        return
    load = LoadWatch(threads=torch.get_num_threads())
    times = median_times(runs, device, args.warmup, args.repeats, progress="bench.fused")
    probe = [*shape_probe_args(args), "--backend", args.backend, "--objective", args.objective]
    mem = {c: (None if args.no_memory else peak_extra_memory(runs[c], device) if device.type == "cuda"
               else memory_in_subprocess("bench.fused", [c, *probe])) for c in CASES}
    load.stop()
    speed, floor = ratio(times["fused"], times["eager"]), ratio(times["fused"], times["ideal"])
    report = {"shape": {"N": args.n, "H": args.h, "V": args.v, "dtype": args.dtype}, "objective": args.objective,
              "device": device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "memory_method": memory_method(device), **load.as_dict(),
              "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats,
              "rows": [{"case": c, "time_ms": times[c] * 1e3, "time_ms_min": times[c].low * 1e3,
                        "time_ms_max": times[c].high * 1e3,
                        "peak_extra_mib": None if mem[c] is None else mem[c] / 2**20,
                        "gflops_6nhv": 6 * args.n * args.h * args.v / times[c] / 1e9} for c in CASES],
              "fused_vs_eager": {"time": float(speed), "time_min": speed.low, "time_max": speed.high,
                                 "memory": None if args.no_memory else mem["fused"] / mem["eager"]},
              "fused_vs_ideal": {"time": float(floor), "time_min": floor.low, "time_max": floor.high}}
    print(f"{args.objective.upper()} loss fwd+bwd  N={args.n} H={args.h} V={args.v} {args.dtype} on {report['device']} "
          f"({report['threads']} threads), {args.repeats} repeats, cases interleaved")
    for line in load.lines():
        print(line)
    for c, row in zip(CASES, report["rows"]):
        extra = "n/a" if row["peak_extra_mib"] is None else f"{row['peak_extra_mib']:.1f}"
        print(f"  {row['case']:<6} {times[c].fmt('.1f', 1e3):>26} ms {row['gflops_6nhv']:>8.1f} GFLOP/s "
              f"{extra:>9} MiB extra")
    q = report["fused_vs_eager"]
    memory = "n/a" if q["memory"] is None else f"{q['memory']:.4f}x"
    print(f"  fused / eager: time {speed.fmt('.3f')}x, peak memory {memory}")
    print(f"  fused / ideal (the three GEMMs alone): time {floor.fmt('.3f')}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
