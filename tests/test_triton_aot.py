"""The Triton kernels compile for Hopper (sm_90), bf16 and fp32, on a CPU machine: what the interpreter cannot
check (tl.dot tile and dtype rules, shared memory per config) is checked here. CI compiles each kernel's largest
autotune config (the one most likely not to fit; 2-25 s a compile, fp32's FMA tiles the slowest), two compiles at a
time (one per core of the CI machine); `python -m twofold.kernels.triton_aot` checks all."""
import os
import subprocess
import sys


def test_every_kernel_compiles_for_sm90_and_its_largest_config_fits(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")  # a fresh cache: really compile
    out = subprocess.run([sys.executable, "-m", "twofold.kernels.triton_aot", "--arch", "90", "--dtype", "bf16", "fp32",
                          "--largest-only", "--jobs", "2"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("ok ")]
    assert len(lines) == 2 * 4, out.stdout  # 2 dtypes x 4 kernels
    assert out.stdout.strip().endswith("0 failure(s)")
