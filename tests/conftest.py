"""Session-wide test setup."""
import os

import torch

# Triton decides between compiled and interpreted kernels when a kernel is decorated, and other libraries
# (transformers, vLLM, torch._inductor) may import triton first. Without a GPU the kernels run in Triton's
# interpreter, so decide it here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
