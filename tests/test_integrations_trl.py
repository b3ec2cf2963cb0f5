"""TRL's GRPOTrainer trains with twofold's fused loss: two optimizer steps on a tiny local model (no downloads),
checked on every micro-batch against TRL's own loss (loss_type="grpo", fp32) and, for NFT, against
twofold.completion_logprobs + twofold.nft_loss on the same batch."""
import functools
import math

import pytest
import torch
from transformers import AutoTokenizer

import twofold
from twofold.engine.train.tiny import save_preset

PROMPTS = ["1+2=", "3+4=", "5+1=", "2+2=", "7+1=", "4+4=", "6+3=", "9+0="]


def parity_reward(completions, **kwargs):
    """A binary reward that varies within groups: the parity of the completion's characters."""
    return [float(sum(map(ord, c)) % 2) for c in completions]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_preset("tiny-llama", tmp_path_factory.mktemp("tiny-llama")))


@functools.cache
def trl_api():
    """(trl, datasets.Dataset, twofold's GRPOTrainer, Recorded), imported when a test first needs them: TRL imports
    vLLM (seconds), which a pytest that only collects this file (the GPU campaign's `-m gpu` stage) need not pay."""
    import trl
    from datasets import Dataset

    from twofold.integrations.trl import GRPOTrainer

    class Recorded(GRPOTrainer):
        """Keeps, per micro-batch, twofold's loss, TRL's own loss on the same inputs, and both gradients."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.records, self.generations = [], []

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            self.generations.append(output)
            return output

        def _compute_loss(self, model, inputs):
            ours = super()._compute_loss(model, inputs)
            params = [p for p in model.parameters() if p.requires_grad]
            record = dict(inputs=inputs, ours=ours.detach(),
                          ours_grad=torch.autograd.grad(ours, params, retain_graph=True, allow_unused=True))
            if self.twofold_loss.objective == "grpo":
                theirs = trl.GRPOTrainer._compute_loss(self, model, inputs)
                record.update(theirs=theirs.detach(),
                              theirs_grad=torch.autograd.grad(theirs, params, allow_unused=True))
            else:
                record.update(theirs=objective_reference(model, inputs, self.twofold_loss.objective,
                                                         self.current_gradient_accumulation_steps,
                                                         self.args.steps_per_generation))
            self.records.append(record)
            return ours

    return trl, Dataset, GRPOTrainer, Recorded


def objective_reference(model, x, objective, accumulation, steps_per_generation):
    """The NFT or RFT loss of a micro-batch the long way: completion_logprobs, then twofold.nft_loss / rft_loss with
    TRL's DAPO normaliser (the generation batch's tokens, per accumulation window)."""
    ids = torch.cat([x["prompt_ids"], x["completion_ids"]], 1)
    attention = torch.cat([x["prompt_mask"], x["completion_mask"]], 1)
    agg = dict(agg="token_mean", num_tokens=x["num_items_in_batch"] * accumulation / steps_per_generation)
    with torch.no_grad():
        logp = twofold.completion_logprobs(model, ids, attention, x["completion_mask"])
        old = x.get("old_per_token_logps", logp)
        if objective == "rft":
            return twofold.rft_loss(logp, x["rewards"], x["completion_mask"], old_logp=old, **agg)[0]
        loss, _ = twofold.nft_loss(logp, old, x["rewards"], x["group_ids"], x["completion_mask"],
                                   correct_rate=x["correct_rate"], **agg)
    return loss


def train(model_dir, tmp_path, objective, loss_type, beta):
    trl, Dataset, _, Recorded = trl_api()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    args = trl.GRPOConfig(
        output_dir=str(tmp_path), loss_type=loss_type, beta=beta, per_device_train_batch_size=8, num_generations=4,
        gradient_accumulation_steps=2, num_iterations=2, max_completion_length=8, max_steps=2, learning_rate=0.003,
        use_bias_correction_kl=False, seed=0, use_cpu=True, bf16=False, report_to=[], logging_steps=1, save_strategy="no", dataloader_num_workers=0)
    trainer = Recorded(model=model_dir, reward_funcs=parity_reward, args=args, processing_class=tokenizer,
                       train_dataset=Dataset.from_dict({"prompt": PROMPTS}), objective=objective)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    moved = any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    return trainer, moved


def test_grpo_loss_equals_trls_own_on_every_micro_batch(model_dir, tmp_path):
    trainer, moved = train(model_dir, tmp_path, "grpo", "grpo", beta=0.04)
    assert moved and trainer.state.global_step == 2 and len(trainer.records) == 4  # 2 steps x 2 micro-batches
    for record in trainer.records:
        assert abs(float(record["ours"]) - float(record["theirs"])) <= 1e-6
        for a, b in zip(record["ours_grad"], record["theirs_grad"]):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the second step reuses the rollout after an update: ratios differ from 1 and the losses are not zero
    assert "old_per_token_logps" in trainer.records[-1]["inputs"]
    assert any(abs(float(r["theirs"])) > 1e-3 for r in trainer.records)
    assert all(math.isfinite(row["loss"]) for row in trainer.state.log_history if "loss" in row)


def test_nft_trains_and_equals_the_objective_on_the_same_batch(model_dir, tmp_path):
    trainer, moved = train(model_dir, tmp_path, "nft", "dapo", beta=0.0)
    assert moved and trainer.state.global_step == 2 and len(trainer.records) == 4
    (batch,) = trainer.generations  # one rollout, used for two iterations
    rewards, groups, rate = batch["rewards"], batch["group_ids"], batch["correct_rate"]
    assert set(rewards.tolist()) <= {0.0, 1.0} and rewards.shape == (16,)
    for g in groups.unique():  # correct_rate is each group's whole rate, computed before TRL splits the batch
        members = groups == g
        assert torch.allclose(rate[members], rewards[members].mean().expand(int(members.sum())))
    for record in trainer.records:
        assert abs(float(record["ours"]) - float(record["theirs"])) <= 1e-6
    assert any(abs(float(r["ours"])) > 1e-4 for r in trainer.records[2:])
    assert all(g.abs().sum() > 0 for g in trainer.records[0]["ours_grad"] if g is not None)


def test_rft_trains_and_equals_the_objective_on_the_same_batch(model_dir, tmp_path):
    trainer, moved = train(model_dir, tmp_path, "rft", "dapo", beta=0.0)
    assert moved and trainer.state.global_step == 2 and len(trainer.records) == 4
    for record in trainer.records:
        assert abs(float(record["ours"]) - float(record["theirs"])) <= 1e-6
    assert all(g.abs().sum() > 0 for g in trainer.records[0]["ours_grad"] if g is not None)


@pytest.mark.parametrize("setting, match", [
    (dict(loss_type="cispo"), r"loss_type \(use one of \('grpo', 'bnpo', 'dr_grpo', 'dapo'\)\)"),
    (dict(beta=0.04), r"use_bias_correction_kl \(TRL's default True weights the KL by the importance ratio; with "
                      r"beta=0.04 set GRPOConfig\(use_bias_correction_kl=False\) for the plain k3 KL, or beta=0\)")])
def test_unsupported_settings_are_named(model_dir, tmp_path, setting, match):
    trl, Dataset, GRPOTrainer, _ = trl_api()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = trl.GRPOConfig(output_dir=str(tmp_path), **{"beta": 0.0, **setting}, per_device_train_batch_size=4,
                          num_generations=4, max_completion_length=4, max_steps=1, use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match=match):
        GRPOTrainer(model=model_dir, reward_funcs=parity_reward, args=args, processing_class=tokenizer,
                    train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
