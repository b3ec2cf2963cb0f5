"""Every loss as a function of per-token log-probs plus per-token / per-sequence constants (OBJECTIVES.md).

Each `*_loss` returns (loss, metrics) with detached metric tensors, takes the padded layout ([B,T] per token,
[B] per sequence) or the packed one ([N] per token + seq_index [N], [S] per sequence), and runs the same
token-local math a fused kernel applies (`token_local.TOKEN_LOCAL`). Aggregation: `aggregate.token_weights`.
"""
from objectives.aggregate import AGGREGATIONS, aggregate, token_weights
from objectives.groups import dynamic_sampling_mask, group_advantages, group_sizes, overlong_reward, r_hat
from objectives.ppo import dapo_loss, drgrpo_loss, grpo_loss
from objectives.sft import rft_loss, sft_loss
from objectives.token_local import KL_ESTIMATORS, TOKEN_LOCAL, kl_token

OBJECTIVES = {
    "sft": sft_loss,
    "rft": rft_loss,
    "grpo": grpo_loss,
    "dapo": dapo_loss,
    "drgrpo": drgrpo_loss,
}

__all__ = ["AGGREGATIONS", "KL_ESTIMATORS", "OBJECTIVES", "TOKEN_LOCAL", "aggregate", "dapo_loss",
           "drgrpo_loss", "dynamic_sampling_mask", "group_advantages", "group_sizes", "grpo_loss", "kl_token",
           "overlong_reward", "r_hat", "rft_loss", "sft_loss", "token_weights"]
