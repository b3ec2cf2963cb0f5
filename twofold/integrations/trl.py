"""TRL: `GRPOTrainer` trains with twofold's fused LM-head loss and any of its online objectives.

    from twofold.integrations.trl import GRPOTrainer              # a subclass of trl.GRPOTrainer
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(loss_type="grpo", ...),
                          train_dataset=dataset, processing_class=tokenizer, objective="nft")
    trainer.train()

It works the way TRL's Liger switch did (`use_liger_kernel` routed `compute_loss` to `LigerFusedLinearGRPOLoss`):
only the loss changes. Each step runs the model's decoder once (`twofold.completion_hidden`), then a
`twofold.nn.FusedLinearPolicyLoss` on the completion tokens' hidden states and the LM head (bias included), so
no [B, T, V] logits exist. Generation, rewards, advantages, reference/old log-probs, batching and logging stay
TRL's.

- objective="grpo" (default): TRL's PPO-clip loss for `args.loss_type` in grpo / bnpo / dr_grpo / dapo, with
  `epsilon`, `epsilon_high`, `beta` (k3 KL) and TRL's normalisers and gradient-accumulation scaling; the loss equals
  `trl.GRPOTrainer`'s own on the same batch (tests/test_integrations_trl.py checks it to 1e-6 in fp32).
- objective="nft" / "rft": the binary reward of each completion (TRL's weighted sum of the reward functions; it
  must be 0/1 or -1/+1) and its group's correctness rate, computed over the whole group before TRL shuffles and
  splits the batch, replace the advantages. `args.loss_type` still picks the aggregation (TRL's default "dapo" is
  the token mean over the batch). `objective_kwargs` go to the objective (NFT: eps, prompt_weight, ...).

Not supported (a ValueError names the setting): use_bias_correction_kl=True with beta != 0 (TRL's default for
it is True: set it to False to use a KL term; the KL is then TRL's plain k3), importance_sampling_level="sequence",
delta, top_entropy_quantile
< 1, off_policy_mask_threshold, the entropy bonus, vLLM importance-sampling correction and MoE aux losses (TRL's
own loss handles those); loss types other than the four above. The decoder is called on the unwrapped model,
as TRL's Liger path did: fine on one process and under FSDP, not under DDP's wrapper.
"""
from __future__ import annotations

import torch
import trl

from twofold.completion import completion_hidden
from twofold.nn import LOSS_TYPES, FusedLinearPolicyLoss


class GRPOTrainer(trl.GRPOTrainer):
    """`trl.GRPOTrainer` whose loss is twofold's. objective: "grpo", "nft" or "rft"; objective_kwargs: the
    objective's keyword arguments."""

    def __init__(self, *args, objective: str = "grpo", objective_kwargs: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_supported()
        self.twofold_loss = FusedLinearPolicyLoss(
            objective, loss_type=self.loss_type, beta=self.beta,  # beta != 0 with NFT/RFT: an error, not ignored
            epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, temperature=self.temperature,
            max_completion_length=self.max_completion_length, **(objective_kwargs or {}))

    def _check_supported(self):
        a = self.args
        unsupported = {  # setting -> how to run without it
            "loss_type": (self.loss_type not in LOSS_TYPES, f"use one of {LOSS_TYPES}"),
            "importance_sampling_level": (self.importance_sampling_level != "token", "use 'token'"),
            "delta": (a.delta is not None, "leave it None"),
            "use_bias_correction_kl": (
                self.beta != 0 and a.use_bias_correction_kl,
                f"TRL's default True weights the KL by the importance ratio; with beta={self.beta} set "
                "GRPOConfig(use_bias_correction_kl=False) for the plain k3 KL, or beta=0"),
            "top_entropy_quantile": (self.top_entropy_quantile < 1.0, "leave it 1.0"),
            "off_policy_mask_threshold": (self.off_policy_mask_threshold is not None, "leave it None"),
            "entropy_coef": (self._entropy_bonus_enabled, "leave it 0"),
            "vllm_importance_sampling_correction": (self.use_vllm and self.vllm_importance_sampling_correction,
                                                    "set it False"),
            "router_aux_loss_coef": (self.aux_loss_enabled, "leave it 0"),
        }
        bad = [f"{name} ({hint})" for name, (is_bad, hint) in unsupported.items() if is_bad]
        if bad:
            raise ValueError(f"twofold's GRPOTrainer does not support these GRPOConfig settings: {'; '.join(bad)}. "
                             "Use trl.GRPOTrainer for them")

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # Kept for the NFT/RFT inputs: TRL reduces these to advantages and does not return them.
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._twofold_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.twofold_loss.objective == "grpo":
            return output
        per_func = self._twofold_rewards_per_func  # [all processes' completions, reward functions]
        rewards = (per_func * self.reward_weights.to(per_func.device)).nansum(dim=1)
        mode = "train" if self.model.training else "eval"
        n = self.num_generations if mode == "train" else self.num_generations_eval
        group_ids = torch.arange(rewards.shape[0], device=rewards.device) // n  # TRL lays each group out contiguously
        correct = (rewards > 0).to(rewards.dtype)
        correct_rate = correct.view(-1, n).mean(1).repeat_interleave(n)  # over the whole group, before any split
        local = slice(self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs))
        output.update(rewards=rewards[local], group_ids=group_ids[local], correct_rate=correct_rate[local])
        return output

    def _compute_loss(self, model, inputs):
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        with self.accelerator.autocast():
            c = completion_hidden(self.accelerator.unwrap_model(model), input_ids, attention_mask, mask)
        if c.logit_scale != 1.0:
            raise ValueError("models that scale their logits are not supported by this trainer's fused loss")
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        num_items = None
        if self.loss_type == "dapo":  # TRL's normaliser: the generation batch's tokens, per accumulation window
            num_items = inputs["num_items_in_batch"] * (accumulation / self.args.steps_per_generation
                                                         if mode == "train" else 1)
        extra = {k: inputs[k] for k in ("rewards", "group_ids", "correct_rate") if k in inputs}
        loss, metrics = self.twofold_loss(c.hidden, c.weight, completion_ids, mask, inputs["advantages"], c.bias,
                                          ref_per_token_logps=inputs.get("ref_per_token_logps"),
                                          old_per_token_logps=inputs.get("old_per_token_logps"),
                                          num_items_in_batch=num_items, **extra)
        for name, value in metrics.items():
            self._metrics[mode][f"twofold/{name}"].append(self.accelerator.gather(value.float()).mean().item())
        if self.loss_type != "dapo":  # TRL divides these by the accumulation steps (HF's own scaling is off)
            loss = loss / accumulation
        return loss
