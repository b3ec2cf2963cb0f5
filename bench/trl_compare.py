"""twofold's online GRPO against TRL's `GRPOTrainer` on the CPU demo task, each run in its own process.

    python -m bench.trl_compare                       # 3 interleaved pairs of 30 steps (twofold, TRL, twofold, ...)
    python -m bench.trl_compare --quick               # 1 pair of 5 steps, SFT start of 100 steps: a smoke run
    python -m bench.trl_compare --pairs 2 --steps 20 --sft runs/demo/sft/hf --out bench/results/trl.json

**The task**, as the CPU demo (`python -m twofold.engine.run.demo`, README): two-digit + one-digit addition answered in
`\\boxed{}`, data generated in-process (`engine.tasks.write_addition_data`, the demo's sizes and seed). **The
start**: one SFT checkpoint shared by every run, trained with `configs/demo_sft.yaml` (`--sft-steps`, default the
demo's 1200; the tiny-qwen2-vllm preset, character tokenizer, nothing downloaded), or `--sft DIR`. **Each run**:
16 prompts x 8 samples per step, at most 12 new tokens, temperature 1, top-p 1, GRPO (PPO clip eps 0.2, k3 KL
with beta 0.04 to the frozen initial policy, group-std advantages, per-sequence token mean then the mean over
sequences), one optimizer step per rollout, AdamW lr 1e-3 constant (betas 0.9/0.95, eps 1e-8, no weight decay),
gradient norm clipped at 1.0, fp32, no activation checkpointing, reward = twofold's verifier (0/1, sympy, two
worker processes, 5 s timeout; `configs/demo_nft.yaml`'s `verifier` section), one torch thread.

- twofold: `configs/demo_nft.yaml` with `objective.name=grpo objective.kwargs={beta: 0.04}` and
  `rollout.dynamic_sampling=false` (every group trains, as in TRL), no evaluation, no export: the in-process vLLM
  sampler, weight sync after every step, the weight-sync canary after every sync (its default, kept: it is part
  of twofold's step), packed sequences, the fused GRPO head.
- TRL 1.16: `GRPOConfig(num_generations=8, per_device_train_batch_size=128, gradient_accumulation_steps=1,
  steps_per_generation=1, num_iterations=1, max_completion_length=12, loss_type="grpo", scale_rewards="group",
  beta=0.04, epsilon=0.2, use_bias_correction_kl=False, learning_rate=1e-3, lr_scheduler_type="constant",
  adam_beta2=0.95, max_grad_norm=1.0, gradient_checkpointing=False, bf16=False, use_cpu=True)`, generation
  by transformers' `generate` (no vLLM: TRL's vLLM paths need a server or colocated GPU engine), the reward a
  function calling the same `VerifierPool` (built from the same config section).

**Differences that remain**: TRL pads each micro-batch to its longest sequence (twofold packs them into one row
and attends per sequence); TRL's advantages divide by (std + 1e-4), twofold's by its group std with its own
epsilon; TRL samples prompts with its `RepeatSampler` (shuffled, seed 0) and twofold with its `BatchStream`
(shuffled, seed 0), so the prompts of a step differ; the generators differ (vLLM vs `generate`: other random
streams, the same distribution); twofold syncs weights into its sampler and runs the canary each step, TRL's
generator is the policy itself; TRL's reference is a second transformers model (fp32), twofold's a frozen FSDP2
copy in the compute dtype (fp32 here). Both stop a sample at EOS or at 12 tokens. This venv holds vLLM (for
twofold) and TRL imports it at start when it is installed, without using it on this path; TRL is measured as a
CPU install without vLLM would run it (`is_vllm_available` answers False in its process), and
`--trl-imports-vllm` measures it as this venv runs it.

**Measured per run** (fresh process, `OMP_NUM_THREADS=1`): start-up = wall time from the parent's launch of the
process to the first training step beginning (interpreter, imports, engine and model builds, the first weight
sync); per step (median over the run's steps): the whole step, its generation (twofold `time/generate_s`;
TRL the time in `GRPOTrainer._generate`) and its train phase (the forward, backward and optimizer step over the
rollout: twofold `time/train_s`; TRL the step less `_generate_and_score_completions`, which holds generation,
rewards, advantages and the reference log-probs); peak RSS of the trainer process (`ru_maxrss`; vLLM runs in that
process, the verifier workers are separate processes in both); the mean rollout reward (a check that both runs
learn alike, not a speed number). The table gives each metric as median [min-max] over the pairs, and the ratio
twofold / TRL taken pair by pair (the two runs of a pair ran back to back), against the targets of the issue.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import LoadWatch, Spread, device_name, ratio

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SIDES = ("twofold", "trl")
PROMPTS_PER_STEP, SAMPLES, NEW_TOKENS, BETA, LR = 16, 8, 12, 0.04, 1e-3
# (key, label, target ratio twofold / TRL from the issue, or None)
METRICS = (("step_s", "whole step, s", 0.5), ("generate_s", "generation per step, s", None),
           ("train_s", "train phase per step, s", 0.8), ("peak_rss_mib", "peak RSS, MiB", 1.0),
           ("startup_s", "start-up to the first step, s", 1.5), ("reward_mean", "mean rollout reward", None))


def log(message: str) -> None:
    print(f"[trl_compare] {message}", file=sys.stderr, flush=True)


# ---- the parent: data, the SFT start, interleaved runs, the table ------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.trl_compare", description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3, help="interleaved (twofold, TRL) pairs of runs")
    p.add_argument("--steps", type=int, default=30, help="training steps per run")
    p.add_argument("--sft-steps", type=int, default=1200, help="SFT steps of the shared start (the demo's 1200)")
    p.add_argument("--sft", help="an existing HF checkpoint to start from instead (e.g. runs/demo/sft/hf)")
    p.add_argument("--work", default="runs/trl_compare", help="data, SFT start and run directories")
    p.add_argument("--quick", action="store_true", help="1 pair x 5 steps from a 100-step SFT start")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--trl-imports-vllm", action="store_true",
                   help="let TRL see the installed vLLM (it then imports it at start, unused: slower, more memory)")
    # internal: one run in this process
    p.add_argument("--_child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--_launched", type=float, help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    p.add_argument("--_run-dir", dest="_run_dir", help=argparse.SUPPRESS)
    p.add_argument("--_prompts", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.steps, args.sft_steps = 1, 5, 100
    if args.pairs < 1 or args.steps < 2:
        p.error(f"--pairs must be >= 1 and --steps >= 2, got {args.pairs} and {args.steps}")
    return args


def child_env() -> dict[str, str]:
    # one thread per run (the tiny model's GEMMs, and vLLM's CPU threads spin when oversubscribed); no GPU:
    # the kernels' Triton path is interpreted, as in the demo
    return {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}


def prepare_start(args) -> tuple[Path, Path]:
    """The demo's data files and the shared SFT checkpoint (trained once per --sft-steps, reused afterwards)."""
    from twofold.engine.data.tasks import write_addition_data

    work = Path(args.work)
    data = write_addition_data(work / "data", sft_rows=20_000, rl_prompts=5_000, eval_prompts=200, forget_carry=0.6)
    if args.sft:
        return Path(args.sft), data["prompts"]
    run_dir = work / f"sft-{args.sft_steps}"
    if not (run_dir / "complete.json").is_file():
        log(f"SFT start: {args.sft_steps} steps of configs/demo_sft.yaml into {run_dir}")
        cmd = [sys.executable, "-m", "twofold.engine.run.train", "--config", str(CONFIGS / "demo_sft.yaml"),
               f"run_dir={run_dir}", f"data.path={data['sft']}", f"train.steps={args.sft_steps}",
               "run_dir_policy=overwrite", "checkpoint.resume=never", "log.progress_bar=false", "log.plot=false"]
        done = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"SFT start failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return run_dir / "hf", data["prompts"]


def run_child(side: str, pair: int, args, sft: Path, prompts: Path) -> dict:
    run_dir = Path(args.work) / "runs" / f"{side}-{pair}"
    run_dir.mkdir(parents=True, exist_ok=True)
    result = run_dir / "result.json"
    result.unlink(missing_ok=True)
    load_before = os.getloadavg()[0]
    launched = time.time()
    cmd = [sys.executable, "-m", "bench.trl_compare", "--_child", side, "--_launched", repr(launched),
           "--_result", str(result), "--_run-dir", str(run_dir), "--_prompts", str(prompts), "--sft", str(sft),
           "--steps", str(args.steps), *(["--trl-imports-vllm"] if args.trl_imports_vllm else [])]
    with open(run_dir / "output.log", "w") as out:
        done = subprocess.run(cmd, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not result.is_file():
        tail = (run_dir / "output.log").read_text()[-4000:]
        sys.exit(f"{side} run {pair} failed (exit {done.returncode}); {run_dir / 'output.log'} ends:\n{tail}")
    row = json.loads(result.read_text())
    return row | {"side": side, "pair": pair, "wall_s": time.time() - launched, "load_before": load_before}


def summarise(runs: list[dict]) -> dict:
    """Per metric: each side's median [min-max] over the pairs (a run's step metrics are its median over steps)
    and the ratio twofold / TRL pair by pair, with the issue's target where it has one."""
    by_side = {side: sorted((r for r in runs if r["side"] == side), key=lambda r: r["pair"]) for side in SIDES}
    if [r["pair"] for r in by_side["twofold"]] != [r["pair"] for r in by_side["trl"]] or not by_side["trl"]:
        raise ValueError("every pair needs one twofold and one TRL run")
    out = {}
    for key, label, target in METRICS:
        values = {side: Spread([run_value(r, key) for r in by_side[side]]) for side in SIDES}
        r = ratio(values["twofold"], values["trl"])
        out[key] = {"label": label, "twofold": values["twofold"].as_dict(), "trl": values["trl"].as_dict(),
                    "ratio": r.as_dict(), "ratios": r.samples, "target": target,
                    "holds": None if target is None else bool(r <= target),
                    "holds_every_pair": None if target is None else bool(r.high <= target)}
    return out


def run_value(run: dict, key: str) -> float:
    value = run[key]
    return statistics.median(value) if isinstance(value, list) else float(value)


def table_lines(summary: dict) -> list[str]:
    lines = ["| metric | twofold, median [min-max] | TRL, median [min-max] | twofold / TRL, per pair | target "
             "| holds |",
             "|---|---|---|---|---|---|"]
    for key, row in summary.items():
        spec = ".0f" if key == "peak_rss_mib" else ".3f" if key == "reward_mean" else ".2f"
        cells = [fmt(row[side], spec) for side in SIDES]
        target = "" if row["target"] is None else f"<= {row['target']:.1f}x"
        holds = "" if row["holds"] is None else ("yes" if row["holds_every_pair"] else
                                                   "median only" if row["holds"] else "no")
        lines.append(f"| {row['label']} | {cells[0]} | {cells[1]} | {fmt(row['ratio'], '.2f')}x | {target} | {holds} |")
    return lines


def startup_line(run: dict) -> str:
    """A twofold run's start-up phases (the engine's own `startup/*` metrics): seconds and the resident set after."""
    times = run["startup"]
    phases = [k.removeprefix("startup/").removesuffix("_s") for k in times
              if k.endswith("_s") and k != "startup/total_s"]
    parts = [f"{p} {times[f'startup/{p}_s']:.2f} s" + (f" -> {times[f'startup/{p}_rss_mib']:.0f} MiB"
                                                          if f"startup/{p}_rss_mib" in times else "") for p in phases]
    return f"twofold start-up, pair {run['pair'] + 1} (phase time -> resident set after it): " + ", ".join(parts)


def fmt(d: dict, spec: str) -> str:
    return f"{d['median']:{spec}} [{d['min']:{spec}}-{d['max']:{spec}}]"


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args._child:
        return child_main(args)
    load = LoadWatch(threads=1)
    start = time.time()
    sft, prompts = prepare_start(args)
    runs = []
    for pair in range(args.pairs):
        for side in SIDES:
            log(f"pair {pair + 1}/{args.pairs}: {side}, {args.steps} steps ({time.time() - start:.0f} s elapsed)")
            run = run_child(side, pair, args, sft, prompts)
            log(f"  {side}: start-up {run['startup_s']:.1f} s, step {statistics.median(run['step_s']):.2f} s, "
                f"peak RSS {run['peak_rss_mib']:.0f} MiB")
            runs.append(run)
    load.stop()
    summary = summarise(runs)
    lines = [f"twofold vs TRL GRPOTrainer, demo GRPO task: {args.pairs} interleaved pairs x {args.steps} steps, "
             f"{PROMPTS_PER_STEP} prompts x {SAMPLES} samples, {NEW_TOKENS} new tokens, beta {BETA}, lr {LR}, "
             f"one thread per run; start {sft}", f"machine: {device_name_cpu()}", *table_lines(summary),
             startup_line(next(r for r in runs if r["side"] == "twofold")), *load.lines()]
    print("\n".join(lines), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    results = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "sft": str(sft),
               "commit": commit.stdout.strip() or None,
               "machine": device_name_cpu(), "date": time.strftime("%Y-%m-%d"), "wall_s": time.time() - start,
               "load": load.as_dict(), "summary": summary, "runs": runs}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return results


def device_name_cpu() -> str:
    import torch
    return device_name(torch.device("cpu"))


# ---- a child: one run, its measurements to --_result --------------------------------------------------------------

def child_main(args) -> None:
    import torch
    torch.set_num_threads(1)
    row = run_twofold(args) if args._child == "twofold" else run_trl(args)
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    Path(args._result).write_text(json.dumps(row) + "\n")


def demo_config(args, side: str):
    from twofold.engine.run.config import load_config

    overrides = [f"run_dir={args._run_dir}/{side}", f"model.path={args.sft}", f"data.path={args._prompts}",
                 "eval.path=", f"train.steps={args.steps}", "objective.name=grpo",
                 f"objective.kwargs={{beta: {BETA}}}", f"optim.lr={LR}", "rollout.dynamic_sampling=false",
                 f"rollout.prompts_per_step={PROMPTS_PER_STEP}", f"rollout.samples_per_prompt={SAMPLES}",
                 f"rollout.max_new_tokens={NEW_TOKENS}", "checkpoint.export_hf=false", "checkpoint.resume=never",
                 "run_dir_policy=overwrite", "log.progress_bar=false", "log.plot=false"]
    return load_config(CONFIGS / "demo_nft.yaml", overrides)


def run_twofold(args) -> dict:
    from twofold.engine.run.online import process_age_s
    from twofold.engine.run.train import run

    born = time.time() - process_age_s()
    history = run(demo_config(args, "twofold"))
    first_step = born + history[0]["startup/total_s"]
    return {"startup_s": first_step - args._launched, "step_s": [m["step_time_s"] for m in history],
            "generate_s": [m["time/generate_s"] for m in history], "train_s": [m["time/train_s"] for m in history],
            "reward_mean": statistics.mean(m["rollout/accuracy"] for m in history),
            "startup": {k: v for k, v in history[0].items() if k.startswith("startup/")}}


def run_trl(args) -> dict:
    if not args.trl_imports_vllm:
        # TRL as installed for CPU work, without vLLM (TRL's vLLM paths need a server or a GPU): this venv holds
        # vLLM for twofold, and TRL would import it at start without ever using it here
        import trl.import_utils as trl_imports
        trl_imports.is_vllm_available = lambda *a, **kw: False
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from twofold.engine.verifier import build_pool

    config = demo_config(args, "trl")
    pool = build_pool(config)  # the demo's verifier: the same checks, workers and timeout as twofold's run
    rows = [json.loads(line) for line in Path(args._prompts).read_text().splitlines()]

    def verifier_reward(completions, answer, **kwargs):
        return pool.verify_batch(completions, answer)

    times: dict[str, list[float]] = {"generate": [], "score": [], "step": []}
    marks: dict[str, float] = {}

    class Timed(trl.GRPOTrainer):
        def _generate(self, *a, **kw):
            t = time.perf_counter()
            out = super()._generate(*a, **kw)
            times["generate"].append(time.perf_counter() - t)
            return out

        def _generate_and_score_completions(self, *a, **kw):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(*a, **kw)
            times["score"].append(time.perf_counter() - t)
            return out

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            marks.setdefault("first_step", time.time())
            marks["step"] = time.perf_counter()

        def on_step_end(self, *a, **kw):
            times["step"].append(time.perf_counter() - marks["step"])

    targs = trl.GRPOConfig(
        output_dir=config.run_dir, num_generations=SAMPLES, per_device_train_batch_size=PROMPTS_PER_STEP * SAMPLES,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, max_completion_length=NEW_TOKENS,
        temperature=config.rollout.temperature, top_p=config.rollout.top_p, top_k=0, loss_type="grpo",
        scale_rewards="group", beta=BETA, epsilon=0.2, use_bias_correction_kl=False, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, adam_beta1=config.optim.betas[0],
        adam_beta2=config.optim.betas[1], adam_epsilon=config.optim.eps, weight_decay=config.optim.weight_decay,
        max_grad_norm=config.optim.max_grad_norm, gradient_checkpointing=False, bf16=False, use_cpu=True,
        max_steps=args.steps, seed=config.train.seed, report_to=[], logging_steps=1, save_strategy="no",
        dataloader_num_workers=0, model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"})
    tokenizer = AutoTokenizer.from_pretrained(args.sft)
    tokenizer.padding_side = "left"
    try:
        trainer = Timed(model=str(args.sft), reward_funcs=verifier_reward, args=targs, processing_class=tokenizer,
                        train_dataset=Dataset.from_list(rows), callbacks=[Clock()])
        trainer.train()
    finally:
        pool.close()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"startup_s": marks["first_step"] - args._launched, "step_s": times["step"],
            "generate_s": times["generate"], "train_s": [s - g for s, g in zip(times["step"], times["score"])],
            "reward_mean": statistics.mean(rewards)}


if __name__ == "__main__":
    main()
