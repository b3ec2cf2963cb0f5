"""GEMM rate of the head's tiles, fp32 against bf16 (fp32 accumulation), on this CPU: what the GEMM policy trades.

    OMP_NUM_THREADS=1 python -m bench.gemm_rate                  # H 512 and 1024, one thread, seconds
    ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=1 python -m bench.gemm_rate   # bf16 emulated by oneDNN
    OMP_NUM_THREADS=1 python -m bench.gemm_rate --head 2048 512 32000       # + the bf16 head under each policy

The three GEMMs of one (rows, cols) = `twofold.kernels.chunked.TILE` tile, in the layouts the head passes them: the
logits h W^T ([rows, H] x [H, cols], W^T a transposed view), and in the backward dX = dz W ([rows, cols] x
[cols, H]) and dW = dz^T h ([cols, rows] x [rows, H], dz^T a view). M x N x K below. Rates are
2MNK / time, median of the repeats, in CPU time (`time.process_time`) and wall time; the policy the head would
take here (`gemm_dtype`) is printed with the CPU's model and bf16 flags. `--head N H V` also times
`linear_logprobs` on bf16 inputs (bench.kernels' inputs and fwd / fwd+bwd calls) under each policy, forced with
TWOFOLD_GEMM_PRECISION in this process, against eager bf16, interleaved repeat by repeat, in CPU time (a shared
machine slows wall time, not the CPU time a single thread spends).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench.harness import LoadWatch, device_name
from bench.kernels import MODES, make_inputs, run_case
from twofold.kernels import chunked


def operands(name: str, h: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The two operands of one of the tile's GEMMs in the layouts the head passes them (W is [V, H] row-major)."""
    rows, cols = chunked.TILE
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(rows, h, generator=g).to(dtype), torch.randn(cols, h, generator=g).to(dtype)
    dz = torch.randn(rows, cols, generator=g).to(dtype)
    return {"logits": (hidden, weight.t()), "dX": (dz, weight), "dW": (dz.t(), hidden)}[name]


def rate(a: torch.Tensor, b: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(GFLOP/s by CPU time, GFLOP/s by wall time) of a @ b, medians of `repeats`."""
    a @ b  # warm-up: oneDNN builds its kernel on the first call
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        a @ b
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    flop = 2 * a.shape[0] * a.shape[1] * b.shape[1] / 1e9
    return flop / statistics.median(cpu), flop / statistics.median(wall)


def head_times(n: int, h: int, v: int, repeats: int) -> dict[tuple[str, str], tuple[float, float]]:
    """(case, mode) -> (median CPU s, median wall s) of the bf16 head: eager, ours under each forced policy."""
    inputs = make_inputs(n, h, v, torch.bfloat16, torch.device("cpu"))
    cases = {"eager bf16": ("eager", None), "ours fp32-upcast": ("ours", "fp32-upcast"),
             "ours native": ("ours", "native")}
    samples = {(name, mode): ([], []) for name in cases for mode in MODES}
    forced = os.environ.get(chunked.GEMM_PRECISION_ENV)
    try:
        for rep in range(repeats + 1):  # the first round warms up
            for (name, mode), (cpu, wall) in samples.items():
                case, policy = cases[name]
                os.environ[chunked.GEMM_PRECISION_ENV] = policy or "auto"
                c0, w0 = time.process_time(), time.perf_counter()
                run_case(case, mode, *inputs)
                if rep:
                    cpu.append(time.process_time() - c0)
                    wall.append(time.perf_counter() - w0)
    finally:
        os.environ.pop(chunked.GEMM_PRECISION_ENV)
        if forced is not None:
            os.environ[chunked.GEMM_PRECISION_ENV] = forced
    return {key: (statistics.median(cpu), statistics.median(wall)) for key, (cpu, wall) in samples.items()}


def print_head(n: int, h: int, v: int, repeats: int) -> None:
    times = head_times(n, h, v, repeats)
    print(f"\nlinear_logprobs, bf16 inputs, N={n} H={h} V={v}, median of {repeats}")
    print(f"{'case':>18} {'mode':>8} {'CPU ms':>9} {'wall ms':>9} {'CPU / eager':>12}")
    for (name, mode), (cpu, wall) in times.items():
        print(f"{name:>18} {mode:>8} {cpu * 1e3:>9.0f} {wall * 1e3:>9.0f} "
              f"{cpu / times[('eager bf16', mode)][0]:>11.2f}x")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--h", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--head", type=int, nargs=3, metavar=("N", "H", "V"),
                   help="also time the bf16 head at this shape under each policy against eager bf16")
    args = p.parse_args(argv)
    native = chunked.cpu_has_native(torch.bfloat16)
    print(f"{device_name(torch.device('cpu'))}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}, AMX {torch.cpu._is_amx_tile_supported()}, "
          f"oneDNN bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()} -> native bf16 {native}; the head takes "
          f"{chunked.gemm_dtype(torch.bfloat16, torch.device('cpu'))} GEMMs for bf16 inputs")
    load = LoadWatch(threads=torch.get_num_threads())
    print(f"{'H':>5} {'GEMM':>6} {'M x N x K':>18} {'fp32 GFLOP/s cpu (wall)':>24} {'bf16 GFLOP/s cpu (wall)':>24} "
          f"{'bf16/fp32 cpu':>13}")
    for h in args.h:
        for name in ("logits", "dX", "dW"):
            a, b = operands(name, h, torch.float32)
            f32, b16 = rate(a, b, args.repeats), rate(*operands(name, h, torch.bfloat16), args.repeats)
            shape = f"{a.shape[0]} x {b.shape[1]} x {a.shape[1]}"
            print(f"{h:>5} {name:>6} {shape:>18} {f'{f32[0]:.1f} ({f32[1]:.1f})':>24} "
                  f"{f'{b16[0]:.1f} ({b16[1]:.1f})':>24} {b16[0] / f32[0]:>12.2f}x")
    if args.head:
        print_head(*args.head, repeats=max(1, args.repeats // 3))
    load.stop()
    for line in load.lines()[:2]:  # the load, and a warning when the machine was busy
        print(line)


if __name__ == "__main__":
    main()
