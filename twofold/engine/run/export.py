"""Any checkpoint -> a Hugging Face directory (safetensors, config, tokenizer).

    python -m twofold.engine.run.export runs/x/checkpoints/step_00000040 out/x-step40      a training checkpoint
    python -m twofold.engine.run.export runs/x/hf out/x-fp32 --dtype float32                an HF directory, re-saved

A `step_*` checkpoint holds sharded weights (DCP) and, in `model/`, the model's Hugging Face config and the
tokenizer: the model is rebuilt from those (a checkpoint copied anywhere exports; an older one without `model/` is
rebuilt from its run's `config.yaml` beside `checkpoints/`), the checkpoint's model weights are loaded into it, and
it is written as the end of a run writes `<run_dir>/hf`. The result loads with
`AutoModelForCausalLM.from_pretrained`, `AutoTokenizer.from_pretrained` and vLLM.

The output directory is replaced only when it is empty, absent, or an earlier export (it holds the
`EXPORT_MARKER` every export writes); any other directory is refused unless `--overwrite` is given, and a directory
that holds the checkpoint itself is always refused.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from twofold.engine.train.checkpoint import (CHECKPOINT_CONFIG, CHECKPOINT_MODEL, EXPORT_MARKER, CheckpointRefused,
                                             export_hf, load_shards)
from twofold.engine.run.config import load_config
from twofold.engine.run.schema import Config
from twofold.engine.train.distributed import init_distributed, shutdown_distributed
from twofold.engine.data.hub import resolve_model
from twofold.engine.data.tokenizer import load_tokenizer
from twofold.engine.train.model import DTYPES, PolicyModel, build_policy

log = logging.getLogger("twofold")


def is_training_checkpoint(path: Path) -> bool:
    return (path / ".metadata").is_file()


def run_config_path(checkpoint: Path) -> Path:
    """The config of the run that wrote `checkpoint`: its own copy (CHECKPOINT_CONFIG), else, for checkpoints
    written before they carried one, <run_dir>/config.yaml beside checkpoints/."""
    own = checkpoint / CHECKPOINT_CONFIG
    return own if own.is_file() else checkpoint.resolve().parent.parent / "config.yaml"


def run_config(checkpoint: Path) -> Config:
    path = run_config_path(checkpoint)
    if not path.is_file():
        raise ValueError(f"{checkpoint} is a training checkpoint without its own {CHECKPOINT_MODEL}/ (written before "
                         f"checkpoints carried one), and its run's config {path} is missing: it names the model "
                         "architecture the shards belong to")
    return load_config(path, ["checkpoint.resume=never"])


def check_out_dir(checkpoint: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace a directory that an export did not write (a run directory, a model, anything else)."""
    source, target = checkpoint.resolve(), out_dir.resolve()
    if target == source or target in source.parents:
        raise ValueError(f"out_dir {out_dir} holds the checkpoint {checkpoint} being exported: choose an out_dir "
                         "outside it")
    if not target.exists():
        return
    if not target.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a directory")
    if any(target.iterdir()) and not (target / EXPORT_MARKER).is_file() and not overwrite:
        held = ", ".join(sorted(p.name for p in target.iterdir())[:5])
        raise ValueError(f"out_dir {out_dir} is not empty ({held}) and no export wrote it: exporting would replace "
                         "it. Choose a new directory, or pass --overwrite to replace it")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: str = "bfloat16",
                      overwrite: bool = False) -> Path:
    """Write `checkpoint` (a step_* directory or an HF directory) to `out_dir` as an HF directory, replacing an
    earlier export there (any other non-empty directory only with `overwrite`)."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    check_out_dir(checkpoint, out_dir, overwrite)
    if is_training_checkpoint(checkpoint):
        return _export_training_checkpoint(checkpoint, out_dir, dtype)
    if not (checkpoint / "config.json").is_file():
        raise ValueError(f"{checkpoint} is neither a training checkpoint (step_*/ with .metadata) nor a Hugging "
                         "Face model directory (config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=DTYPES[dtype])
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out_dir)
    (out_dir / EXPORT_MARKER).write_text(json.dumps({"source": str(checkpoint.resolve()), "dtype": dtype}) + "\n")
    return out_dir


def _export_training_checkpoint(checkpoint: Path, out_dir: Path, dtype: str) -> Path:
    created = not dist.is_initialized()
    env = init_distributed()
    try:
        policy, tokenizer = _checkpoint_model(checkpoint, env)
        state = {"model": get_model_state_dict(policy)}
        load_shards(state, checkpoint)  # the model shards only (optimizer state stays on disk); never a pickle
        set_model_state_dict(policy, state["model"])
        return export_hf(policy, tokenizer, out_dir, dtype)
    finally:
        if created:
            shutdown_distributed()


def _checkpoint_model(checkpoint: Path, env):
    """(an fp32 policy of the checkpoint's architecture, its tokenizer): from the checkpoint's own files, or for an
    older checkpoint from its run's config (model.path and the tokenizer must still be where the run read them)."""
    own = checkpoint / CHECKPOINT_MODEL
    if (own / "config.json").is_file():
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        causal_lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(own), dtype=torch.float32)
        return PolicyModel(causal_lm), AutoTokenizer.from_pretrained(own)
    config = run_config(checkpoint)
    resolve_model(config.model)
    return build_policy(config.model, env, seed=config.train.seed), load_tokenizer(config)


def main(argv: list[str] | None = None) -> int:
    """The command; returns its exit status (0: exported), which the console script passes to sys.exit."""
    parser = argparse.ArgumentParser(prog="python -m twofold.engine.run.export", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="<run_dir>/checkpoints/step_XXXXXXXX or a Hugging Face model directory")
    parser.add_argument("out_dir", help="where the Hugging Face directory is written (an earlier export there is "
                        "replaced; any other non-empty directory needs --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir that no export wrote")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    torch.set_num_threads(min(torch.get_num_threads(), 8))
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.dtype, args.overwrite)
    except (ValueError, CheckpointRefused) as err:
        sys.exit(f"error: {err}")
    print(f"exported {args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
