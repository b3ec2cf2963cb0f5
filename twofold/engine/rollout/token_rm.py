"""OREAL's token reward model, trained alongside the policy (docs/objectives.md §7.2; InternLM/OREAL).

A copy of the initial policy's trunk (FSDP2-sharded like the policy) with `objectives.TokenRewardHead` (zero-init,
as in the paper) in place of the LM head; trained with `objectives.token_rm_loss` (BCE of the sequence-mean score
against correctness) by its own AdamW. Its per-token scores (no grad) become the policy's `token_scores`.
The head is replicated, not sharded (H + 1 numbers), so its gradient is summed over ranks by hand.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from twofold.engine.run.schema import ModelConfig
from twofold.engine.train.distributed import DistEnv
from twofold.engine.train.model import PolicyModel, build_policy
from twofold.engine.train.packing import MicroBatch, Sequence
from twofold.engine.train.trainer import score_packed, sequence_logprobs
from twofold.objectives import TokenRewardHead, token_rm_loss


class TokenScorer(PolicyModel):
    """Trunk -> hidden -> token score; same call signature as the policy (targets pick the scored positions).

    Position p of a packed row holds the target token p+1, so the policy's log-prob of that token comes from the
    hidden state at p, which has not read it. A token's *score* must have read it (OREAL scores the prefix that
    ends with the token: a slip can only be seen once it is written), so the score at p is the head applied at
    p+1; the last position of each sequence (its final token is never an input) keeps its own hidden state.
    """

    score_own_token: bool = True
    """False gives the former scores, one token early (kept only so bench.token_rm can measure the difference)."""

    def forward(self, input_ids: Tensor, position_ids: Tensor, targets: Tensor, **_) -> Tensor:
        trunk = self.causal_lm.get_decoder()
        hidden = trunk(input_ids=input_ids[None], position_ids=position_ids[None], use_cache=False).last_hidden_state
        scores = self.score_head(hidden[0].float())
        if not self.score_own_token:
            return scores
        next_in_same_sequence = torch.zeros_like(position_ids, dtype=torch.bool)
        next_in_same_sequence[:-1] = position_ids[1:] == position_ids[:-1] + 1  # positions restart per sequence
        return torch.where(next_in_same_sequence, scores.roll(-1), scores)


class TokenRewardModel:
    def __init__(self, model_cfg: ModelConfig, env: DistEnv, lr: float, seed: int, budget: int, pad_token_id: int):
        self.env, self.budget, self.pad_token_id = env, budget, pad_token_id
        self.model = build_policy(model_cfg, env, seed=seed, policy_cls=TokenScorer)
        hidden = self.model.causal_lm.config.hidden_size
        self.model.score_head = TokenRewardHead(hidden, zero_init=True).to(env.device)  # outside FSDP: replicated
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    def scores(self, batch: list[Sequence]) -> list[list[float]]:
        """The token scores of each sequence's response tokens."""
        return sequence_logprobs(self.model, batch, self.env, self.budget, self.pad_token_id)

    def packed_scores(self, micro: list[MicroBatch]) -> list[Tensor]:
        """[N] token scores of each packed micro-batch (the layout of a per-token field)."""
        return score_packed(self.model, micro, self.env)

    def update(self, micro: list[MicroBatch], total: int) -> dict[str, float]:
        """One optimizer step on the exact mean loss over the `total` sequences of the step, packed in this rank's
        micro-batches `micro` (any split over micro-batches and ranks)."""
        loss_sum, hits = 0.0, 0.0
        for mb in micro:
            mb = mb.to(self.env.device)
            scores = self.model(mb.input_ids, mb.position_ids, mb.targets)
            loss, metrics = token_rm_loss(scores, mb.seq_fields["rewards"], mb.loss_mask, seq_index=mb.seq_index,
                                          validate=False)
            share = len(mb.sequence_ids) / total
            (loss * share).backward()
            loss_sum += float(loss) * share
            hits += float(metrics["accuracy"]) * share
        head = [p for p in self.model.score_head.parameters() if p.grad is not None]
        if self.env.world_size > 1:
            for p in head:
                dist.all_reduce(p.grad)
            sums = torch.tensor([loss_sum, hits], dtype=torch.float64, device=self.env.device)
            dist.all_reduce(sums)
            loss_sum, hits = sums.tolist()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"token_rm/loss": loss_sum, "token_rm/accuracy": hits}
