"""Compile the Triton kernels ahead of time for a GPU architecture, without a GPU.

    python -m twofold.kernels.triton_aot                   # sm_90 (H100/H200), bf16 and fp32, every autotune config
    python -m twofold.kernels.triton_aot --arch 90 --dtype bf16 --largest-only   # one config per kernel, quick
    python -m twofold.kernels.triton_aot --jobs 1          # one compile at a time (default: one per CPU core)

Triton lowers to PTX and runs ptxas (shipped in the triton wheel) on any machine, so this catches what the CPU
interpreter cannot: tile shapes `tl.dot` rejects, dtype mismatches and configs whose shared memory does not fit
the target (the autotuner would drop them at launch; a pinned one would fail). Prints one line per (kernel,
config) with its shared memory; exits non-zero when a config fails to compile or does not fit. Compiles are
independent and single-threaded (LLVM, then ptxas), so they run in `--jobs` worker processes; lines print in order.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("twofold.kernels.triton_aot compiles real GPU code: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from twofold.kernels.triton_kernels import _dlogits_kernel, _dw_kernel, _dx_kernel, _stats_kernel  # noqa: E402
from twofold.kernels.triton_logprobs import _gemm_configs, _logits_configs  # noqa: E402

# Largest dynamic shared memory one block may use, by compute capability (CUDA programming guide).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
TL_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def kernel_specs(dtype: str):
    """(kernel, pointer/float types by argument name, constexpr values, autotune configs). Unnamed args are i32."""
    x = "*" + TL_DTYPE[dtype]
    precision = "ieee" if dtype == "fp32" else "tf32"
    idx = {"order_ptr": "*i64", "nvalid_ptr": "*i64"}
    return [
        (_stats_kernel, {"h_ptr": x, "w_ptr": x, "y_ptr": "*i64", **idx, "m_ptr": "*fp32", "s_ptr": "*fp32",
                         "t_ptr": "*fp32", "e_ptr": "*fp32", "z_ptr": "*fp32", "inv_t": "fp32"},
         {"WANT_ENTROPY": True, "STORE_LOGITS": False, "PRECISION": precision}, _logits_configs()),
        (_dlogits_kernel, {"h_ptr": x, "w_ptr": x, **idx, "y_ptr": "*i64", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
                           "g_ptr": "*fp32", "gh_ptr": "*fp32", "ws_ptr": x, "inv_t": "fp32"},
         {"RECOMPUTE": True, "HAS_GH": True, "PRECISION": precision}, _logits_configs()),
        (_dx_kernel, {"ws_ptr": x, "w_ptr": x, **idx, "acc_ptr": "*fp32", "out_ptr": x},
         {"ACC_IN": True, "SCATTER": True, "PRECISION": precision}, _gemm_configs()),
        (_dw_kernel, {"ws_ptr": x, "x_ptr": x, **idx, "out_ptr": x},
         {"ACC_IN": False, "PRECISION": precision}, _gemm_configs()),
    ]


def compile_one(kernel, types: dict, constants: dict, config, arch: int):
    consts = {**constants, **config.kwargs}
    signature = {name: "constexpr" if name in consts else types.get(name, "i32") for name in kernel.arg_names}
    source = ASTSource(kernel, signature, consts)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 64 if arch < 100 else 128), options=options)


def footprint(config) -> int:
    """Elements the pipelined tiles of a config hold (A and B tiles x stages): the biggest is the one most likely
    to overflow shared memory."""
    kw = config.kwargs
    rows, cols, depth = (kw["BLOCK_N"], kw["BLOCK_V"], kw["BLOCK_H"]) if "BLOCK_V" in kw else (
        kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"])
    return (rows + cols) * depth * config.num_stages


def compile_task(task) -> tuple[int | None, str | None]:
    """Worker body for one (dtype, kernel index, config index): (shared memory in bytes, None) or (None, error)."""
    arch, dtype, k, c = task
    kernel, types, constants, configs = kernel_specs(dtype)[k]
    try:
        return compile_one(kernel, types, constants, configs[c], arch).metadata.shared, None
    except Exception as err:  # a compile error is the finding, reported with the config
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"


def check(arch: int, dtypes: list[str], largest_only: bool, jobs: int = 1) -> list[str]:
    """Compile every (kernel, config, dtype) in `jobs` processes; return the failures (empty when all compile and
    fit). Registers and spills are only known once loaded on a GPU: shared memory is what is checked here."""
    limit = SHARED_LIMIT.get(arch, 99 * 1024)
    tasks, labels = [], []
    for dtype in dtypes:
        for k, (kernel, _, _, configs) in enumerate(kernel_specs(dtype)):
            picked = [max(range(len(configs)), key=lambda c: footprint(configs[c]))] if largest_only else range(
                len(configs))
            for c in picked:
                config = configs[c]
                tasks.append((arch, dtype, k, c))
                labels.append(f"sm_{arch} {dtype} {kernel.__name__} {config.kwargs} w{config.num_warps} "
                              f"s{config.num_stages}")
    # fork: the workers inherit the imported kernels instead of importing triton and torch again
    with ProcessPoolExecutor(max(1, jobs), mp_context=multiprocessing.get_context("fork")) as pool:
        results = pool.map(compile_task, tasks)
        failures = []
        for label, (shared, error) in zip(labels, results):
            if error is not None:
                failures.append(f"{label}: {error}")
                print(f"FAIL {label}: {error}", flush=True)
            else:
                print(f"{'ok  ' if shared <= limit else 'FAIL'} {label}: shared {shared / 1024:.0f} KiB "
                      f"(limit {limit // 1024})", flush=True)
                if shared > limit:
                    failures.append(f"{label}: shared memory {shared} > {limit}")
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(TL_DTYPE))
    p.add_argument("--largest-only", action="store_true",
                   help="per kernel only the config with the largest tile footprint (a quick check)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles at once (default: CPU cores)")
    args = p.parse_args(argv)
    failures = check(args.arch, args.dtype, args.largest_only, args.jobs)
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
