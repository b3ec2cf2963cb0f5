"""Checkpoints: sharded, atomic and resumable at any world size (torch.distributed.checkpoint), plus HF export.

Layout under `<run_dir>/checkpoints/`:
    step_00000006/          complete checkpoints (DCP shards + .metadata); only these are ever resumed
    .tmp-step_00000009/     a save in progress: renamed to step_... only after every rank finished writing,
                            so a crash mid-save leaves the previous checkpoint as the newest complete one.
Everything that must resume lives in one dict (`STATE_KEYS`): model and optimizer shards (DTensors, so DCP
reshards them to a new world size), and `train_state` (step, skipped steps, scheduler, data position, every rank's
RNG states) serialised into one blob.
"""
from __future__ import annotations

import io
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from transformers import AutoModelForCausalLM

from twofold.engine.model import DTYPES, PolicyModel
from twofold.engine.trainer import Trainer

STATE_KEYS = ("model", "optimizer", "train_state")
TMP_PREFIX = ".tmp-"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (in-progress `.tmp-` directories are never listed)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / ".metadata").is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _state_dicts(trainer: Trainer, extras: dict | None) -> dict:
    """Model and optimizer state of the trainer, plus `extras` {name: (module, optimizer)} (OREAL's token RM)."""
    model_sd, optim_sd = get_state_dict(trainer.policy, trainer.optimizer)
    out = {"model": model_sd, "optimizer": optim_sd}
    for name, (module, optimizer) in (extras or {}).items():
        out[f"{name}.model"], out[f"{name}.optimizer"] = get_state_dict(module, optimizer)
    return out


def save_checkpoint(run_dir: str | Path, trainer: Trainer, data_state: dict, keep_last: int,
                    extras: dict | None = None) -> Path:
    """Collective: every rank writes its shards; rank 0 publishes the directory and prunes old ones."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{trainer.steps_done:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if dist.get_rank() == 0:
        for stale in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    dist.barrier()
    rng = [None] * dist.get_world_size()
    dist.all_gather_object(rng, _rng_state())
    blob = io.BytesIO()
    torch.save({"step": trainer.steps_done, "skipped": trainer.skipped_steps, "data": data_state, "rng": rng,
                "scheduler": trainer.scheduler.state_dict()}, blob)
    dcp.save({**_state_dicts(trainer, extras), "train_state": blob}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():  # re-saving the same step (e.g. after a resume with nothing left to do)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        # the one just written is kept whatever its number (a run resumed from an older checkpoint saves below
        # newer ones); keep_last - 1 of the others, newest first
        others = [p for p in complete_checkpoints(run_dir) if p != final]
        for old in others[:max(0, len(others) - (keep_last - 1))]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, trainer: Trainer, extras: dict | None = None) -> dict:
    """Restore model, optimizer, scheduler, counters and RNG into `trainer` (and `extras`, as saved) at any world
    size; returns the data position that was saved."""
    state = {**_state_dicts(trainer, extras), "train_state": io.BytesIO()}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(trainer.policy, trainer.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    for name, (module, optimizer) in (extras or {}).items():
        set_state_dict(module, optimizer, model_state_dict=state[f"{name}.model"],
                       optim_state_dict=state[f"{name}.optimizer"])
    blob = state["train_state"]  # DCP may hand back a new buffer rather than fill ours
    blob.seek(0)
    train_state = torch.load(blob, weights_only=False)
    trainer.scheduler.load_state_dict(train_state["scheduler"])
    trainer.steps_done, trainer.skipped_steps = train_state["step"], train_state["skipped"]
    rank = dist.get_rank()
    if rank < len(train_state["rng"]):  # a rank that did not exist at save time keeps its seeded RNG
        _set_rng_state(train_state["rng"][rank])
    return train_state["data"]


def export_hf(policy: PolicyModel, tokenizer, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Collective: gather the full weights to rank 0 and write safetensors + config + tokenizer, atomically.
    The result loads with `AutoModelForCausalLM.from_pretrained` and vLLM's `LLM(model=out_dir)`."""
    out_dir = Path(out_dir)
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        tmp = out_dir.with_name(TMP_PREFIX + out_dir.name)
        shutil.rmtree(tmp, ignore_errors=True)
        config = policy.causal_lm.config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
        weights = {k.removeprefix("causal_lm."): v.to(DTYPES[dtype]) for k, v in full.items()}
        model.load_state_dict(weights, assign=True)
        model.tie_weights()  # assign=True replaced the shared tensor by two; re-tie so the head is saved once
        model.config.use_cache = True  # training turned the KV cache off; generation wants it
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    dist.barrier()
    return out_dir
