"""Training entry point.

    python -m twofold.engine.run.train --config configs/tiny_sft.yaml [section.key=value ...]   one process (CPU or 1 GPU)
    torchrun --nproc_per_node=8 -m twofold.engine.run.train --config configs/<recipe>.yaml [...] FSDP2 over 8 ranks
    python -m twofold.engine.run.train --config configs/tiny_sft.yaml --print-config            the resolved config

train.mode=offline (SFT, RFT, REDI, DPO, SimPO) trains on dataset rows; train.mode=online (NFT, RFT, GRPO, DAPO,
Dr. GRPO, OREAL, JEPO) samples from the policy and verifies answers (twofold.engine.run.online).

Each step takes the next global mini-batch, runs `Trainer.step` and logs; checkpoints every `checkpoint.every`
steps and at the end of the invocation; with checkpoint.resume=auto a rerun continues from the newest complete
checkpoint in run_dir (at any world size). When the run reaches train.steps it exports `<run_dir>/hf` and writes
`<run_dir>/complete.json`; running it again then says it is complete and does nothing. A fresh run into a used
run_dir stops unless `run_dir_policy` is overwrite or new.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from twofold.engine.train.checkpoint import (MANIFEST, CheckpointDamaged, CheckpointRefused, complete_checkpoints,
                                       damaged_checkpoints, export_hf, incomplete_newer, resume_newest, save_checkpoint,
                                       step_of)
from twofold.engine.run.config import (BadInput, config_reference, console_yaml, load_config, objective_kwargs,
                                       save_config, to_yaml)
from twofold.engine.run.schema import Config
from twofold.engine.data.tokenizer import load_tokenizer
from twofold.engine.data.loading import BatchStream, Fields, load_sequences
from twofold.engine.train.distributed import (DistEnv, describe_hang, describe_lost_peer, init_distributed, is_peer_lost,
                                        is_timeout, shutdown_distributed)
from twofold.engine.data.hub import resolve_model
from twofold.engine.train.model import build_policy, load_hf_config
from twofold.engine.run.online import OnlineRun
from twofold.engine.train.packing import Sequence
from twofold.engine.verifier.pool import RewardFunctionError, resolve_functions
from twofold.engine.rollout.sampler import fit_to_model
from twofold.engine.run.tracking import Tracker
from twofold.engine.train.trainer import Trainer, sequence_logprobs
from twofold.kernels.chunked import gemm_precision
from twofold.objectives import get_spec, names

log = logging.getLogger("twofold")


COMPLETE = "complete.json"
"""Written into run_dir when a run reaches train.steps: {"steps": ..., "outputs": [...]}."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m twofold.engine.run.train", description="\n\n".join(__doc__.split("\n\n")[:3]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (YAML sections, or section.key=value on the command line):\n" + config_reference())
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml); without it, overrides alone")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    quick = parser.add_argument_group("quickstart (no recipe: defaults sized from the model and this machine, "
                                      "printed at start; any section.key=value still applies on top)")
    quick.add_argument("--model", help="model.path: a Hugging Face model directory or Hub id")
    quick.add_argument("--data", help="data.path: prompts with gold answers (online) or training rows (offline)")
    quick.add_argument("--objective", help="objective.name; train.mode follows from it (online where it can run "
                       "online)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=3e-5 train.steps=20")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the options


def quickstart_overrides(model: str, data: str, objective: str) -> list[str]:
    """The overrides that `--model/--data/--objective` stand for: the run's mode from the objective, a run_dir
    named after both (a numbered sibling when it is in use), and, without a GPU, fp32 compute and sdpa attention
    (bf16 is emulated on most CPUs) and a context that a CPU samples in seconds."""
    online = "online" in get_spec(objective).modes
    chosen = [f"model.path={model}", f"data.path={data}", f"objective.name={objective}",
              f"train.mode={'online' if online else 'offline'}",
              f"run_dir=runs/{objective}-{Path(model.rstrip('/')).name}", "run_dir_policy=new"]
    if not torch.cuda.is_available():
        chosen += ["model.dtype=float32", "model.attn_implementation=sdpa", "model.activation_checkpointing=false"]
        if online:
            chosen += ["sampler.dtype=float32", "sampler.max_model_len=1024", "rollout.max_new_tokens=256",
                       f"verifier.workers={max(1, min(4, (os.cpu_count() or 2) // 2))}"]
    return chosen


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quick = [args.model, args.data, args.objective]
    if any(quick) and not all(quick):
        sys.exit("config error: the quickstart needs all three of --model, --data and --objective")
    overrides = args.overrides
    if all(quick):
        chosen = quickstart_overrides(*quick)
        print("quickstart: " + " ".join(chosen) + " (set any of them, or any other key, as key=value)", flush=True)
        overrides = chosen + list(overrides)
    try:
        gemm_precision()  # a bad TWOFOLD_GEMM_PRECISION fails here, not at the first step
        config = load_config(args.config, overrides)
    except ValueError as err:
        sys.exit(f"config error: {err}")
    if args.print_config:
        print(to_yaml(config), end="")
        return
    try:
        run(config)
    except (CollectiveTimeout, CheckpointDamaged, CheckpointRefused, RunDirError, RewardFunctionError,
            BadInput) as err:  # the message says all
        sys.exit(f"error: {err}")
    except ValueError as err:  # bad input (data rows, fields, model files): the message names it and the fix
        if config.log.verbose:
            raise
        sys.exit(f"error: {err} (log.verbose=true shows where it was raised)")


class CollectiveTimeout(RuntimeError):
    """A rank of a multi-rank run stopped answering or died: the message names it."""


def check_vocabulary(config: Config, tokenizer) -> None:
    """Every id the tokenizer can produce must index the model's embedding (else an IndexError deep in the first
    forward, after the sampler engine has started)."""
    rows = load_hf_config(config.model).vocab_size
    if len(tokenizer) > rows:
        source = config.model.tokenizer or config.model.path or "the built-in character tokenizer"
        raise BadInput(f"the tokenizer ({source}) has {len(tokenizer)} tokens but the model's embedding has "
                       f"vocab_size={rows} rows (model.{'path' if config.model.path else 'preset'}): ids >= {rows} "
                       "would index past it. Use the model's own tokenizer (model.tokenizer) or a model whose "
                       "vocabulary covers this one")


def run(config: Config, **online_kwargs) -> list[dict]:
    """Train (or continue) the run described by `config`; returns this invocation's metrics (one dict per step).
    Online runs accept a ready `sampler` and verifier `pool` (tests share one engine between runs)."""
    env = init_distributed(config.train.collective_timeout_s)
    try:
        return _run(config, env, **online_kwargs)
    except RuntimeError as err:
        if env.world_size > 1 and is_timeout(err):
            raise CollectiveTimeout(describe_hang(config.train.collective_timeout_s)) from err
        if env.world_size > 1 and is_peer_lost(err):
            raise CollectiveTimeout(describe_lost_peer()) from err
        raise
    finally:
        shutdown_distributed()


def _run(config: Config, env: DistEnv, **online_kwargs) -> list[dict]:
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING, format="%(levelname)s %(message)s")
    start = time.perf_counter()
    if config.train.mode == "online":
        resolve_functions([f.name for f in config.reward.functions])  # a second now, not after the engine start
    done = prepare_run_dir(config, env)
    if done is not None:
        if env.is_main:
            print(f"run {config.run_dir} is complete ({done['steps']} of train.steps={config.train.steps}); "
                  f"nothing to do. Outputs: {', '.join(done['outputs'])}", flush=True)
        return []
    if env.is_main:
        print(console_yaml(config), flush=True)
        save_config(config, config.run_dir)
    resolve_model(config.model)
    torch.manual_seed(config.train.seed + env.rank)
    tokenizer = load_tokenizer(config)
    check_vocabulary(config, tokenizer)
    if config.train.mode == "online":
        config.sampler = fit_to_model(config.sampler, load_hf_config(config.model),
                                      config.model.path or f"model.preset={config.model.preset}")
        online = OnlineRun(config, env, tokenizer, **online_kwargs)
        try:
            history = online.run(lambda extras: resume(config, online.trainer, extras))
            finished = online.rollout_steps >= config.train.steps
        finally:
            online.close()
        finish(config, env, history, finished, start)
        return history
    data = config.data
    sequences = load_sequences(data.path, tokenizer, data.max_tokens_per_microbatch, data.on_bad_row,
                               Fields.from_config(data), data.format, data.split)
    check_layout(config, sequences)
    policy = build_policy(config.model, env, seed=config.train.seed)
    trainer = Trainer(policy, env, config.optim, objective=config.objective.name,
                      objective_kwargs=objective_kwargs(config), total_steps=config.train.steps,
                      max_tokens_per_microbatch=data.max_tokens_per_microbatch,
                      pad_token_id=tokenizer.pad_token_id or 0, head=config.train.head)
    # after the optimizer exists: a forward leaves the FSDP2 root unsharded, and the optimizer must hold the shards
    if "reference_sums" in get_spec(config.objective.name).needs and data.precompute_ref_logp:
        add_reference_sums(policy, sequences, env, data.max_tokens_per_microbatch, tokenizer.pad_token_id or 0)
    stream = BatchStream(sequences, data.batch_size, data.shuffle, config.train.seed)
    resumed = resume(config, trainer)
    if resumed is not None:
        stream.load_state_dict(resumed[1])
        log.info("resumed from %s at step %d", resumed[0], trainer.steps_done)
    history = train_loop(config, trainer, stream, env, tokenizer)
    finished = trainer.steps_done >= config.train.steps
    if finished and config.checkpoint.export_hf:
        out = export_hf(policy, tokenizer, Path(config.run_dir) / "hf", config.checkpoint.export_dtype)
        log.info("exported Hugging Face checkpoint to %s", out)
    finish(config, env, history, finished, start)
    return history


def takes_pairs(name: str) -> bool:
    """Whether the objective trains on (chosen, rejected) pairs."""
    return get_spec(name).packing_unit == "pair"


def check_layout(config: Config, sequences: list[Sequence]) -> None:
    """Pairs for pair objectives, single responses for the others: SFT on a pairs file would train on the rejected
    answers as well as the chosen ones, and a pair objective has nothing to compare on single responses."""
    name, first = config.objective.name, sequences[0]
    pairs = "pair_id" in first.fields
    if pairs == takes_pairs(name):
        return
    pair_objectives = ", ".join(n for n in names("offline") if takes_pairs(n))
    if pairs:
        raise ValueError(f"data.path {config.data.path} holds preference pairs (row {first.row_id}: "
                         f"{config.data.chosen_field}/{config.data.rejected_field}) and objective.name={name} trains on "
                         "every sequence, so it would train on the rejected answers too. Use a pair objective "
                         f"({pair_objectives}), or give {name} rows of prompt and response (the chosen answers)")
    raise ValueError(f"objective.name={name} trains on preference pairs, but data.path {config.data.path} holds single "
                     f"responses (row {first.row_id}); give rows with {config.data.chosen_field} and "
                     f"{config.data.rejected_field}, or use an objective for single responses")


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (named in the message)."""


def prepare_run_dir(config: Config, env: DistEnv) -> dict | None:
    """Decide, on rank 0, what this invocation does with run_dir, and tell every rank: the complete.json of a
    finished run (then there is nothing to do), or None after making run_dir ready (resume, overwrite, or a new
    sibling, which replaces config.run_dir)."""
    decision: list = [None]
    if env.is_main:
        try:
            decision = [_decide_run_dir(config)]
        except RunDirError as err:
            decision = [err]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(decision, src=0)
    outcome = decision[0]
    if isinstance(outcome, RunDirError):
        raise outcome
    config.run_dir, done = outcome
    return done


def _decide_run_dir(config: Config) -> tuple[str, dict | None]:
    run_dir = Path(config.run_dir)
    marker = run_dir / COMPLETE
    if config.checkpoint.resume == "auto" and marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("steps", 0) >= config.train.steps:
            return config.run_dir, done
    if resume_path(config) is not None or not run_dir.is_dir() or not any(run_dir.iterdir()):
        return config.run_dir, None
    if is_failed_start(run_dir):
        log.info("run_dir %s holds only the files of a start that never reached a step: reusing it", run_dir)
        return config.run_dir, None
    policy = config.run_dir_policy
    if policy == "error":
        held = ", ".join(sorted(p.name for p in run_dir.iterdir())[:6])
        raise RunDirError(
            f"run_dir {run_dir} already holds files of another run ({held}) and there is nothing to resume "
            f"(checkpoint.resume={config.checkpoint.resume}). Choose another run_dir, or set run_dir_policy=overwrite "
            "(delete them) or run_dir_policy=new (use a numbered sibling)")
    if policy == "overwrite":
        log.warning("run_dir_policy=overwrite: deleting the contents of %s", run_dir)
        for item in run_dir.iterdir():
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
        return config.run_dir, None
    n = 1
    while (sibling := run_dir.with_name(f"{run_dir.name}-{n}")).exists() and any(sibling.iterdir()):
        n += 1
    log.info("run_dir_policy=new: %s is in use, this run goes to %s", run_dir, sibling)
    return str(sibling), None


START_FILES = {"config.yaml", "sampler_model"}
"""What a run writes into run_dir before its first step: the resolved config, a preset's sampler model files."""


def is_failed_start(run_dir: Path) -> bool:
    """run_dir holds nothing but what a start writes before its first step, and its config.yaml is a twofold dump
    (every section): a start that failed (bad data, a model that did not load) and may be rerun into it."""
    names = {p.name for p in run_dir.iterdir() if not (p.name in ("metrics.jsonl", "eval.jsonl")
                                                       and p.is_file() and p.stat().st_size == 0)}
    if not names <= START_FILES or "config.yaml" not in names:
        return False
    try:
        written = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(written, dict) and set(written) == {f.name for f in dataclasses.fields(Config)}


def finish(config: Config, env: DistEnv, history: list[dict], finished: bool, start: float) -> None:
    """The run's summary line (steps, final loss, time, outputs) and, once train.steps are done, complete.json."""
    if not env.is_main:
        return
    run_dir = Path(config.run_dir)
    written = [run_dir / name for name in ("metrics.jsonl", "eval.jsonl", "metrics.png", "hf")]
    outputs = [str(p) for p in written if p.is_dir() or (p.is_file() and p.stat().st_size)]
    checkpoints = complete_checkpoints(run_dir)
    if checkpoints:
        outputs.append(str(checkpoints[-1]))
    key = "rollout/accuracy" if config.train.mode == "online" else "loss"  # NFT's loss is 0 at ratio 1
    values = [m[key] for m in history if key in m and (key != "loss" or not m.get("skipped"))]
    loss = f"{key} {values[0]:.4f} -> {values[-1]:.4f}" if values else "no update"
    state = "complete" if finished else f"stopped early (train.stop_after_steps={config.train.stop_after_steps})"
    print(f"run {run_dir} {state}: {len(history)} steps this invocation, {loss}, "
          f"{time.perf_counter() - start:.0f} s; outputs: {', '.join(outputs)}", flush=True)
    if finished:
        (run_dir / COMPLETE).write_text(json.dumps({"steps": config.train.steps, "outputs": outputs}) + "\n")


def add_reference_sums(policy, sequences: list[Sequence], env: DistEnv, budget: int, pad_token_id: int) -> None:
    """DPO's reference: the initial policy's summed response log-prob of every sequence, scored once (no grad,
    fused head) before the first update and kept as the per-sequence field `ref_logp_sum`."""
    start = time.perf_counter()
    for seq, logp in zip(sequences, sequence_logprobs(policy, sequences, env, budget, pad_token_id)):
        seq.fields["ref_logp_sum"] = float(sum(logp))
    log.info("reference log-probs of %d sequences in %.1f s", len(sequences), time.perf_counter() - start)


def resume_candidates(config: Config) -> tuple[list[Path], bool]:
    """Checkpoints to try, oldest first, and whether a damaged one is set aside for the one before it
    (resume=auto) or stops the run (an explicit checkpoint.resume directory is never second-guessed)."""
    if config.checkpoint.resume == "never":
        return [], False
    if config.checkpoint.resume != "auto":
        return [Path(config.checkpoint.resume)], False
    found = complete_checkpoints(config.run_dir)
    if not found and damaged_checkpoints(config.run_dir):  # never restart from step 0 behind the user's back
        raise CheckpointDamaged(f"{config.run_dir} holds only damaged checkpoints "
                                f"({', '.join(p.name for p in damaged_checkpoints(config.run_dir))}); "
                                "set checkpoint.resume=never to start over")
    return found, True


def resume_path(config: Config) -> Path | None:
    """The checkpoint a resume tries first (None: a fresh start)."""
    candidates, _ = resume_candidates(config)
    return candidates[-1] if candidates else None


def resume(config: Config, trainer: Trainer, extras: dict | None = None) -> tuple[Path, dict] | None:
    """Load the newest intact checkpoint into `trainer`: (its path, the saved data position), or None."""
    candidates, set_aside = resume_candidates(config)
    if config.checkpoint.resume == "auto" and trainer.env.is_main:
        warn_incomplete(config.run_dir, candidates[-1] if candidates else None)
    return resume_newest(candidates, trainer, extras, set_aside)


def warn_incomplete(run_dir: str, newest: Path | None) -> None:
    """Name the steps a resume discards: step directories above the newest complete checkpoint that have no
    manifest (never silently trained again)."""
    lost = incomplete_newer(run_dir, newest)
    if lost:
        log.warning("%s %s no %s (a save that never finished, or a deleted manifest): not resumable; resuming from "
                    "%s discards what was trained up to step %d", ", ".join(p.name for p in lost),
                    "has" if len(lost) == 1 else "have", MANIFEST, newest.name if newest else "step 0",
                    step_of(lost[-1]))


def train_loop(config: Config, trainer: Trainer, stream: BatchStream, env: DistEnv, tokenizer=None) -> list[dict]:
    end = config.train.steps
    if config.train.stop_after_steps:
        end = min(end, trainer.steps_done + config.train.stop_after_steps)
    tracker = Tracker(config, env.is_main, trainer.steps_done)
    history, saved_at = [], trainer.steps_done

    def save() -> None:
        save_checkpoint(config.run_dir, trainer, stream.state_dict(), config.checkpoint.keep_last,
                        tokenizer=tokenizer, run_config=to_yaml(config))

    while trainer.steps_done < end:
        metrics = trainer.step(stream.next_batch())
        history.append(metrics)
        tracker.log(metrics)
        if config.checkpoint.every and trainer.steps_done % config.checkpoint.every == 0:
            save()
            saved_at = trainer.steps_done
    if saved_at != trainer.steps_done:
        save()
    tracker.close(plot=config.log.plot and trainer.steps_done >= config.train.steps)
    return history


if __name__ == "__main__":
    main()
