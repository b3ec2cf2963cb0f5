"""Packing: the planner's invariants, the packed layout, and packed == unpacked log-probs and gradients."""
import random

import pytest
import torch

from transformers import AutoModelForCausalLM

from twofold.engine.train.model import PACKED_SDPA, PolicyModel, resolve_attn_implementation
from twofold.engine.train.packing import (IGNORE_INDEX, KeptSets, PackedLayout, Sequence, collate, drop_sequences,
                                           plan_microbatches)
from twofold.engine.train.tiny import preset_config


def _random_sequences(n, seed=0, max_len=40):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(3, max_len)
        prompt = rng.randint(1, length - 1)
        out.append(Sequence([rng.randint(4, 100) for _ in range(length)], prompt, row_id=i,
                            fields={"rewards": float(i % 2)}))
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_plan_gives_every_rank_the_same_microbatch_count_and_uses_each_sequence_once(world_size):
    rng = random.Random(world_size)
    lengths = [rng.randint(1, 100) for _ in range(57)]
    plan = plan_microbatches(lengths, budget=128, world_size=world_size)
    assert len({len(rank) for rank in plan}) == 1
    placed = sorted(i for rank in plan for micro in rank for i in micro)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in micro) <= 128 for rank in plan for micro in rank)


def test_plan_is_no_worse_than_first_fit_decreasing_rounded_to_the_world_size():
    rng = random.Random(1)
    lengths = [rng.randint(1, 100) for _ in range(200)]
    total = sum(lengths)
    plan = plan_microbatches(lengths, budget=256, world_size=4)
    n_bins = sum(len(r) for r in plan)
    assert n_bins <= 4 * -(-int(1.1 * total / 256 + 1) // 4)  # within ~10% of the volume bound
    rank_tokens = [sum(lengths[i] for m in r for i in m) for r in plan]
    assert max(rank_tokens) - min(rank_tokens) <= max(lengths)


def test_plan_rejects_a_sequence_longer_than_the_budget():
    with pytest.raises(ValueError, match=r"sequence\(s\) \[1\] have packed length 300"):
        plan_microbatches([10, 300], budget=256, world_size=1)


def test_rank_without_enough_sequences_gets_a_placeholder_microbatch_without_loss_tokens():
    seqs = _random_sequences(1)
    plan = plan_microbatches([s.packed_len for s in seqs], budget=64, world_size=2)
    assert [len(r) for r in plan] == [1, 1]
    empty = collate(seqs, plan[1][0])
    assert empty.num_tokens == 1 and not empty.loss_mask.any()


def test_collate_restarts_positions_and_scores_only_response_tokens():
    a = Sequence([5, 6, 7, 8, 9], prompt_len=2, token_fields={"old_logp": [-1.0, -2.0, -3.0]})
    b = Sequence([10, 11, 12], prompt_len=1, token_fields={"old_logp": [-4.0, -5.0]})
    mb = collate([a, b], [0, 1])
    assert mb.input_ids.tolist() == [5, 6, 7, 8, 10, 11]  # last token of each sequence predicts nothing
    assert mb.position_ids.tolist() == [0, 1, 2, 3, 0, 1]
    assert mb.targets.tolist() == [IGNORE_INDEX, 7, 8, 9, 11, 12]
    assert mb.seq_index.tolist() == [0, 0, 0, 0, 1, 1]
    assert mb.token_fields["old_logp"].tolist() == [0.0, -1.0, -2.0, -3.0, -4.0, -5.0]


def test_collate_lays_kept_sets_beside_the_targets_they_were_sampled_for():
    a = Sequence([5, 6, 7, 8, 9], prompt_len=2, kept=KeptSets.from_rows([torch.tensor([7, 3]), torch.tensor([8]),
                                                                         torch.tensor([1, 9, 4])]))
    b = Sequence([10, 11, 12], prompt_len=1, kept=KeptSets.from_rows([torch.tensor([11]), torch.tensor([2, 12])]))
    mb = collate([a, b], [0, 1])
    assert mb.kept.tolist() == [[-1, -1, -1], [7, 3, -1], [8, -1, -1], [1, 9, 4], [11, -1, -1], [2, 12, -1]]
    ok = mb.targets != IGNORE_INDEX
    assert (mb.kept[ok] == mb.targets[ok, None]).any(1).all()
    second = drop_sequences(mb, torch.tensor([False, True]))  # a correction drops a whole sequence
    assert second.kept.tolist() == [[11, -1, -1], [2, 12, -1]] and second.targets.tolist() == [11, 12]
    with pytest.raises(ValueError, match="row 'plain' has no kept sets"):
        collate([a, Sequence([1, 2, 3], prompt_len=1, row_id="plain")], [0, 1])


def _policy(preset, attn=PACKED_SDPA):
    torch.manual_seed(0)
    return PolicyModel(AutoModelForCausalLM.from_config(preset_config(preset), attn_implementation=attn,
                                                        dtype=torch.float32))


def test_packed_layout_pads_each_sequence_into_buckets_of_similar_length_and_unpads_exactly():
    lengths = [5, 1, 17, 9, 3, 16, 2, 8]
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    starts = [sum(lengths[:s]) for s in range(len(lengths))]
    layout = PackedLayout.from_position_ids(position_ids)
    x = torch.arange(position_ids.numel(), dtype=torch.float32)[:, None].expand(-1, 3)  # value = packed index
    parts = layout.pad(x)
    seen = []
    for part, (rows, length) in zip(parts, layout.shapes):
        assert part.shape == (rows, length, 3)
        for row in part[:, :, 0].long().tolist():
            s = starts.index(row[0])
            n = lengths[s]
            assert 2 * n > length  # padding at most doubles a sequence
            assert row == list(range(row[0], row[0] + n)) + [row[0] + n - 1] * (length - n)  # pads repeat its last
            seen.append(s)
    assert sorted(seen) == list(range(len(lengths)))
    torch.testing.assert_close(layout.unpad(parts), x, rtol=0, atol=0)


def test_sdpa_resolves_to_per_sequence_attention_except_with_sliding_windows():
    cpu = torch.device("cpu")
    assert resolve_attn_implementation("auto", cpu, preset_config("tiny-qwen2")) == PACKED_SDPA
    assert resolve_attn_implementation("sdpa", cpu, preset_config("tiny-llama")) == PACKED_SDPA
    sliding = preset_config("tiny-qwen2")
    sliding.layer_types = ["sliding_attention", "full_attention"]
    assert resolve_attn_implementation("sdpa", cpu, sliding) == "sdpa"
    assert resolve_attn_implementation("eager", cpu, preset_config("tiny-qwen2")) == "eager"


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-llama"])
def test_per_sequence_attention_equals_sdpa_with_the_block_diagonal_mask(preset):
    """The same packed row (ragged lengths: several buckets) through transformers' sdpa, whose mask keeps attention
    inside each sequence, and through the per-sequence path: same log-probs and gradients."""
    seqs = _random_sequences(12, seed=7, max_len=60)
    packed = collate(seqs, list(range(len(seqs))))
    results = []
    for attn in ("sdpa", PACKED_SDPA):
        policy = _policy(preset, attn)
        logp = policy(packed.input_ids, packed.position_ids, packed.targets)
        (logp * torch.linspace(0.5, 1.5, logp.numel())).sum().backward()
        results.append((logp.detach(), {n: p.grad for n, p in policy.named_parameters()}))
    (masked, masked_grads), (per_seq, per_seq_grads) = results
    torch.testing.assert_close(per_seq, masked, atol=1e-5, rtol=1e-5)
    for name, grad in masked_grads.items():
        torch.testing.assert_close(per_seq_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_per_sequence_attention_falls_back_to_sdpa_with_a_padding_mask_or_a_cache():
    masked, per_seq = _policy("tiny-qwen2", "sdpa").causal_lm, _policy("tiny-qwen2").causal_lm
    ids = torch.randint(4, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(per_seq(ids, attention_mask=mask).logits, masked(ids, attention_mask=mask).logits)
        greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert per_seq.generate(ids, attention_mask=mask, **greedy).tolist() == \
            masked.generate(ids, attention_mask=mask, **greedy).tolist()


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-llama"])
def test_packed_logprobs_and_gradients_equal_unpacked(preset):
    policy = _policy(preset)  # the per-sequence sdpa path the engine runs on CPU
    seqs = _random_sequences(5, seed=3)
    packed = collate(seqs, list(range(len(seqs))))
    logp = policy(packed.input_ids, packed.position_ids, packed.targets)
    (logp * torch.linspace(0.5, 1.5, logp.numel())).sum().backward()
    grads_packed = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    pieces = []
    offset = 0
    for i in range(len(seqs)):
        one = collate(seqs, [i])
        lp = policy(one.input_ids, one.position_ids, one.targets)
        weights = torch.linspace(0.5, 1.5, logp.numel())[offset:offset + one.num_tokens]
        (lp * weights).sum().backward()
        pieces.append(lp.detach())
        offset += one.num_tokens
    torch.testing.assert_close(logp.detach(), torch.cat(pieces), atol=1e-5, rtol=1e-5)
    for name, param in policy.named_parameters():
        torch.testing.assert_close(grads_packed[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_attention_does_not_see_the_previous_sequence():
    policy = _policy("tiny-qwen2")
    a = Sequence([7] * 6, 1)
    b1, b2 = Sequence([20, 21, 22, 23], 1), Sequence([30, 31, 32, 33], 1)
    with torch.no_grad():
        first = policy(*_tensors(collate([b1, a], [0, 1])))
        second = policy(*_tensors(collate([b2, a], [0, 1])))
    n = b1.packed_len
    torch.testing.assert_close(first[n:], second[n:], atol=1e-6, rtol=0)  # `a` is unaffected by what precedes it


def _tensors(mb):
    return mb.input_ids, mb.position_ids, mb.targets


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_logprobs_equal_unpacked_on_gpu_with_the_resolved_attention():
    device = torch.device("cuda")
    attn = resolve_attn_implementation("auto", device)  # flash_attention_2 (varlen) when flash-attn is installed
    config = preset_config("tiny-llama")
    config.head_dim = 64  # flash-attn kernels want head_dim >= 32
    config.num_attention_heads, config.num_key_value_heads, config.hidden_size = 2, 1, 128
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.bfloat16).to(device)
    policy = PolicyModel(model)
    seqs = _random_sequences(6, seed=5)
    with torch.no_grad():
        packed = collate(seqs, list(range(len(seqs)))).to(device)
        logp = policy(packed.input_ids, packed.position_ids, packed.targets)
        single = [policy(*_tensors(collate(seqs, [i]).to(device))) for i in range(len(seqs))]
    torch.testing.assert_close(logp, torch.cat(single), atol=2e-2, rtol=2e-2)
