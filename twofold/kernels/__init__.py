"""Per-token math on the LM head without materialising [tokens x vocab] logits."""
import importlib.util

from twofold.kernels.api import linear_cross_entropy, linear_logprobs, register_backend


def _triton_backend(*args, **kwargs):
    # Imported on first use: the kernels are compiled or interpreted depending on TRITON_INTERPRET at import time,
    # so importing them with the package would fix that choice before tests can set it.
    from twofold.kernels.triton_logprobs import triton_linear_logprobs
    return triton_linear_logprobs(*args, **kwargs)


if importlib.util.find_spec("triton") is not None:
    register_backend("triton", _triton_backend)

__all__ = ["linear_logprobs", "linear_cross_entropy", "register_backend"]
