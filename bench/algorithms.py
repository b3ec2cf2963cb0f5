"""The papers' comparison at CPU scale: every online objective and the REDI recipe, from one shared SFT start, on a
synthetic task where negatives carry information (`bench/tasks.py`), over several seeds.

    python -m bench.algorithms [--quick | --tiny] [--seeds 3] [--arms nft,grpo,...] [--out bench/results]

1. Data, generated in-process: SFT traces by a sloppy teacher (right, except for one random slip of five kinds
   with probability --error-rate), RL prompts, held-out problems (levels 1-3 in equal shares), and for the
   offline arm one right and one wrong trace per problem.
2. SFT warm-up (configs/demo_sft.yaml, tiny-qwen2-vllm): the shared start of every arm.
3. Online arms (configs/demo_nft.yaml: the in-process vLLM sampler, the verifier, dynamic sampling) per seed:
   NFT, RFT, GRPO, DAPO, Dr. GRPO, OREAL with and without its token reward model, JEPO, and NFT with GRPO's
   prompt weight sqrt((1-r)/r), which is GRPO's gradient at strict on-policy up to a constant that Adam ignores
   (no gradient clipping in any arm): its gap to GRPO is the run-to-run noise floor of runs whose gradients are
   the same, measured the same way as every other gap.
4. Offline stage 2 (REDI's recipe) from the same start on the teacher's pairs: REDI, DPO, SimPO, and continued
   SFT on the right traces; checkpoints are evaluated by a zero-step online run from the exported model.
Every checkpoint is scored by held-out greedy pass@1. Prints the table (mean +- sd over seeds per checkpoint) and
the noise floor; writes bench/results/algorithms-<mode>-<date>.{json,md} and a learning-curve PNG per arm.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import shutil
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.tasks import LEVELS, Problem, problem_sets, random_problem, sloppy_trace, trace, wrong_trace
from twofold.engine.run.config import load_config
from twofold.engine.run.schema import Config
from twofold.engine.data.loading import Fields
from twofold.engine.train.distributed import init_distributed, shutdown_distributed
from twofold.engine.run.eval import evaluate
from twofold.engine.train.model import build_policy
from twofold.engine.data.tasks import load_problems
from twofold.engine.run.tracking import read_metrics
from twofold.engine.data.tokenizer import load_tokenizer
from twofold.engine.run.train import run
from twofold.engine.rollout.weight_sync import sync_weights

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METRIC = "eval/pass1_greedy"

# online arms: overrides on configs/demo_nft.yaml (objective and the settings it needs)
ONLINE = {
    "nft": ["objective.name=nft", "objective.kwargs.eps=1.0", "objective.kwargs.prompt_weight=1-r",
            "objective.kwargs.agg=token_mean"],
    "rft": ["objective.name=rft", "objective.kwargs.agg=token_mean"],
    "grpo": ["objective.name=grpo", "objective.kwargs.beta=0.0"],
    "nft_sqrt": ["objective.name=nft", "objective.kwargs.eps=1.0", "objective.kwargs.prompt_weight=sqrt",
                 "objective.kwargs.agg=seq_mean_token_mean"],
    "dapo": ["objective.name=dapo"],
    "drgrpo": ["objective.name=drgrpo"],
    "oreal": ["objective.name=oreal"],
    "oreal_no_rm": ["objective.name=oreal", "rollout.token_rm=false"],
    "jepo": ["objective.name=jepo", "rollout.dynamic_sampling=false"],
}
# offline stage 2: (objective, data file, overrides)
OFFLINE = {
    "sft2": ("sft", "positives", []),
    "dpo": ("dpo", "pairs", []),
    "simpo": ("simpo", "pairs", []),
    "redi": ("redi", "pairs", ["objective.kwargs.alpha=0.8"]),
}
LABELS = {"nft": "NFT", "rft": "RFT", "grpo": "GRPO", "nft_sqrt": "NFT (omega = GRPO's)", "dapo": "DAPO",
          "drgrpo": "Dr. GRPO", "oreal": "OREAL (token RM)", "oreal_no_rm": "OREAL (no RM)", "jepo": "JEPO",
          "sft2": "SFT -> SFT", "dpo": "SFT -> DPO", "simpo": "SFT -> SimPO", "redi": "SFT -> REDI"}


@dataclass
class Scale:
    """How big one invocation is; --quick and --tiny pick smaller ones."""
    sft_steps: int = 3000
    rl_steps: int = 16
    eval_every: int = 4
    offline_steps: int = 100
    offline_every: int = 50
    seeds: int = 3
    train_problems: int = 3000
    """Distinct training problems: half RL prompts, half the offline pairs (SFT draws a fresh problem per row)."""
    held_out: int = 300
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    oreal_freeze: int = 4
    """OREAL: rollout steps that train only the token reward model first (rollout.freeze_actor_steps)."""
    sft_batch: int = 64
    rl_lr: float = 5e-4
    """Learning rate of every online arm."""
    offline_batch: int = 32
    """Stage-2 rows per optimizer step (pairs for DPO, SimPO, REDI; traces for SFT)."""
    extra: list[str] = field(default_factory=list)


SCALES = {
    "full": Scale(),
    "quick": Scale(sft_steps=250, rl_steps=6, eval_every=3, offline_steps=20, offline_every=10, seeds=2,
                   held_out=120, prompts_per_step=8, oreal_freeze=2, sft_batch=32, offline_batch=16),
    "tiny": Scale(sft_steps=4, rl_steps=1, eval_every=1, offline_steps=1, offline_every=1, seeds=1,
                  train_problems=200, held_out=12, prompts_per_step=2, samples_per_prompt=4,
                  oreal_freeze=0, sft_batch=8, offline_batch=4),
}


def write_data(directory: Path, scale: Scale, error_rate: float, seed: int = 0, sft: bool = True
               ) -> dict[str, Path]:
    """sft.jsonl (sloppy teacher; empty when `sft` is False, a reused start), prompts.jsonl / eval.jsonl (prompt, answer), pairs.jsonl (one right and one
    wrong trace per problem) and positives.jsonl (the same right traces), all disjoint from the held-out set."""
    train, held_out = problem_sets(seed, scale.train_problems, scale.held_out)
    rng = random.Random(seed + 1)
    half = len(train) // 2  # RL prompts on one half, the offline pairs on the other
    rows: dict[str, list[dict]] = {"sft": [], "prompts": [], "eval": [], "pairs": [], "positives": []}
    excluded = {p.prompt for p in held_out + train[half:]}
    for _ in range(scale.sft_steps * scale.sft_batch if sft else 0):
        # a fresh problem and a fresh slip (or none) per row: the SFT start learns the arithmetic, not a fixed
        # set of problems (level 1 has only ~1,500 problems, so those repeat; levels 2-3 almost never do)
        p = fresh_problem(rng, excluded)
        rows["sft"].append({"prompt": p.prompt, "response": sloppy_trace(p, rng, error_rate)[0]})
    rows["prompts"] = [{"prompt": p.prompt, "answer": str(p.answer)} for p in train[:half]]
    rng = random.Random(seed + 2)  # the pairs do not depend on how many SFT rows were drawn
    for p in train[half:]:
        right = trace(p)[0]
        rows["pairs"].append({"prompt": p.prompt, "chosen": right, "rejected": wrong_trace(p, rng)[0]})
        rows["positives"].append({"prompt": p.prompt, "response": right})
    rows["eval"] = [{"prompt": p.prompt, "answer": str(p.answer), "level": p.level} for p in held_out]
    for level in LEVELS:  # the start's pass@1 per level
        rows[f"eval{level}"] = [r for r in rows["eval"] if r["level"] == level]
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, items in rows.items():
        paths[name] = directory / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in items))
    return paths


def fresh_problem(rng: random.Random, excluded: set[str]) -> Problem:
    """A random problem of a random level (levels in equal shares) whose prompt is not in `excluded`."""
    level = rng.choice(LEVELS)
    while True:
        p = random_problem(rng, level)
        if p.prompt not in excluded:
            return p


def common(run_dir: Path, model_path: Path | None) -> list[str]:
    out = [f"run_dir={run_dir}", "checkpoint.resume=never", "log.progress_bar=false", "log.plot=false"]
    return out + ([f"model.path={model_path}"] if model_path else [])


def online_config(arm: str, seed: int, run_dir: Path, start: Path, data: dict[str, Path], scale: Scale,
                  steps: int) -> Config:
    overrides = common(run_dir, start) + [
        f"data.path={data['prompts']}", f"eval.path={data['eval']}", f"train.steps={steps}", f"train.seed={seed}",
        f"eval.every={scale.eval_every}", "eval.samples=0", "optim.max_grad_norm=0", "checkpoint.export_hf=false",
        f"rollout.prompts_per_step={scale.prompts_per_step}", f"rollout.samples_per_prompt={scale.samples_per_prompt}",
        "rollout.max_new_tokens=40", "sampler.max_model_len=64", "data.max_tokens_per_microbatch=8192",
        "rollout.token_rm_lr=1e-3", "objective.kwargs={}", f"optim.lr={scale.rl_lr}"]
    if arm == "oreal":  # the engine freezes the actor of any objective: only OREAL's token RM asks for it
        overrides.append(f"rollout.freeze_actor_steps={scale.oreal_freeze}")
    return load_config(CONFIGS / "demo_nft.yaml", overrides + ONLINE[arm] + scale.extra)


def offline_config(arm: str, seed: int, run_dir: Path, start: Path, data: dict[str, Path], steps: int,
                   lr: float, batch: int) -> Config:
    objective, source, extra = OFFLINE[arm]
    overrides = [f"run_dir={run_dir}", f"model.path={start}", "model.preset=", f"data.path={data[source]}",
                 f"objective.name={objective}", f"train.steps={steps}", f"train.seed={seed}",
                 f"data.batch_size={batch}",
                 f"optim.lr={lr}", "optim.warmup_steps=0", "optim.schedule=constant", "checkpoint.resume=auto",
                 "checkpoint.every=0", "checkpoint.keep_last=1", "checkpoint.export_hf=true",
                 "checkpoint.export_dtype=float32", "log.progress_bar=false", "log.plot=false"]
    return load_config(CONFIGS / "demo_sft.yaml", overrides + extra)


def evals(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): float(r[METRIC]) for r in read_metrics(run_dir / "eval.jsonl")}


class Bench:
    def __init__(self, root: Path, scale: Scale, error_rate: float, offline_lr: float, sft: bool = True):
        self.root, self.scale, self.offline_lr = root, scale, offline_lr
        self.data = write_data(root / "data", scale, error_rate, sft=sft)
        self.sampler = self.pool = None
        self.curves: dict[str, dict[int, list[float]]] = {}
        self.start_by_level: dict[int, float] = {}
        self.metrics: dict[str, list[list[dict]]] = {}

    def sft(self) -> Path:
        s = self.scale
        cfg = load_config(CONFIGS / "demo_sft.yaml", common(self.root / "sft", None) + [
            f"data.path={self.data['sft']}", f"train.steps={s.sft_steps}", f"optim.warmup_steps={min(10, s.sft_steps)}",
            f"data.batch_size={s.sft_batch}",
            "data.max_tokens_per_microbatch=4096"])
        run(cfg)
        return self.root / "sft" / "hf"

    def shared_engine(self, cfg: Config) -> dict:
        """One vLLM engine and one verifier pool for every run (weights arrive by sync at each run's start)."""
        if self.sampler is None:
            from twofold.engine.rollout.backends import build_sampler
            from twofold.engine.verifier import VerifierPool
            self.sampler = build_sampler(cfg.sampler, cfg.model.path, 0)
            self.pool = VerifierPool(cfg.verifier.workers, cfg.verifier.timeout)
        return {"sampler": self.sampler, "pool": self.pool}

    def online(self, arm: str, seed: int, start: Path) -> None:
        run_dir = self.root / arm / f"seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = online_config(arm, seed, run_dir, start, self.data, self.scale, self.scale.rl_steps)
        history = run(cfg, **self.shared_engine(cfg))
        self.record(arm, evals(run_dir), history)

    def evaluate(self, model: Path, held_out: str = "eval") -> float:
        """Held-out greedy pass@1 of an exported model, scored exactly as the online runs score theirs
        (`held_out`: "eval", or "eval1".."eval3" for one level)."""
        data = {**self.data, "eval": self.data[held_out]}
        cfg = online_config("nft", 0, self.root / "eval", model, data, self.scale, self.scale.rl_steps)
        engine = self.shared_engine(cfg)
        env = init_distributed()
        try:
            tokenizer = load_tokenizer(cfg)
            problems = load_problems(cfg.eval.path, tokenizer, Fields.from_config(cfg.data), cfg.sampler.max_model_len)
            sync_weights(build_policy(cfg.model, env), engine["sampler"])
            return evaluate(engine["sampler"], engine["pool"], problems.problems, cfg)[METRIC]
        finally:
            shutdown_distributed()

    def offline(self, arm: str, seed: int, start: Path, start_score: float) -> None:
        run_dir = self.root / arm / f"seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        s, curve, history = self.scale, {0: start_score}, []
        for steps in range(s.offline_every, s.offline_steps + 1, s.offline_every):
            history += run(offline_config(arm, seed, run_dir, start, self.data, steps, self.offline_lr,
                                          s.offline_batch))
            curve[steps] = self.evaluate(run_dir / "hf")
        rows = [json.dumps({"step": k, METRIC: v}) + "\n" for k, v in curve.items()]
        (run_dir / "eval.jsonl").write_text("".join(rows))  # the offline runs' own eval.jsonl
        self.record(arm, curve, history)

    def record(self, arm: str, curve: dict[int, float], history: list[dict]) -> None:
        for step, value in curve.items():
            self.curves.setdefault(arm, {}).setdefault(step, []).append(value)
        self.metrics.setdefault(arm, []).append(history)

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.pool.close()


# ---- reporting -------------------------------------------------------------------------------------------------

def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def noise_floor(curves: dict[str, dict[int, list[float]]]) -> dict[int, float] | None:
    """Per checkpoint: mean over seeds of |NFT(omega = GRPO's) - GRPO|, runs whose gradients are the same."""
    if "nft_sqrt" not in curves or "grpo" not in curves:
        return None
    a, b = curves["nft_sqrt"], curves["grpo"]
    return {step: statistics.fmean(abs(x - y) for x, y in zip(a[step], b[step])) for step in a if step in b}


def grad_norm_ratio(metrics: dict[str, list[list[dict]]]) -> list[float]:
    """Per step of seed 0 while the two runs' rollouts were identical (same accuracy, mean length and informative
    groups; the same accuracy alone was seen with different samples): grad_norm(NFT sqrt) / grad_norm(GRPO);
    theory: sqrt(G / (G - 1)) (GRPO's unbiased std against NFT's population form)."""
    if "nft_sqrt" not in metrics or "grpo" not in metrics:
        return []
    out, same = [], ("rollout/accuracy", "rollout/response_len", "rollout/informative_groups")
    for x, y in zip(metrics["nft_sqrt"][0], metrics["grpo"][0]):
        if any(x.get(k) != y.get(k) for k in same) or not y.get("grad_norm"):
            break
        out.append(x["grad_norm"] / y["grad_norm"])
    return out


def table(curves: dict[str, dict[int, list[float]]], arms: list[str]) -> str:
    """Markdown: one row per arm, one column per checkpoint, mean +- sd over seeds; the online table ends with
    the noise floor."""
    lines, floor = [], noise_floor(curves)
    for group in ([a for a in arms if a in ONLINE], [a for a in arms if a in OFFLINE]):
        if not group:
            continue
        steps = sorted(curves[group[0]])
        kind = "rollout step" if group[0] in ONLINE else "stage-2 step"
        lines += ["| arm | " + " | ".join(f"{kind} {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
        for arm in group:
            cells = [("%.3f ± %.3f" % mean_sd(curves[arm][s])) if s in curves[arm] else "-" for s in steps]
            lines.append(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
        if floor and group[0] in ONLINE:
            lines.append("| noise floor: mean abs(NFT (omega = GRPO's) - GRPO) | " +
                         " | ".join(f"{floor[s]:.3f}" if s in floor else "-" for s in steps) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(curves: dict[int, list[float]], label: str, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = sorted(curves)
    fig, ax = plt.subplots(figsize=(4, 3))
    for seed in range(len(curves[steps[0]])):
        ax.plot(steps, [curves[s][seed] for s in steps], color="0.7", lw=1)
    ax.plot(steps, [statistics.fmean(curves[s]) for s in steps], color="C0", marker="o", lw=2, label="mean")
    ax.set(title=label, xlabel="step", ylabel="held-out greedy pass@1", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.algorithms", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few minutes: 2 seeds, short runs")
    size.add_argument("--tiny", action="store_true", help="seconds per arm: the CI smoke configuration")
    parser.add_argument("--seeds", type=int, default=0, help="override the scale's seed count")
    parser.add_argument("--sft-steps", type=int, default=0, help="override the scale's SFT warm-up steps")
    parser.add_argument("--rl-steps", type=int, default=0, help="override the scale's rollout steps")
    parser.add_argument("--rl-lr", type=float, default=0.0, help="override the online arms' learning rate")
    parser.add_argument("--arms", default=",".join([*ONLINE, *OFFLINE]), help="comma-separated subset")
    parser.add_argument("--error-rate", type=float, default=0.5, help="sloppy SFT teacher's slip probability")
    parser.add_argument("--offline-lr", type=float, default=1e-4)
    parser.add_argument("--run-dir", default="runs/algorithms")
    parser.add_argument("--sft", default="", help="reuse this exported SFT start (written by an earlier run of the "
                                                  "same scale) instead of training it")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    scale = dataclasses.replace(SCALES[mode], **{k: v for k, v in (("sft_steps", args.sft_steps),
                                                                 ("rl_steps", args.rl_steps),
                                                                 ("rl_lr", args.rl_lr)) if v})
    seeds = args.seeds or scale.seeds
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in LABELS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; arms: {', '.join(LABELS)}")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    start = time.perf_counter()
    bench = Bench(Path(args.run_dir), scale, args.error_rate, args.offline_lr, sft=not args.sft)
    try:
        sft = Path(args.sft) if args.sft else bench.sft()
        start_score = bench.evaluate(sft)
        bench.start_by_level = {level: bench.evaluate(sft, f"eval{level}") for level in LEVELS}
        print(f"shared SFT start {sft}: held-out greedy pass@1 {start_score:.3f}, by level "
              + ", ".join(f"{k}: {v:.3f}" for k, v in bench.start_by_level.items()), flush=True)
        for seed in range(seeds):
            for arm in arms:
                if arm in ONLINE:
                    bench.online(arm, seed, sft)
                else:
                    bench.offline(arm, seed, sft, start_score)
    finally:
        bench.close()
    wall = time.perf_counter() - start
    return report(bench, arms, mode, seeds, wall, Path(args.out), args)


def report(bench: Bench, arms: list[str], mode: str, seeds: int, wall: float, out: Path, args) -> dict:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    stem = f"algorithms-{mode}-{date}"
    out.mkdir(parents=True, exist_ok=True)
    (out / stem).mkdir(exist_ok=True)
    for arm in arms:
        plot(bench.curves[arm], LABELS[arm], out / stem / f"{arm}.png")
    ratios = grad_norm_ratio(bench.metrics)
    text = table(bench.curves, arms)
    header = (f"`python -m bench.algorithms{' --' + mode if mode != 'full' else ''}` on {machine()}, {date}; "
              f"{seeds} seed(s), held-out greedy pass@1 ({bench.scale.held_out} problems, levels {LEVELS}), "
              f"wall time {wall:.0f} s")
    extra = ""
    if ratios:
        g = bench.scale.samples_per_prompt
        extra = (f"grad-norm ratio NFT(omega = GRPO's) / GRPO over the {len(ratios)} steps with identical rollouts "
                 f"(seed 0): {min(ratios):.5f}-{max(ratios):.5f}, theory sqrt(G/(G-1)) = {(g / (g - 1)) ** 0.5:.5f}")
    print(f"\n{header}\n\n{text}\n{extra}", flush=True)
    result = {"command": header, "machine": machine(), "date": date, "mode": mode, "seeds": seeds,
              "wall_s": wall, "scale": bench.scale.__dict__, "error_rate": args.error_rate,
              "offline_lr": args.offline_lr, "curves": {a: {str(s): v for s, v in bench.curves[a].items()}
                                                        for a in arms},
              "noise_floor": noise_floor(bench.curves), "grad_norm_ratio": ratios,
              "token_rm": token_rm_summary(bench.metrics),
              "start_by_level": bench.start_by_level,
              "rollout_accuracy": {a: [[m.get("rollout/accuracy") for m in h] for h in bench.metrics[a]]
                                   for a in arms if a in ONLINE},
              "informative_groups": {a: [[m.get("rollout/informative_groups") for m in h] for h in bench.metrics[a]]
                                     for a in arms if a in ONLINE}}
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(f"{header}\n\n{text}\n{extra}\n")
    return result


def token_rm_summary(metrics: dict[str, list[list[dict]]]) -> list[list[dict]]:
    """OREAL's token RM per step and seed: BCE loss and accuracy (the investigation of issue 18, point 3)."""
    return [[{k: m[k] for k in ("step", "token_rm/loss", "token_rm/accuracy") if k in m} for m in h]
            for h in metrics.get("oreal", [])]


if __name__ == "__main__":
    main()
