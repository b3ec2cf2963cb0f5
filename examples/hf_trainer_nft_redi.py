"""twofold objectives inside a plain `transformers.Trainer`: NFT (grouped online samples) and REDI (pairs).

    .venv/bin/python examples/hf_trainer_nft_redi.py        # tiny Qwen2 built from a config, CPU, seconds

Only `compute_loss` changes: get per-token log-probs of the counted tokens from the model
(`twofold.completion_logprobs`: any HF causal LM, no [B, T, V] logits), call the loss. The Trainer shuffles rows,
so a micro-batch holds parts of groups: NFT gets each sequence's group correctness rate precomputed over the whole
rollout (`correct_rate`) and the old log-probs from the rollout policy, like the engine does.
Needs `accelerate` (the Trainer requires it).
"""
from __future__ import annotations

import tempfile

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainingArguments

import twofold


def token_logprobs(model, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] fp32 log-prob of each token where `mask` is set (0 elsewhere), given the tokens before it."""
    return twofold.completion_logprobs(model, input_ids, torch.ones_like(input_ids), mask)


class NFTTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logp = token_logprobs(model, inputs["input_ids"], inputs["loss_mask"])
        loss, metrics = twofold.nft_loss(logp, inputs["old_logp"], inputs["rewards"], inputs["group_ids"],
                                         inputs["loss_mask"], correct_rate=inputs["correct_rate"])
        return (loss, metrics) if return_outputs else loss


class REDITrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chosen = token_logprobs(model, inputs["chosen_ids"], inputs["chosen_mask"])
        rejected = token_logprobs(model, inputs["rejected_ids"], inputs["rejected_mask"])
        loss, metrics = twofold.redi_loss(chosen, rejected, inputs["chosen_mask"], inputs["rejected_mask"],
                                          alpha=0.8)
        return (loss, metrics) if return_outputs else loss


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(config)


def rollout_rows(model, groups: int = 3, group_size: int = 4, length: int = 12, prompt: int = 4) -> list[dict]:
    """Synthetic rollout: random responses, binary rewards, and the rollout policy's log-probs (no grad)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (groups * group_size, length), generator=g)
    group_ids = torch.arange(groups).repeat_interleave(group_size)
    rewards = (torch.arange(groups * group_size) % 3 == 0).float()  # every group mixed
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[:, prompt:] = True
    with torch.no_grad():
        old_logp = token_logprobs(model, ids, loss_mask)
    rate = twofold.r_hat(rewards, group_ids)
    return [dict(input_ids=ids[i], loss_mask=loss_mask[i], old_logp=old_logp[i], rewards=rewards[i],
                 group_ids=group_ids[i], correct_rate=rate[i]) for i in range(len(ids))]


def pair_rows(pairs: int = 8, length: int = 10) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    rows = []
    for _ in range(pairs):
        mask_w, mask_l = torch.zeros(length, dtype=torch.bool), torch.zeros(length, dtype=torch.bool)
        mask_w[3:int(torch.randint(5, length + 1, (1,), generator=g))] = True  # prompt 3 tokens, ragged answer
        mask_l[3:int(torch.randint(5, length + 1, (1,), generator=g))] = True
        rows.append(dict(chosen_ids=torch.randint(0, 64, (length,), generator=g), chosen_mask=mask_w,
                         rejected_ids=torch.randint(0, 64, (length,), generator=g), rejected_mask=mask_l))
    return rows


def stack(rows: list[dict]) -> dict:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def train(trainer_cls, model, rows: list[dict], steps: int, out_dir: str) -> list[float]:
    args = TrainingArguments(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                             logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                             remove_unused_columns=False, disable_tqdm=True, seed=0)
    trainer = trainer_cls(model=model, args=args, train_dataset=rows, data_collator=stack)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def main(steps: int = 3) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as out_dir:
        nft_model = tiny_model()
        nft_losses = train(NFTTrainer, nft_model, rollout_rows(nft_model), steps, out_dir)
        redi_losses = train(REDITrainer, tiny_model(), pair_rows(), steps, out_dir)
    return {"nft": nft_losses, "redi": redi_losses}


if __name__ == "__main__":
    for name, losses in main().items():
        print(name, " ".join(f"{loss:.4f}" for loss in losses))
