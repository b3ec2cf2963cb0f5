"""Measurement shared by the benchmarks: interleaved median timing and honest peak-memory probes.

Time: median of repeats after warm-up, every case run once per repeat so drift hits all cases alike; tables print
[min-max] over the repeats beside the median, and the load average before and after the run (`LoadWatch`), with a
warning when other work shared the machine: then only ratios between cases of the same run mean anything.
Memory: on CUDA, torch.cuda.max_memory_allocated minus what was allocated before the call. On CPU torch's
allocator is invisible to tracemalloc, so a case runs in a fresh subprocess and reports its peak RSS growth over
one call after a warm-up (VmHWM, reset just before the call, minus VmRSS at that point), with glibc's mmap
threshold fixed at 64 KiB so freed tensors leave RSS at once instead of staying cached in the heap.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Hashable

import torch

CPU_MEMORY_METHOD = ("peak RSS growth over one call after a warm-up (VmHWM - VmRSS), fresh subprocess per case, "
                     "glibc mmap threshold fixed at 64 KiB")
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated minus memory allocated before the call"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call: CUDA events on GPU (no host timing of async work), perf_counter elsewhere."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


class Spread(float):
    """A median (it is the float) that also carries the min and max of the samples it came from."""

    def __new__(cls, samples: list[float]):
        self = super().__new__(cls, statistics.median(samples))
        self.low, self.high, self.samples = min(samples), max(samples), list(samples)
        return self

    def scaled(self, factor: float) -> "Spread":
        return Spread([x * factor for x in self.samples])

    def fmt(self, spec: str = ".1f", scale: float = 1.0) -> str:
        """'median [min-max]', each multiplied by `scale`."""
        return f"{self * scale:{spec}} [{self.low * scale:{spec}}-{self.high * scale:{spec}}]"

    def as_dict(self, scale: float = 1.0) -> dict:
        return {"median": self * scale, "min": self.low * scale, "max": self.high * scale}


def ratio(a: Spread, b: Spread) -> Spread:
    """a/b per repeat (repeat r of a against repeat r of b, both timed back to back): median [min-max]."""
    return Spread([x / y for x, y in zip(a.samples, b.samples)])


def median_times(cases: dict[Hashable, Callable[[], object]], device: torch.device, warmup: int,
                 repeats: int, progress: str | None = None) -> dict[Hashable, Spread]:
    """Seconds per case as a `Spread` over the repeats; cases interleaved within each repeat so drift hits all
    alike. With `progress` (a label), one line per repeat goes to stderr, so a long run shows it is alive."""
    times = {key: [] for key in cases}
    start = time.perf_counter()
    for r in range(warmup + repeats):
        for key, run in cases.items():
            seconds = time_call(run, device)
            if r >= warmup:
                times[key].append(seconds)
        if progress:
            kind = "warm-up" if r < warmup else "repeat"
            done = r + 1 if r < warmup else r + 1 - warmup
            print(f"[{progress}] {kind} {done}/{warmup if r < warmup else repeats} done, "
                  f"{time.perf_counter() - start:.0f} s elapsed", file=sys.stderr, flush=True)
    return {key: Spread(v) for key, v in times.items()}


class LoadWatch:
    """The 1-minute load average before and after a benchmark, and whether other work shared the machine.

    Busy means the load before exceeded half the cores, or the load after exceeded the threads this benchmark
    runs plus half the cores (the 1-minute average lags, so the run's own threads are in the after figure)."""

    def __init__(self, threads: int):
        self.threads, self.cores = threads, os.cpu_count() or 1
        self.before, self.after = os.getloadavg()[0], None

    def stop(self) -> "LoadWatch":
        self.after = os.getloadavg()[0]
        return self

    @property
    def busy(self) -> bool:
        return self.before > self.cores / 2 or (self.after or 0.0) > self.threads + self.cores / 2

    def as_dict(self) -> dict:
        return {"load_before": self.before, "load_after": self.after, "cores": self.cores, "busy": self.busy}

    def lines(self) -> list[str]:
        out = [f"load average (1 min) before {self.before:.2f}, after {self.after:.2f}, on {self.cores} cores"]
        if self.busy:
            out.append("WARNING: the machine was busy with other work; absolute times are inflated and noisy, "
                       "only ratios between cases of this run (interleaved) are meaningful")
        out.append(READ_RATIOS)
        return out


READ_RATIOS = ("how to read: times are median [min-max] over the repeats; a ratio x/y below 1.00 means x is faster "
               "(or smaller) than y; ratios are taken repeat by repeat, so shared slowdowns cancel")


def rss_bytes(field: str = "VmRSS") -> int:
    """Current (VmRSS) or peak (VmHWM) resident set of this process, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS and return that (bytes). (ru_maxrss cannot serve: it survives fork+exec.)"""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: 5 resets the peak resident set
    return rss_bytes()


def peak_extra_memory(run: Callable[[], object], device: torch.device) -> int:
    """Bytes above what existed before, at the peak of one call of `run` (in this process)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    run()  # warm-up: lazy library init and thread pools are not the case's memory
    base = reset_peak_rss()
    run()
    return rss_bytes("VmHWM") - base


def memory_in_subprocess(module: str, probe_args: list[str]) -> int:
    """Run `python -m module --_memory-probe ...` in a fresh process; it prints peak_extra_memory's result last."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    cmd = [sys.executable, "-m", module, "--_memory-probe", *probe_args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return int(out.strip().splitlines()[-1])


def memory_method(device: torch.device) -> str:
    return CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD


def add_shape_arguments(p) -> None:
    """The options every microbenchmark shares: device, shape, dtype, repeats, output."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--h", type=int, default=512)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small shape (N=2048, V=8000): a smoke run in seconds")
    p.add_argument("--out", help="write the results as JSON here")


def finish_shape_arguments(args):
    if args.quick:
        args.n, args.v, args.repeats = 2048, 8000, 3
    return args


def shape_probe_args(args) -> list[str]:
    """The arguments a memory-probe subprocess needs to rebuild the same inputs."""
    return ["--n", str(args.n), "--h", str(args.h), "--v", str(args.v), "--dtype", args.dtype]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    return f"{model} ({os.cpu_count()} cores)"
