"""twofold: fused LM-head kernels, negative-aware RL objectives and a training engine, in one namespace.

    import twofold
    logp = twofold.linear_logprobs(hidden, lm_head.weight, targets)        # [N] fp32, never [N, V] logits
    loss, metrics = twofold.nft_loss(logp, old_logp, rewards, group_ids, mask)

Other trainers: `twofold.completion_logprobs` (completion log-probs of any HF causal LM), `twofold.nn` (drop-in
fused policy-loss modules), `twofold.integrations.trl` and `twofold.integrations.verl`.
Subpackages: `twofold.kernels` (log-probs, entropy and fused losses from hidden states and the head weight),
`twofold.objectives` (every loss as a function of per-token log-probs), `twofold.engine` (the training system;
imported on demand, it loads transformers and, online, vLLM).
"""
from twofold import nn
from twofold.completion import completion_hidden, completion_logprobs
from twofold.engine.verifier import verify_batch
from twofold.kernels import linear_cross_entropy, linear_logprobs
from twofold.kernels.fused import fused_linear_loss
from twofold.objectives import (OBJECTIVES, TOKEN_LOCAL, dapo_loss, dpo_loss, drgrpo_loss, group_advantages,
                                grpo_loss, jepo_loss, nft_loss, oreal_loss, r_hat, redi_loss, rft_loss, sft_loss,
                                simpo_loss)

__version__ = "0.1.0"

__all__ = ["OBJECTIVES", "TOKEN_LOCAL", "completion_hidden", "completion_logprobs", "dapo_loss", "dpo_loss",
           "drgrpo_loss", "fused_linear_loss", "group_advantages", "grpo_loss", "jepo_loss", "linear_cross_entropy",
           "linear_logprobs", "nft_loss", "nn", "oreal_loss", "r_hat", "redi_loss", "rft_loss", "sft_loss",
           "simpo_loss", "verify_batch"]
