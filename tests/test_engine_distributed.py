"""End to end on CPU with real FSDP2 (gloo) and real DCP: world size 1 == 2, resume == uninterrupted (also from
2 ranks into 1), atomic checkpoints, keep-last-K, an HF export that transformers loads, and preference pairs (REDI)
on two ranks."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import twofold.engine.train.checkpoint
from twofold.engine.train.checkpoint import complete_checkpoints
from twofold.engine.run.config import load_config
from twofold.engine.run.train import resume_path, run
from twofold.engine.run.tracking import read_metrics

from tests.forked_ranks import run_ranks

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "configs" / "data" / "tiny_arith.jsonl"
BASE = ["model.preset=tiny-qwen2", "model.dtype=float32", f"data.path={DATA}", "data.batch_size=8",
        "data.max_tokens_per_microbatch=64", "optim.lr=3e-3", "optim.warmup_steps=2", "optim.schedule=cosine",
        "train.steps=6", "checkpoint.every=3", "checkpoint.keep_last=2", "checkpoint.export_dtype=float32",
        "log.progress_bar=false", "log.plot=false"]


def _config(run_dir, *extra):
    return load_config(None, BASE + [f"run_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def straight(tmp_path_factory, one_thread):
    run_dir = tmp_path_factory.mktemp("straight")
    return run_dir, run(_config(run_dir))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two_ranks")
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2", "-m",
           "twofold.engine.run.train", "--config", str(REPO / "configs" / "tiny_sft.yaml"), *BASE, f"run_dir={run_dir}",
           "data.max_tokens_per_microbatch=40"]  # a smaller budget too: more micro-batches per rank
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir


def _weights(run_dir):
    return load_file(Path(run_dir) / "hf" / "model.safetensors")


def _assert_same_weights(a, b, **tol):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], msg=name, **tol)


def test_two_ranks_give_the_same_loss_curve_as_one_process(straight, two_ranks):
    run_dir, history = straight
    other = read_metrics(two_ranks / "metrics.jsonl")
    assert [r["step"] for r in other] == [1, 2, 3, 4, 5, 6]
    for mine, theirs in zip(history, other):
        assert theirs["microbatches"] >= 2  # per rank
        assert theirs["loss"] == pytest.approx(mine["loss"], rel=1e-5)
        assert theirs["grad_norm"] == pytest.approx(mine["grad_norm"], rel=1e-4)  # normalised over ranks, not averaged
    _assert_same_weights(run_dir, two_ranks, atol=2e-5, rtol=1e-4)


def test_stop_and_resume_matches_the_uninterrupted_run_exactly(straight, tmp_path, one_thread):
    run_dir, history = straight
    first = run(_config(tmp_path, "train.stop_after_steps=3"))
    assert [m["step"] for m in first] == [1, 2, 3] and not (tmp_path / "hf").exists()
    second = run(_config(tmp_path))  # a new invocation: resume=auto picks step_00000003
    assert [m["step"] for m in second] == [4, 5, 6]
    assert second[-1]["loss"] == history[-1]["loss"]
    _assert_same_weights(run_dir, tmp_path, atol=0, rtol=0)


def test_checkpoint_from_two_ranks_resumes_in_one_process(straight, two_ranks, tmp_path, one_thread):
    run_dir, history = straight
    target = tmp_path / "checkpoints" / "step_00000003"
    shutil.copytree(two_ranks / "checkpoints" / "step_00000003", target)
    resumed = run(_config(tmp_path))
    assert [m["step"] for m in resumed] == [4, 5, 6]
    assert resumed[-1]["loss"] == pytest.approx(history[-1]["loss"], rel=1e-5)
    _assert_same_weights(run_dir, tmp_path, atol=2e-5, rtol=1e-4)


def test_keep_last_prunes_old_checkpoints(straight):
    run_dir, _ = straight
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step_00000003", "step_00000006"]
    assert (run_dir / "config.yaml").is_file()


def test_crash_mid_save_leaves_the_previous_checkpoint_as_the_newest(tmp_path, monkeypatch, one_thread):
    run(_config(tmp_path, "train.stop_after_steps=3"))
    real_save = twofold.engine.train.checkpoint.dcp.save

    def dies_after_writing(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # shards are on disk, the rename never happens
        raise KeyboardInterrupt("simulated kill during save")

    monkeypatch.setattr(twofold.engine.train.checkpoint.dcp, "save", dies_after_writing)
    with pytest.raises(KeyboardInterrupt):
        run(_config(tmp_path, "train.stop_after_steps=1"))
    assert (tmp_path / "checkpoints" / ".tmp-step_00000004").is_dir()
    assert resume_path(_config(tmp_path)).name == "step_00000003"
    monkeypatch.setattr(twofold.engine.train.checkpoint.dcp, "save", real_save)
    resumed = run(_config(tmp_path))
    assert [m["step"] for m in resumed] == [4, 5, 6]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_export_loads_in_transformers_and_matches_the_trained_weights(straight):
    run_dir, _ = straight
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "hf")
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    ids = tokenizer("Q: 2+16=? A: ", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    weights = _weights(run_dir)
    torch.testing.assert_close(model.model.embed_tokens.weight, weights["model.embed_tokens.weight"])


def _redi_on_rank(rank: int, run_dir: str, pairs: str) -> None:
    run(_config(run_dir, "objective.name=redi", f"data.path={pairs}", "train.steps=1", "optim.warmup_steps=0"))


def test_two_ranks_train_redi_on_preference_pairs(tmp_path):
    """An offline pair objective end to end on two ranks (both sides of a pair pack into one micro-batch, so onto
    one rank), forked from this process; the CLI under torchrun is the two-rank SFT run above."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q: {a}+0=? A: ", "chosen": str(a), "rejected": str(a + 1)}) + "\n"
                             for a in range(10)))
    run_ranks(_redi_on_rank, str(tmp_path / "run"), str(pairs))
    (step,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert step["skipped"] == 0 and step["grad_norm"] > 0
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()  # exported from the two ranks' shards
