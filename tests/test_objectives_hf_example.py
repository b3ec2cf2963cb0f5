"""The README's HF Trainer example runs: NFT and REDI plugged into `Trainer.compute_loss` on a tiny Qwen2."""
import importlib.util
import math
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer_nft_redi.py"


def _example():
    spec = importlib.util.spec_from_file_location("hf_trainer_nft_redi", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_trainer_example_trains_nft_from_zero_loss_and_reduces_redi_loss():
    losses = _example().main(steps=3)
    assert len(losses["nft"]) == 3 and len(losses["redi"]) == 3
    assert all(math.isfinite(x) for x in losses["nft"] + losses["redi"])
    assert abs(losses["nft"][0]) < 1e-4  # first step: policy == rollout policy, NFT loss is 0 (invariant 11)
    assert losses["redi"][-1] < losses["redi"][0]


def test_hf_nft_compute_loss_has_a_gradient_at_ratio_one():
    example = _example()
    model = example.tiny_model()
    batch = example.stack(example.rollout_rows(model)[:4])
    loss, metrics = example.NFTTrainer.compute_loss(None, model, batch, return_outputs=True)
    loss.backward()
    grad = model.lm_head.weight.grad
    assert abs(float(loss.detach())) < 1e-5 and metrics["tokens"] == 4 * 8
    assert grad is not None and grad.abs().sum() > 0 and bool(torch.isfinite(grad).all())
