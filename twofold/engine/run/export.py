"""Any checkpoint -> a Hugging Face directory (safetensors, config, tokenizer).

    python -m twofold.engine.run.export runs/x/checkpoints/step_00000040 out/x-step40      a training checkpoint
    python -m twofold.engine.run.export runs/x/hf out/x-fp32 --dtype float32                an HF directory, re-saved

A `step_*` checkpoint holds sharded weights (DCP) and no architecture: the model is rebuilt from the run's
`config.yaml` (beside `checkpoints/`), the checkpoint's model weights are loaded into it, and it is written as
the end of a run writes `<run_dir>/hf`. The result loads with `AutoModelForCausalLM.from_pretrained`,
`AutoTokenizer.from_pretrained` and vLLM.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from twofold.engine.train.checkpoint import CheckpointRefused, export_hf, load_shards
from twofold.engine.run.config import Config, load_config
from twofold.engine.train.distributed import init_distributed, shutdown_distributed
from twofold.engine.data.hub import resolve_model
from twofold.engine.data.tokenizer import load_tokenizer
from twofold.engine.train.model import DTYPES, build_policy

log = logging.getLogger("twofold")


def is_training_checkpoint(path: Path) -> bool:
    return (path / ".metadata").is_file()


def run_config(checkpoint: Path) -> Config:
    """The config of the run that wrote `checkpoint` (<run_dir>/checkpoints/step_*/ -> <run_dir>/config.yaml)."""
    path = checkpoint.resolve().parent.parent / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{checkpoint} is a training checkpoint, but its run's config {path} is missing: it names "
                         "the model architecture the shards belong to")
    return load_config(path, ["checkpoint.resume=never"])


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Write `checkpoint` (a step_* directory or an HF directory) to `out_dir` as an HF directory."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if is_training_checkpoint(checkpoint):
        return _export_training_checkpoint(checkpoint, out_dir, dtype)
    if not (checkpoint / "config.json").is_file():
        raise ValueError(f"{checkpoint} is neither a training checkpoint (step_*/ with .metadata) nor a Hugging "
                         "Face model directory (config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=DTYPES[dtype])
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out_dir)
    return out_dir


def _export_training_checkpoint(checkpoint: Path, out_dir: Path, dtype: str) -> Path:
    config = run_config(checkpoint)
    created = not dist.is_initialized()
    env = init_distributed()
    try:
        resolve_model(config.model)
        policy = build_policy(config.model, env, seed=config.train.seed)
        state = {"model": get_model_state_dict(policy)}
        load_shards(state, checkpoint)  # the model shards only (optimizer state stays on disk); never a pickle
        set_model_state_dict(policy, state["model"])
        return export_hf(policy, load_tokenizer(config), out_dir, dtype)
    finally:
        if created:
            shutdown_distributed()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m twofold.engine.run.export", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="<run_dir>/checkpoints/step_XXXXXXXX or a Hugging Face model directory")
    parser.add_argument("out_dir", help="where the Hugging Face directory is written (replaced if it exists)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    torch.set_num_threads(min(torch.get_num_threads(), 8))
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.dtype)
    except (ValueError, CheckpointRefused) as err:
        sys.exit(f"error: {err}")
    print(f"exported {args.checkpoint} to {out}")
    return out


if __name__ == "__main__":
    main()
