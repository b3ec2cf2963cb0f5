"""Drop-in module benchmark: `twofold.nn.FusedLinearGRPOLoss` vs Liger's `LigerFusedLinearGRPOLoss`, fwd+bwd.

    python -m bench.modules                          # CPU, B=8 x T=256 (N=2048) H=256 V=8000 fp32, TRL's dapo loss
    python -m bench.modules --beta 0.04              # with the k3 KL to reference log-probs
    python -m bench.modules --device cuda --dtype bf16 --batch 8 --seq 1024 --h 4096 --v 128256

Both modules get the same hidden states, head weight and bias, token ids, mask, advantages and old (and
reference) log-probs, with the same settings (loss_type, beta, epsilon, temperature 1); each call is forward and
backward into hidden, weight and bias. `twofold` is the module's default single fused vocab pass (6NHV),
`twofold_unfused` its `fused=False` path (log-probs, then autograd: 8NHV). Liger runs its default chunked path (`compiled=True`; `--liger-eager` turns
torch.compile off). Cases are interleaved within each repeat; we report the median and [min-max] over repeats of
each case's time and of the per-repeat ratio, and the largest difference of loss and gradients between the two.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from bench.harness import DTYPES, device_name, time_call
from twofold.nn import FusedLinearGRPOLoss


def make_inputs(b, t, h, v, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(b, t, h, generator=g) / h**0.25).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.25).to(device, dtype)
    bias = (torch.randn(v, generator=g) * 0.1).to(device, dtype)
    ids = torch.randint(0, v, (b, t), generator=g).to(device)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).to(device)
    adv = torch.randn(b, generator=g).to(device)
    old = (-5.0 + 0.1 * torch.randn(b, t, generator=g)).to(device)
    ref = (-5.0 + 0.1 * torch.randn(b, t, generator=g)).to(device)
    return dict(hidden=hidden, weight=weight, bias=bias, ids=ids, mask=mask, adv=adv, old=old, ref=ref)


def build_cases(args):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    common = dict(beta=args.beta, loss_type=args.loss_type, epsilon_low=0.2, epsilon_high=0.28)
    ours = FusedLinearGRPOLoss(**common, validate=False)
    unfused = FusedLinearGRPOLoss(**common, validate=False, fused=False)
    liger = LigerFusedLinearGRPOLoss(**common, compiled=not args.liger_eager, use_ref_model=args.beta != 0)
    return {"twofold": ours, "twofold_unfused": unfused, "liger": liger}


def run_case(module, x):
    h, w, b = (x[k].detach().requires_grad_() for k in ("hidden", "weight", "bias"))
    loss, _ = module(h, w, x["ids"], x["mask"], x["adv"], b, x["ref"], x["old"])
    loss.backward()
    return loss.detach(), h.grad, w.grad, b.grad


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--h", type=int, default=256)
    p.add_argument("--v", type=int, default=8000)
    p.add_argument("--loss-type", default="dapo", choices=("grpo", "bnpo", "dapo"))
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--liger-eager", action="store_true", help="Liger without torch.compile")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="write the report as JSON here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    x = make_inputs(args.batch, args.seq, args.h, args.v, DTYPES[args.dtype], device)
    cases = build_cases(args)
    results = {name: run_case(module, x) for name, module in cases.items()}  # also the first warm-up
    diff = [float((a.float() - b.float()).abs().max()) for a, b in zip(results["twofold"], results["liger"])]
    times = {name: [] for name in cases}
    for r in range(args.warmup + args.repeats):
        for name, module in cases.items():
            seconds = time_call(lambda: run_case(module, x), device)
            if r >= args.warmup:
                times[name].append(seconds)
    ratios = [lg / tw for lg, tw in zip(times["liger"], times["twofold"])]
    ratios_unfused = [lg / tw for lg, tw in zip(times["liger"], times["twofold_unfused"])]
    report = dict(
        command=" ".join(["python -m bench.modules", *(sys.argv[1:] if argv is None else argv)]), device=device_name(device),
        machine=platform.processor() or platform.machine(), torch=torch.__version__, threads=torch.get_num_threads(),
        shape=dict(batch=args.batch, seq=args.seq, tokens=int(x["mask"].sum()), h=args.h, v=args.v,
                   dtype=args.dtype), loss_type=args.loss_type, beta=args.beta, liger_compiled=not args.liger_eager,
        date=time.strftime("%Y-%m-%d"),
        seconds={k: dict(median=statistics.median(v), min=min(v), max=max(v)) for k, v in times.items()},
        liger_over_twofold=dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios)),
        liger_over_twofold_unfused=dict(median=statistics.median(ratios_unfused), min=min(ratios_unfused),
                                        max=max(ratios_unfused)),
        max_abs_diff=dict(loss=diff[0], d_hidden=diff[1], d_weight=diff[2], d_bias=diff[3]))
    print(f"{report['device']}, {args.dtype}, B={args.batch} T={args.seq} ({report['shape']['tokens']} tokens) "
          f"H={args.h} V={args.v}, loss_type={args.loss_type} beta={args.beta}, {args.repeats} repeats")
    for name, s in report["seconds"].items():
        print(f"  {name:8s} fwd+bwd {s['median']:.3f} s [{s['min']:.3f}-{s['max']:.3f}]")
    r = report["liger_over_twofold"]
    print(f"  liger / twofold: {r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]")
    r = report["liger_over_twofold_unfused"]
    print(f"  liger / twofold_unfused: {r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]")
    print("  max |twofold - liger|: " + ", ".join(f"{k} {v:.1e}" for k, v in report["max_abs_diff"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
