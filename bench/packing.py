"""Host time of packing per online rollout step: how often a step plans and packs its batch, and what that costs.

    OMP_NUM_THREADS=1 python -m bench.packing                     # this checkout
    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/other/checkout python /path/to/this/bench/packing.py   # another commit

Runs real online GRPO steps (tiny model, transformers sampler, fp32, one process, one thread) in three settings:
`plain` (beta 0, no correction, one update), `ref+tis` (a reference model, beta 0.04, token_tis correction) and
`2x2` (ppo_epochs 2 x mini_batches 2: old log-probs). The engine's packing functions are wrapped by name wherever
the engine imported them (`PACKING`): per step it counts plans and packs (`collate` calls) and sums the wall and CPU
(`time.process_time`) time spent inside them, the outermost call only. Steps after the first are averaged (the
first pays one-time costs). The canary is off (it packs its own few sequences, not the step's batch). Only the
engine is driven, through `OnlineRun.step`, so the same script measures any commit with that method.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

# host-side packing work: planning, building the packed tensors, repacking per consumer, splitting results back
PACKING = ("plan_microbatches", "collate", "drop_corrected", "split_by_sequence", "gather_sequences",
           "drop_sequences", "per_sequence")
SETTINGS = {"plain": ["objective.kwargs={beta: 0.0}", "rollout.correction=none"],
            "ref+tis": ["objective.kwargs={beta: 0.04}", "rollout.correction=token_tis"],
            "2x2": ["objective.kwargs={beta: 0.0}", "rollout.correction=none", "rollout.ppo_epochs=2",
                    "rollout.mini_batches=2"]}


class Meter:
    def __init__(self):
        self.reset()

    def reset(self):
        self.calls, self.wall, self.cpu, self.depth = {}, 0.0, 0.0, 0

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            self.depth += 1
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.wall += time.perf_counter() - wall
                    self.cpu += time.process_time() - cpu
        timed.original = fn
        return timed


METER = Meter()


def instrument(meter: Meter) -> None:
    """Replace each PACKING function in every loaded twofold.engine module by its timed wrapper."""
    import twofold.engine.run.online  # noqa: F401  (loads every module the step uses)
    originals = {}
    for mod in [m for k, m in sys.modules.items() if k.startswith("twofold.engine") and m is not None]:
        for name in PACKING:
            fn = getattr(mod, name, None)
            if callable(fn) and not hasattr(fn, "original"):
                originals.setdefault(id(fn), meter.wrap(name, fn))
                setattr(mod, name, originals[id(fn)])


def measure(setting: str, root: Path, steps: int, prompts: int, samples: int, tokens: int) -> dict:
    from bench.rollout import write_tiny_model
    from twofold.engine.run.config import load_config
    from twofold.engine.train.distributed import init_distributed, shutdown_distributed
    from twofold.engine.run.online import OnlineRun
    from twofold.engine.run.train import load_tokenizer

    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(10) for b in range(10)))
    model = root / "model"
    if not model.exists():
        write_tiny_model(model)
    config = load_config(None, [
        f"run_dir={root / setting}", f"model.path={model}", "model.dtype=float32", "model.attn_implementation=sdpa",
        "model.activation_checkpointing=false", f"data.path={data}", "train.mode=online", "objective.name=grpo",
        f"train.steps={steps}", "rollout.dynamic_sampling=false", f"rollout.prompts_per_step={prompts}",
        f"rollout.samples_per_prompt={samples}", f"rollout.max_new_tokens={tokens}", "sampler.backend=transformers",
        "sampler.dtype=float32", "sampler.max_model_len=256", "sampler.canary_every=0",
        "data.max_tokens_per_microbatch=1024", "log.progress_bar=false", "log.plot=false", "verifier.workers=1",
        "checkpoint.export_hf=false", *SETTINGS[setting]])
    env = init_distributed(config.train.collective_timeout_s)
    rows = []
    instrument(METER)
    meter = METER
    online = OnlineRun(config, env, load_tokenizer(config))
    try:
        online.sync()
        for _ in range(steps):
            meter.reset()
            metrics = online.step()
            rows.append({"plans": meter.calls.get("plan_microbatches", 0), "packs": meter.calls.get("collate", 0),
                         "wall_ms": 1e3 * meter.wall, "cpu_ms": 1e3 * meter.cpu, "tokens": metrics["tokens"]})
    finally:
        online.close()
        shutdown_distributed()
    later = rows[1:] or rows
    mean = {k: sum(r[k] for r in later) / len(later) for k in ("plans", "packs", "wall_ms", "cpu_ms", "tokens")}
    return {"setting": setting, **mean}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            row = measure(setting, Path(tmp), args.steps, args.prompts, args.samples_per_prompt,
                          args.max_new_tokens)
            print(f"{row['setting']:8s} plans/step {row['plans']:4.1f}  packs/step {row['packs']:5.1f}  "
                  f"packing host time/step {row['wall_ms']:7.2f} ms wall, {row['cpu_ms']:7.2f} ms CPU  "
                  f"({row['tokens']:.0f} tokens trained/step)", flush=True)


if __name__ == "__main__":
    main()
