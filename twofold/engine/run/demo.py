"""The CPU demo: a tiny model learns two-digit + one-digit addition, first by imitation, then by RL.

    python -m twofold.engine.run.demo [--run-dir runs/demo] [--sft-steps 1200] [--rl-steps 80]

1. Data, generated in-process: an SFT set written by a sloppy teacher (right, except that it forgets the carry
   60% of the time), RL prompts with gold answers, and held-out problems that appear in neither.
2. SFT warm-up (configs/demo_sft.yaml): the model imitates the teacher, carry mistakes included.
3. Online NFT (configs/demo_nft.yaml): the real in-process vLLM sampler and the real verifier; the reward says
   which samples carried correctly, and held-out pass@1 (greedy and sampled avg@4) is measured before and after.
Writes runs/demo/nft/{metrics.jsonl, eval.jsonl, metrics.png}, exports the trained model to runs/demo/nft/hf
(a Hugging Face directory: `python -m twofold.engine.run.eval runs/demo/nft/hf runs/demo/data/eval.jsonl` scores it
again) and prints the before/after table. Each stage starts afresh (run_dir_policy=overwrite).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from twofold.engine.run.config import load_config
from twofold.engine.data.tasks import write_addition_data
from twofold.engine.run.train import run

CONFIGS = Path(__file__).resolve().parents[3] / "configs"  # the repository root: twofold/engine/run/demo.py


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m twofold.engine.run.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--sft-steps", type=int, default=1200)
    parser.add_argument("--rl-steps", type=int, default=80)
    parser.add_argument("--forget-carry", type=float, default=0.6)
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: the kernels' Triton path is never compiled
    torch.set_num_threads(1)  # tiny matmuls: one thread is several times faster than two
    start = time.perf_counter()
    root = Path(args.run_dir)
    data = write_addition_data(root / "data", sft_rows=20_000, rl_prompts=5_000, eval_prompts=200,
                               forget_carry=args.forget_carry)
    sft = load_config(CONFIGS / "demo_sft.yaml", [f"run_dir={root / 'sft'}", f"data.path={data['sft']}",
                                                  f"train.steps={args.sft_steps}", "checkpoint.resume=never",
                                                  "run_dir_policy=overwrite"])
    run(sft)
    rl = load_config(CONFIGS / "demo_nft.yaml", [f"run_dir={root / 'nft'}", f"model.path={root / 'sft' / 'hf'}",
                                                 f"data.path={data['prompts']}", f"eval.path={data['eval']}",
                                                 f"train.steps={args.rl_steps}", "checkpoint.resume=never",
                                                 "run_dir_policy=overwrite"])
    run(rl)
    evals = [json.loads(line) for line in (root / "nft" / "eval.jsonl").read_text().splitlines()]
    report = {"before": evals[0], "after": evals[-1], "wall_s": time.perf_counter() - start}
    print_report(report, root / "nft")
    return report


def print_report(report: dict, run_dir: Path) -> None:
    before, after = report["before"], report["after"]
    print(f"\nheld-out pass@1 ({run_dir}/eval.jsonl)      after SFT   after NFT")
    for key in [k for k in before if k.startswith("eval/") and k != "eval/time_s"]:
        print(f"  {key.removeprefix('eval/'):<36}{before[key]:>9.3f}{after[key]:>12.3f}")
    print(f"metrics: {run_dir}/metrics.jsonl, plot: {run_dir}/metrics.png, wall time {report['wall_s']:.0f} s")
    print(f"exported model (Hugging Face safetensors + tokenizer): {run_dir}/hf")


if __name__ == "__main__":
    main()
