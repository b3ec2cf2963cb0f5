"""Per-token math on the LM head without materialising [tokens x vocab] logits."""
from kernels.api import linear_cross_entropy, linear_logprobs, register_backend

__all__ = ["linear_logprobs", "linear_cross_entropy", "register_backend"]
