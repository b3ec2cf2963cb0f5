"""Rollout corrections and mismatch metrics against references written from their formulas (plain Python floats,
token by token), and the correction's place in the step: masked tokens leave the loss and every normaliser."""
import math
import random

import pytest
import torch

from twofold.engine.run.config import correction_mode, load_config
from twofold.engine.rollout.correction import DEFAULT_BOUNDS, correction_weights, log_ratios, mismatch_metrics
from twofold.engine.train.packing import Sequence
from twofold.engine.train.trainer import CORRECTION, batch_totals, drop_corrected
from twofold.engine.train.packing import collate


def _ratios(seed=0, n_seqs=12, scale=0.6):
    rng = random.Random(seed)
    trainer, behavior = [], []
    for _ in range(n_seqs):
        length = rng.randint(1, 9)
        b = [-rng.uniform(0.05, 4.0) for _ in range(length)]
        trainer.append([x + rng.gauss(0.0, scale) for x in b])
        behavior.append(b)
    return trainer, behavior


def _reference(mode, trainer, behavior, low, high):
    """c_t per sequence, from the definitions in RolloutConfig.correction."""
    out = []
    for t, b in zip(trainer, behavior):
        r = [x - y for x, y in zip(t, b)]
        if mode == "token_tis":
            out.append([min(math.exp(x), high) for x in r])
        elif mode == "icepop":
            out.append([1.0 if low <= math.exp(x) <= high else 0.0 for x in r])
        elif mode == "seq_mask":
            out.append([1.0 if low <= math.exp(sum(r)) <= high else 0.0] * len(r))
        elif mode == "geo_mask":
            out.append([1.0 if low <= math.exp(sum(r) / len(r)) <= high else 0.0] * len(r))
    return out


@pytest.mark.parametrize("mode", ["token_tis", "seq_mask", "geo_mask", "icepop"])
@pytest.mark.parametrize("bounds", ["default", (0.7, 1.4)])
def test_every_correction_matches_its_formula(mode, bounds):
    trainer, behavior = _ratios(seed=len(mode), scale=0.3 if (mode, bounds) == ("geo_mask", "default") else 0.9)
    low, high = DEFAULT_BOUNDS[mode] if bounds == "default" else bounds
    c_low, c_high = (0.0, 0.0) if bounds == "default" else bounds
    got = correction_weights(mode, log_ratios(trainer, behavior), c_low, c_high)
    want = _reference(mode, trainer, behavior, low, high)
    for g, w in zip(got, want):
        assert g.tolist() == pytest.approx(w, rel=1e-12)
    flat = [x for w in want for x in w]
    if mode != "token_tis":  # the inputs exercise both sides of every mask
        assert 0 < sum(flat) < len(flat)
    else:
        assert any(x == high for x in flat) and any(x < 1 for x in flat)


def test_mismatch_metrics_match_their_formulas():
    trainer, behavior = _ratios(seed=3)
    sampled = [[float(i % 3 != 0) for i in range(len(t))] for t in trainer]
    sampled[0] = [1.0] * len(trainer[0])
    ratios = log_ratios(trainer, behavior, sampled)
    weights = correction_weights("icepop", ratios)
    got = mismatch_metrics(ratios, weights)
    r = [[x - y for x, y, s in zip(t, b, m) if s] for t, b, m in zip(trainer, behavior, sampled)]
    tokens = [x for seq in r for x in seq]
    seq = sorted(abs(sum(s)) for s in r)
    position = 0.99 * (len(seq) - 1)  # linear interpolation between order statistics (torch.quantile's default)
    lo = int(position)
    p99 = seq[lo] + (seq[min(lo + 1, len(seq) - 1)] - seq[lo]) * (position - lo)
    masked = sum(not (0.5 <= math.exp(x) <= 5.0) for x in tokens) / len(tokens)
    assert got["mismatch/k3_kl"] == pytest.approx(sum(math.exp(x) - x - 1 for x in tokens) / len(tokens), rel=1e-12)
    assert got["mismatch/max_abs_logp_diff"] == pytest.approx(max(abs(x) for x in tokens), rel=1e-12)
    assert got["mismatch/seq_log_ratio_p99"] == pytest.approx(p99, rel=1e-12)
    assert got["mismatch/masked_frac"] == pytest.approx(masked, rel=1e-12) and 0 < masked < 1
    assert mismatch_metrics(log_ratios(behavior, behavior))["mismatch/k3_kl"] == 0.0


def test_masked_tokens_leave_the_loss_and_every_normaliser():
    seqs = [Sequence(list(range(1, 8)), 3, row_id=0, fields={"rewards": 1.0},
                     token_fields={CORRECTION: [1.0, 0.0, 2.0, 0.0]}),
            Sequence(list(range(1, 6)), 2, row_id=1, fields={"rewards": 0.0},
                     token_fields={CORRECTION: [0.0, 0.0, 0.0]}),
            Sequence(list(range(1, 5)), 2, row_id=2, fields={"rewards": 0.0},
                     token_fields={CORRECTION: [0.5, 1.0]})]
    totals = batch_totals(seqs)
    assert totals["num_tokens"] == 4 and totals["num_seqs"] == 2
    assert totals["num_pos_tokens"] == 2 and totals["num_neg_tokens"] == 2
    mb = drop_corrected(collate(seqs, [0, 1, 2]))
    assert int(mb.loss_mask.sum()) == 4
    assert torch.equal(mb.token_fields[CORRECTION][mb.loss_mask], torch.tensor([1.0, 2.0, 0.5, 1.0]))


def test_bad_correction_bounds_are_named(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    base = ["model.preset=tiny-qwen2", f"data.path={data}", "train.mode=online", "objective.name=grpo"]
    with pytest.raises(ValueError, match="rollout.correction_c_low must be < the upper bound 1.2 of seq_mask"):
        load_config(None, base + ["rollout.correction=seq_mask", "rollout.correction_c_low=2",
                                  "rollout.correction_c_high=1.2"])
    with pytest.raises(ValueError, match="rollout.correction must be one of"):
        load_config(None, base + ["rollout.correction=tis"])
    assert correction_mode(load_config(None, base + ["model.dtype=float32", "sampler.dtype=float32"])) == "none"
    assert correction_mode(load_config(None, base + ["model.dtype=float32"])) == "token_tis"  # bf16 sampler
    with pytest.raises(ValueError, match="sampler.canary_warn"):
        load_config(None, base + ["sampler.canary_warn=2", "sampler.canary_stop=1"])
