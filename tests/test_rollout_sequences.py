"""Rollout groups -> training sequences: rollout.mask_truncated and JEPO's format reward (no model, no sampler)."""
import pytest
import torch

from twofold.engine.run.schema import RolloutConfig
from twofold.engine.train.packing import KeptSets
from twofold.engine.rollout.build import Group, build_sequences, replays_kept
from twofold.engine.rollout.sampler import Sample
from twofold.engine.data.tasks import Problem
from twofold.engine.train.tiny import build_char_tokenizer
from twofold.engine.train.trainer import batch_totals
from twofold.objectives import names


def _groups(tokenizer):
    """Two prompts x 4 samples; sample 0 of each group is truncated (finish_reason length) and wrong."""
    out = []
    for q in range(2):
        prompt = tuple(tokenizer(f"{q}+1=", add_special_tokens=False).input_ids)
        samples, correct = [], []
        for j in range(4):
            text = "x" * 9 if j == 0 else f"\\boxed{{{q + 1 if j % 2 else 7}}}"
            ids = tokenizer(text, add_special_tokens=False).input_ids
            samples.append(Sample(q, ids, text, "length" if j == 0 else "stop"))
            correct.append(float(j % 2 == 1))
        out.append(Group(Problem(q, prompt, str(q + 1)), samples, correct))
    return out


@pytest.mark.parametrize("objective", names("online"))
def test_mask_truncated_drops_truncated_samples_after_the_group_statistics(objective):
    tokenizer = build_char_tokenizer()
    groups = _groups(tokenizer)
    full = build_sequences(objective, groups, RolloutConfig(), tokenizer)
    masked = build_sequences(objective, groups, RolloutConfig(mask_truncated=True), tokenizer)
    assert all(not s.row_id.endswith("/0") for s in masked)  # sample 0 is the truncated one
    kept = {s.row_id: s for s in full if not s.row_id.endswith("/0")}
    if objective == "oreal":  # the pair is chosen among the untruncated samples
        assert [s.row_id for s in full] == ["0/1", "0/0", "1/1", "1/0"]
        assert [s.row_id for s in masked] == ["0/1", "0/2", "1/1", "1/2"]
        assert [s.fields["advantages"] for s in masked] == [s.fields["advantages"] for s in full]  # RLOO of all 4
        return
    assert [s.row_id for s in masked] == list(kept)
    if objective != "jepo":  # advantages / r_hat come from every sample of the group, truncated ones included
        for s in masked:
            assert s.fields == kept[s.row_id].fields
    totals = batch_totals(masked)
    assert totals["num_seqs"] == 6 and totals["num_tokens"] == sum(s.response_len for s in kept.values())


def test_jepo_format_reward_is_minus_the_penalty_for_a_sample_without_a_boxed_answer():
    tokenizer = build_char_tokenizer()
    seqs = build_sequences("jepo", _groups(tokenizer), RolloutConfig(format_penalty=10.0), tokenizer)
    rewards = {s.row_id: s.fields["format_rewards"] for s in seqs}
    assert rewards["0/0"] == -10.0 and rewards["1/0"] == -10.0
    assert all(v == 0.0 for k, v in rewards.items() if not k.endswith("/0"))
    assert all(s.fields["valid"] == float(not s.row_id.endswith("/0")) for s in seqs)


@pytest.mark.parametrize("objective", ["grpo", "nft", "oreal", "jepo"])
def test_kept_sets_ride_on_the_sequences_and_jepo_refuses_them(objective):
    tokenizer = build_char_tokenizer()
    groups = _groups(tokenizer)
    for g in groups:
        for s in g.samples:
            s.kept = KeptSets.from_rows([torch.tensor([t, 0]) for t in s.token_ids])
    if objective == "jepo":
        with pytest.raises(ValueError, match="appends were never sampled"):
            build_sequences(objective, groups, RolloutConfig(top_p=0.9), tokenizer)
        return
    for seq in build_sequences(objective, groups, RolloutConfig(top_p=0.9), tokenizer):
        sample = groups[seq.fields["group_ids"]].samples[int(seq.row_id.split("/")[1])]
        assert seq.kept is sample.kept and len(seq.kept) == seq.response_len


def test_replay_kept_set_false_turns_replay_off_whatever_the_sampling():
    """rollout.replay_kept_set=false: top-k / top-p still sample, but no kept sets are recorded or replayed."""
    assert replays_kept(RolloutConfig(top_p=0.9)) and replays_kept(RolloutConfig(top_k=5))
    assert not replays_kept(RolloutConfig())
    for cfg in (RolloutConfig(top_p=0.9, replay_kept_set=False), RolloutConfig(top_k=5, replay_kept_set=False)):
        assert not replays_kept(cfg)
