"""Cross-entropy (reduction mean) fwd+bwd: `twofold.linear_cross_entropy` against eager and the log-probs path.

    OMP_NUM_THREADS=1 python -m bench.cross_entropy --n 4096 --repeats 3

Cases on identical inputs, interleaved within each repeat: `eager` materialises the [N, V] logits and runs
F.cross_entropy with autograd; `logprobs` is -linear_logprobs(...).mean over valid tokens (what
linear_cross_entropy ran before mean/sum went through the fused pass: 8NHV, the backward recomputes the logits);
`ours` is linear_cross_entropy (the fused SFT pass: 6NHV). Wall time (perf_counter) and this process's CPU time
(process_time) per call, median [min-max] over the repeats; ratios repeat by repeat (bench/harness.py). The three
cases' losses and gradients are checked equal (fp32 tolerance) before timing.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from bench.harness import LoadWatch, Spread, add_shape_arguments, device_name, finish_shape_arguments, ratio
from bench.kernels import make_inputs
from twofold.kernels import linear_cross_entropy, linear_logprobs


def eager(h, w, y):
    return F.cross_entropy(h @ w.t(), y)


def logprobs(h, w, y):
    return -linear_logprobs(h, w, y).sum() / y.numel()


def ours(h, w, y):
    return linear_cross_entropy(h, w, y)


CASES = {"eager": eager, "logprobs": logprobs, "ours": ours}


def step(fn, hidden, weight, targets):
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = fn(h, w, targets)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p)
    args = finish_shape_arguments(p.parse_args(argv))
    hidden, weight, targets, _ = make_inputs(args.n, args.h, args.v, torch.float32, torch.device("cpu"))
    first = {c: step(fn, hidden, weight, targets) for c, fn in CASES.items()}  # the cases compute the same thing
    for c in CASES:
        for a, b in zip(first[c], first["eager"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, c=c: f"case {c} vs eager: {m}")
    load = LoadWatch(threads=torch.get_num_threads())
    wall, cpu = {c: [] for c in CASES}, {c: [] for c in CASES}
    for r in range(args.warmup + args.repeats):
        for name, fn in CASES.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step(fn, hidden, weight, targets)
            if r >= args.warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    load.stop()
    wall, cpu = {c: Spread(v) for c, v in wall.items()}, {c: Spread(v) for c, v in cpu.items()}
    print(f"cross-entropy (mean) fwd+bwd N={args.n} H={args.h} V={args.v} fp32 on {device_name(torch.device('cpu'))} "
          f"({torch.get_num_threads()} threads), {args.repeats} repeats, cases interleaved")
    for line in load.lines():
        print(line)
    for c in CASES:
        print(f"  {c:<9} wall {wall[c].fmt('.0f', 1e3):>22} ms  cpu {cpu[c].fmt('.0f', 1e3):>22} ms  "
              f"/eager wall {ratio(wall[c], wall['eager']).fmt('.2f')}  cpu {ratio(cpu[c], cpu['eager']).fmt('.2f')}")
    if args.out:
        report = {"shape": {"N": args.n, "H": args.h, "V": args.v, "dtype": "fp32"}, "repeats": args.repeats,
                  "device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(),
                  "torch": torch.__version__, **load.as_dict(),
                  "rows": [{"case": c, "wall_ms": {k: v * 1e3 for k, v in wall[c].as_dict().items()},
                            "cpu_ms": {k: v * 1e3 for k, v in cpu[c].as_dict().items()},
                            "wall_vs_eager": ratio(wall[c], wall["eager"]).as_dict(),
                            "cpu_vs_eager": ratio(cpu[c], cpu["eager"]).as_dict()} for c in CASES]}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
