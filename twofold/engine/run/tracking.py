"""Metrics sinks, rank 0 only: console progress bar, `metrics.jsonl`, optional TensorBoard / W&B, a PNG at the end.

TensorBoard and W&B come with the `tracking` extra; asking for one that is not installed is a config error
(config.validate). On a terminal the bar redraws freely; into a file or a CI log it prints at most every 30 s.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import sys
from pathlib import Path

from tqdm import tqdm

from twofold.engine.run.schema import Config

log = logging.getLogger("twofold")
PLOTTED = ("loss", "grad_norm", "lr", "tokens_per_s")
# NFT at R = 1: loss 0
ONLINE_PLOTTED = ("rollout/accuracy", "rollout/informative_groups", "grad_norm", "tokens_per_s", "mismatch/k3_kl")


class Tracker:
    def __init__(self, config: Config, enabled: bool, start_step: int):
        self.enabled = enabled
        self.run_dir = Path(config.run_dir)
        self.jsonl = self.bar = self.tb = self.wandb = None
        if not enabled:
            return
        # A resumed run repeats the steps after its checkpoint; a fresh start (step 0) repeats everything, the
        # evaluation before training included.
        for name in ("metrics.jsonl", "eval.jsonl"):
            drop_rows_after(self.run_dir / name, start_step if start_step else -1)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.eval_jsonl = open(self.run_dir / "eval.jsonl", "a", encoding="utf-8")
        if config.log.progress_bar:
            # Redirected to a file or CI log, a bar redrawn 10x a second is megabytes of noise: redraw every 30 s.
            # miniters=1 and maxinterval=mininterval: tqdm's monitor thread otherwise forces a redraw every 10 s
            interval = 0.1 if sys.stderr.isatty() else 30.0
            self.bar = tqdm(total=config.train.steps, initial=start_step, desc="train", dynamic_ncols=True,
                            mininterval=interval, maxinterval=max(interval, 10.0), miniters=1)
        if config.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if config.log.wandb:
            import wandb
            self.wandb = wandb.init(project=config.log.wandb_project, dir=str(self.run_dir), resume="allow",
                                    config=dataclasses.asdict(config))

    def log(self, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        step = int(metrics["step"])
        self.jsonl.write(json_row(metrics) + "\n")
        durable_flush(self.jsonl)
        if self.bar is not None:
            # refresh=False: set_postfix redraws by default, which would defeat the bar's 30 s interval
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", gnorm=f"{metrics['grad_norm']:.3g}",
                                 tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
            self.bar.update(1)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if metrics.get("skipped"):
            log_skip(step, metrics)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Held-out evaluation after `step` training steps (0: before training), to eval.jsonl and the console."""
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        self.eval_jsonl.write(json_row(row) + "\n")
        durable_flush(self.eval_jsonl)
        shown = "  ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items() if k != "eval/time_s")
        (self.bar.write if self.bar is not None else print)(f"eval after {step} steps: {shown}")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self, plot: bool) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        self.eval_jsonl.close()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if plot:
            plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "metrics.png", self.run_dir / "eval.jsonl")


def durable_flush(file) -> None:
    """Flush and fsync: a row is on disk before the step that logged it is checkpointed, so a crash (power loss
    included) cannot leave a checkpoint ahead of its metrics. One fsync per row: rows come one per step."""
    file.flush()
    os.fsync(file.fileno())


def log_skip(step: int, metrics: dict[str, float]) -> None:
    """Why a step changed no weights: the actor is frozen (OREAL), nothing was informative, or a non-finite value."""
    if metrics.get("actor_frozen"):
        log.info("step %d: actor frozen (rollout.freeze_actor_steps), only the token reward model trained", step)
    elif not metrics.get("tokens"):
        log.info("step %d: no informative group (every sample of each prompt scored the same); nothing to train on",
                 step)
    else:
        log.warning("step %d skipped: non-finite loss %.4g or gradient norm %.4g; weights unchanged", step,
                    metrics["loss"], metrics["grad_norm"])


def json_row(row: dict) -> str:
    """Strict JSON (RFC 8259 has no NaN or Infinity): a non-finite value is written as null."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    return json.dumps(clean, allow_nan=False)


def drop_rows_after(path: Path, step: int) -> int:
    """Keep only the rows of steps <= `step` (and no torn last line), rewriting the file atomically; returns how
    many rows went. A resumed run logs the steps after its checkpoint again, once."""
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if _row_step(line) is not None and _row_step(line) <= step]
    if len(kept) < len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
            durable_flush(f)  # else a crash after the rename can leave an empty file in its place
        os.replace(tmp, path)
        log.info("%s: dropped %d rows after step %d (the resumed run logs them again)", path.name,
                 len(lines) - len(kept), step)
    return len(lines) - len(kept)


def _row_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line torn by a kill mid-write


def _installed(package: str, option: str) -> bool:
    if importlib.util.find_spec(package) is None:
        log.warning("%s=true but %s is not installed; skipping it", option, package)
        return False
    return True


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl; a resumed run appends, so a step seen twice keeps its latest row."""
    rows = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        rows[int(row["step"])] = row
    return [rows[k] for k in sorted(rows)]


def plot_metrics(jsonl: Path, png: Path, eval_jsonl: Path | None = None) -> Path | None:
    """Training curves (online runs: loss, rollout accuracy, ...) and, when there is one, held-out evaluation."""
    if not _installed("matplotlib", "log.plot"):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(jsonl)
    keys = ONLINE_PLOTTED if rows and "rollout/accuracy" in rows[0] else PLOTTED
    evals = read_metrics(eval_jsonl) if eval_jsonl is not None and eval_jsonl.is_file() else []
    panels = len(keys) + bool(evals)
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3))
    for ax, key in zip(axes, keys):
        ax.plot([r["step"] for r in rows], [_value(r, key) for r in rows])
        ax.set_title(key)
        ax.set_xlabel("step")
    if evals:
        for key in [k for k in evals[0] if k.startswith("eval/") and k != "eval/time_s"]:
            axes[-1].plot([r["step"] for r in evals], [_value(r, key) for r in evals], marker="o",
                          label=key.removeprefix("eval/"))
        axes[-1].set_title("held-out pass@1")
        axes[-1].set_xlabel("step")
        axes[-1].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _value(row: dict, key: str) -> float:
    value = row.get(key)
    return float("nan") if value is None else value
