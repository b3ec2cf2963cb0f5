"""Every loss as a function of per-token log-probs plus per-token / per-sequence constants (docs/objectives.md).

Each `*_loss` returns (loss, metrics) with detached metric tensors, takes the padded layout ([B,T] per token,
[B] per sequence) or the packed one ([N] per token + seq_index [N], [S] per sequence), and runs the same
token-local math a fused kernel applies (`token_local.TOKEN_LOCAL`; DPO/SimPO: `pairs.SEQUENCE_LEVEL`).
Aggregation: `aggregate.token_weights`. Group statistics: `groups`.
"""
from twofold.objectives.aggregate import AGGREGATIONS, aggregate, token_weights
from twofold.objectives.groups import dynamic_sampling_mask, group_advantages, group_sizes, overlong_reward, r_hat
from twofold.objectives.jepo import format_advantages, jepo_group_terms, jepo_loss, jepo_statistics
from twofold.objectives.nft import PROMPT_WEIGHTS, nft_loss
from twofold.objectives.oreal import TokenRewardHead, oreal_loss, oreal_token_weights, token_rm_loss
from twofold.objectives.pairs import SEQUENCE_LEVEL, dpo_loss, redi_loss, simpo_loss
from twofold.objectives.ppo import cispo_loss, dapo_loss, drgrpo_loss, grpo_loss, gspo_loss
from twofold.objectives.sft import rft_loss, sft_loss
from twofold.objectives.token_local import KL_ESTIMATORS, KL_LOSSES, TOKEN_LOCAL, kl_token, with_entropy_bonus

# One dict from name to loss; signatures differ by family (see each function).
OBJECTIVES = {
    "sft": sft_loss,
    "rft": rft_loss,
    "grpo": grpo_loss,
    "dapo": dapo_loss,
    "drgrpo": drgrpo_loss,
    "nft": nft_loss,
    "oreal": oreal_loss,
    "redi": redi_loss,
    "dpo": dpo_loss,
    "simpo": simpo_loss,
    "jepo": jepo_loss,
    "gspo": gspo_loss,
    "cispo": cispo_loss,
}

# Mini-batch statistics an objective needs beyond token/sequence counts: name -> a no-grad function of (part of)
# the batch returning additive tensors; the engine sums them over micro-batches and ranks and passes the totals to
# the loss under the same names, so that every micro-batch loss is its exact share (JEPO's advantage stds).
BATCH_STATISTICS = {"jepo": jepo_statistics}

__all__ = ["AGGREGATIONS", "BATCH_STATISTICS", "KL_ESTIMATORS", "KL_LOSSES", "OBJECTIVES", "PROMPT_WEIGHTS",
           "SEQUENCE_LEVEL", "TOKEN_LOCAL", "TokenRewardHead", "aggregate", "cispo_loss", "dapo_loss", "dpo_loss",
           "drgrpo_loss", "dynamic_sampling_mask", "format_advantages", "group_advantages", "group_sizes",
           "grpo_loss", "gspo_loss", "jepo_group_terms", "jepo_loss", "jepo_statistics", "kl_token", "nft_loss",
           "oreal_loss", "oreal_token_weights", "overlong_reward", "r_hat", "redi_loss", "rft_loss", "sft_loss",
           "simpo_loss", "token_rm_loss", "token_weights", "with_entropy_bonus"]
