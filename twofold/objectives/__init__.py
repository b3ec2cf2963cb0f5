"""Every loss as a function of per-token log-probs plus per-token / per-sequence constants (docs/objectives.md).

Each `*_loss` returns (loss, metrics) with detached metric tensors, takes the padded layout ([B,T] per token,
[B] per sequence) or the packed one ([N] per token + seq_index [N], [S] per sequence), and runs the same
token-local math a fused kernel applies (`token_local.TOKEN_LOCAL`; DPO/SimPO: `pairs.SEQUENCE_LEVEL`).
Aggregation: `aggregate.token_weights`. Group statistics: `groups`. What the engine knows of each objective: its
`spec.ObjectiveSpec`, declared beside the loss; `SPECS` is the one list of them (`register` adds one).
"""
from collections.abc import Mapping
from typing import Callable

from twofold.objectives.aggregate import AGGREGATIONS, aggregate, token_weights
from twofold.objectives.groups import dynamic_sampling_mask, group_advantages, group_sizes, overlong_reward, r_hat
from twofold.objectives.jepo import JEPO, format_advantages, jepo_group_terms, jepo_loss, jepo_statistics
from twofold.objectives.nft import NFT, PROMPT_WEIGHTS, nft_loss
from twofold.objectives.oreal import OREAL, TokenRewardHead, oreal_loss, oreal_token_weights, token_rm_loss
from twofold.objectives.pairs import DPO, REDI, SEQUENCE_LEVEL, SIMPO, dpo_loss, redi_loss, simpo_loss
from twofold.objectives.ppo import (CISPO, DAPO, DRGRPO, GRPO, GSPO, cispo_loss, dapo_loss, drgrpo_loss, grpo_loss,
                                   gspo_loss)
from twofold.objectives.sft import RFT, SFT, rft_loss, sft_loss
from twofold.objectives.spec import SPECS, ObjectiveSpec, get_spec, names, register
from twofold.objectives.token_local import KL_ESTIMATORS, KL_LOSSES, TOKEN_LOCAL, kl_token, with_entropy_bonus

DEFAULT_OBJECTIVE = "sft"  # the config's objective.name when none is given
for _spec in (SFT, RFT, GRPO, DAPO, DRGRPO, NFT, OREAL, REDI, DPO, SIMPO, JEPO, GSPO, CISPO):
    register(_spec)


class _Losses(Mapping):
    """name -> loss of every registered objective (a view of `SPECS`: a registered spec appears here too)."""

    def __getitem__(self, name: str) -> Callable:
        return SPECS[name].loss

    def __iter__(self):
        return iter(SPECS)

    def __len__(self) -> int:
        return len(SPECS)


# One mapping from name to loss; signatures differ by family (see each function).
OBJECTIVES: Mapping[str, Callable] = _Losses()

__all__ = ["AGGREGATIONS", "DEFAULT_OBJECTIVE", "KL_ESTIMATORS", "KL_LOSSES", "OBJECTIVES", "PROMPT_WEIGHTS",
           "SEQUENCE_LEVEL", "SPECS", "TOKEN_LOCAL", "ObjectiveSpec", "TokenRewardHead", "aggregate", "cispo_loss",
           "dapo_loss", "dpo_loss", "drgrpo_loss", "dynamic_sampling_mask", "format_advantages", "get_spec",
           "group_advantages", "group_sizes", "grpo_loss", "gspo_loss", "jepo_group_terms", "jepo_loss",
           "jepo_statistics", "kl_token", "names", "nft_loss", "oreal_loss", "oreal_token_weights",
           "overlong_reward", "r_hat", "redi_loss", "register", "rft_loss", "sft_loss", "simpo_loss",
           "token_rm_loss", "token_weights", "with_entropy_bonus"]
