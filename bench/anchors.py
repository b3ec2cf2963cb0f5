"""GPU anchors for the fused LM-head kernels on the shapes S1-S6 of docs/kernels.md, ours and theirs in one run.

    python -m bench.anchors --device cuda                   # all shapes, writes bench/results/<device>-<date>.json
    python -m bench.anchors --device cuda --shapes S3 S6
    python -m bench.anchors --device cpu --quick            # plumbing smoke test on a tiny shape (no anchors)

Cases (bf16, contiguous inputs, identical per shape): `gemm1` the bare logits GEMM (the forward's roofline at
this shape), `gemm3` the bare logits/dX/dW GEMMs (the 1.6x bar), `eager_fwd` no-grad materialised logits +
log_softmax (+ entropy), `eager` the same through autograd, `ours_fwd` no-grad log-probs + entropy (2NHV), `ours`
log-probs + entropy with random upstream gradients on both (8NHV), `ours_ce` mean cross-entropy, `ours_fused_dapo`
the fused token-local DAPO loss (6NHV); anchors when importable: `torch_native` (F.linear_cross_entropy with
chunking options; `torch_native_fwd` without grad), `liger_flce` (LigerFusedLinearCrossEntropyLoss, accum fp32),
`liger_grpo` (LigerFusedLinearGRPOLoss, dapo, no reference model), `cce_exact` (Cut Cross-Entropy). A case that
is missing, fails or runs out of memory is recorded with its error and the others go on. Time: CUDA-event median
over interleaved repeats after warm-up (hot L2); TFLOP/s on each case's own FLOP count, and as a fraction of the
bf16 matmul peak measured in the same run. Memory: peak allocated minus inputs (`peak_extra_mib`), and the size
of what the call returns (`output_mib`: gradients or outputs), so the workspace beyond inputs and outputs is
their difference. The JSON is rewritten after each shape, so a run stopped part-way keeps the shapes it finished.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from bench.harness import device_name, median_times, peak_extra_memory, time_call
from twofold.kernels import linear_cross_entropy, linear_logprobs
from twofold.kernels.fused import fused_linear_loss

SHAPES = {  # (N, H, V, ignored fraction)
    "S1": (8192, 4096, 128256, 0.0), "S2": (8192, 4096, 151936, 0.0), "S3": (4096, 4096, 128256, 0.0),
    "S4": (8192, 2304, 256000, 0.0), "S5": (65536, 3584, 152064, 0.0), "S6": (8191, 2880, 129920, 0.5),
}
SEQ_LEN = 1024  # sequences for the GRPO anchor, as in Liger's benchmark


def make_inputs(n, h, v, ignored, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) / h**0.25).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.25).to(device, dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignored] = -100
    up = torch.randn(2, n, generator=g).to(device)
    adv = torch.randn(n, generator=g).to(device)
    return dict(hidden=hidden, weight=weight, targets=targets.to(device), up=up, adv=adv)


def _grads(loss, h, w):
    loss.backward()
    return h.grad, w.grad


def _leaf(x):
    return x.detach().requires_grad_()


def case_gemm1(x):
    return x["hidden"] @ x["weight"].t()


def case_gemm3(x):
    logits = x["hidden"] @ x["weight"].t()
    return logits @ x["weight"], logits.t() @ x["hidden"]


def _eager_logp_entropy(h, w, targets):
    logsm = (h @ w.t()).float().log_softmax(-1)
    valid = targets != -100
    logp = logsm.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) * valid
    return logp, -(logsm.exp() * logsm).sum(-1) * valid


def case_eager_fwd(x):
    with torch.no_grad():
        return _eager_logp_entropy(x["hidden"], x["weight"], x["targets"])


def case_eager(x):
    h, w = _leaf(x["hidden"]), _leaf(x["weight"])
    logp, entropy = _eager_logp_entropy(h, w, x["targets"])
    return _grads((logp * x["up"][0]).sum() + (entropy * x["up"][1]).sum(), h, w)


def case_ours_fwd(x):
    with torch.no_grad():
        return linear_logprobs(x["hidden"], x["weight"], x["targets"], return_entropy=True, check_targets=False)


def case_ours(x):
    h, w = _leaf(x["hidden"]), _leaf(x["weight"])
    logp, ent = linear_logprobs(h, w, x["targets"], return_entropy=True, check_targets=False)
    return _grads((logp * x["up"][0]).sum() + (ent * x["up"][1]).sum(), h, w)


def case_ours_ce(x):
    h, w = _leaf(x["hidden"]), _leaf(x["weight"])
    return _grads(linear_cross_entropy(h, w, x["targets"], check_targets=False), h, w)


def _dapo_inputs(x):
    n = x["targets"].numel()
    return dict(weight=torch.full((n,), 1.0 / n, device=x["adv"].device), old_logp=x["up"][0] * 0.01 - 5.0,
                adv=x["adv"])


def case_ours_fused_dapo(x):
    h, w = _leaf(x["hidden"]), _leaf(x["weight"])
    return _grads(fused_linear_loss(h, w, x["targets"], "dapo", inputs=_dapo_inputs(x)).loss, h, w)


def case_torch_native(x):
    h, w = _leaf(x["hidden"]), _leaf(x["weight"])
    loss = F.linear_cross_entropy(h, w, x["targets"], ignore_index=-100,
                                  options=torch.nn.LinearCrossEntropyOptions())
    return _grads(loss, h, w)


def case_torch_native_fwd(x):
    with torch.no_grad():
        return F.linear_cross_entropy(x["hidden"], x["weight"], x["targets"], ignore_index=-100, reduction="none",
                                      options=torch.nn.LinearCrossEntropyOptions())


def case_liger_flce(x):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    h, w = _leaf(x["hidden"]), _leaf(x["weight"])
    loss = LigerFusedLinearCrossEntropyLoss(accum_dtype=torch.float32)(w, h, x["targets"])
    return _grads(loss, h, w)


def case_liger_grpo(x):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    n, dim = x["hidden"].shape
    b = n // SEQ_LEN
    h = x["hidden"][: b * SEQ_LEN].reshape(b, SEQ_LEN, dim).detach().requires_grad_()
    w = _leaf(x["weight"])
    ids = x["targets"][: b * SEQ_LEN].reshape(b, SEQ_LEN)
    mask = ids != -100
    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo")
    old = (x["up"][0][: b * SEQ_LEN] * 0.01 - 5.0).reshape(b, SEQ_LEN)
    loss, _ = loss_fn(h, w, ids.clamp(min=0), mask, x["adv"][:b], old_per_token_logps=old)
    return _grads(loss, h, w)


def case_cce_exact(x):
    from cut_cross_entropy import linear_cross_entropy as cce
    h, w = _leaf(x["hidden"]), _leaf(x["weight"])
    return _grads(cce(h, w, x["targets"], impl="cce_exact"), h, w)


CASES = {"gemm1": (case_gemm1, 2), "gemm3": (case_gemm3, 6), "eager_fwd": (case_eager_fwd, 2),
         "eager": (case_eager, 6), "ours_fwd": (case_ours_fwd, 2), "ours": (case_ours, 8),
         "ours_ce": (case_ours_ce, 8), "ours_fused_dapo": (case_ours_fused_dapo, 6),
         "torch_native_fwd": (case_torch_native_fwd, 2), "torch_native": (case_torch_native, 6),
         "liger_flce": (case_liger_flce, 6), "liger_grpo": (case_liger_grpo, 8),
         "cce_exact": (case_cce_exact, 8)}  # name -> (fn, FLOPs / NHV)
CPU_CASES = ("gemm1", "gemm3", "eager_fwd", "eager", "ours_fwd", "ours", "ours_ce", "ours_fused_dapo")


def matmul_peak_tflops(device, size=8192, repeats=10):
    """Measured dense bf16 matmul rate: the denominator of every 'fraction of peak' figure."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    a @ b
    seconds = statistics.median(time_call(lambda: a @ b, device) for _ in range(repeats))
    return 2 * size**3 / seconds / 1e12


def output_bytes(result):
    """Bytes of the tensors a case returns (its gradients or outputs)."""
    tensors = result if isinstance(result, (tuple, list)) else (result,)
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def try_case(name, x):
    """(runner, output bytes, error): a case that cannot be imported or run at this shape is reported, not raised
    (an anchor's own bug must not cost the other cases of the run)."""
    fn = CASES[name][0]
    try:
        return (lambda: fn(x)), output_bytes(fn(x)), None
    except ImportError as e:
        return None, None, f"unavailable: {e}"
    except Exception as e:  # noqa: BLE001 - recorded in the results, with its type
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None, None, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def bench_shape(name, shape, cases, device, peak, warmup, repeats):
    n, h, v, ignored = shape
    x = make_inputs(n, h, v, ignored, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    runners, outputs, rows = {}, {}, {}
    for case in cases:
        runners[case], outputs[case], err = try_case(case, x)
        if err:
            rows[case] = {"error": err}
    times = median_times({c: run for c, run in runners.items() if run}, device, warmup, repeats)
    nhv = n * h * v
    for case, seconds in times.items():
        ms = seconds * 1e3
        tflops = CASES[case][1] * nhv / ms / 1e9
        extra = peak_extra_memory(runners[case], device) / 2**20 if device.type == "cuda" else None
        rows[case] = {"time_ms": ms, "tflops": tflops, "frac_of_peak": tflops / peak if peak else None,
                      "peak_extra_mib": extra, "output_mib": outputs[case] / 2**20}
    logits_mib = n * v * 2 / 2**20
    print_shape(name, shape, rows, logits_mib)
    return {"N": n, "H": h, "V": v, "ignored": ignored, "bf16_logits_mib": logits_mib, "cases": rows}


def print_shape(name, shape, rows, logits_mib):
    print(f"{name} N={shape[0]} H={shape[1]} V={shape[2]} ignored={shape[3]:.0%} (bf16 logits {logits_mib:.0f} MiB)")
    for case, r in rows.items():
        if "error" in r:
            print(f"  {case:<16} {r['error']}")
            continue
        mem = "" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:>9.0f} MiB"
        frac = "" if r["frac_of_peak"] is None else f"{r['frac_of_peak']:>6.1%} of peak"
        print(f"  {case:<16}{r['time_ms']:>10.2f} ms{r['tflops']:>9.1f} TFLOP/s {frac} {mem}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--cases", nargs="+", default=None, choices=list(CASES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="tiny shape, CPU-runnable cases: checks the plumbing")
    p.add_argument("--out", help="JSON path (default on CUDA: bench/results/<device>-<date>.json)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    shapes = {"tiny": (512, 64, 1000, 0.25)} if args.quick else {s: SHAPES[s] for s in args.shapes}
    cases = args.cases or (list(CASES) if device.type == "cuda" else list(CPU_CASES))
    peak = matmul_peak_tflops(device) if device.type == "cuda" else None
    name = device_name(device)
    if peak:
        print(f"{name}: measured bf16 matmul peak {peak:.0f} TFLOP/s")
    warmup, repeats = (1, 2) if args.quick else (args.warmup, args.repeats)
    report = {"device": name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "bf16_matmul_peak_tflops": peak, "warmup": warmup, "repeats": repeats,
              "timing": "CUDA events, median, interleaved, hot L2" if peak else "perf_counter median",
              "shapes": {}}
    out = args.out or (None if device.type != "cuda" else
                       f"bench/results/{name.replace(' ', '-')}-{report['date']}.json")
    for s, shape in shapes.items():
        report["shapes"][s] = bench_shape(s, shape, cases, device, peak, warmup, repeats)
        if out:  # after every shape: a run stopped part-way keeps what it measured
            write_json(report, out)
    if out:
        print(f"wrote {out}")


def write_json(report, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)  # a reader never sees half a file


if __name__ == "__main__":
    main()
