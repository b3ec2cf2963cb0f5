"""Checkpoints: sharded, verified, crash-safe and resumable at any world size (torch.distributed.checkpoint), plus
HF export.

Layout under `<run_dir>/checkpoints/`, named by the run's own step (offline: optimizer steps; online: rollout steps):
    step_00000006/          a complete checkpoint: DCP shards, .metadata and, written last, manifest.json (the size
                            and SHA-256 of every other file); only directories with a manifest are ever resumed
    .tmp-step_00000009/     a save in progress, renamed to step_... once every rank has written and the manifest is in
    .old-step_00000006/     a complete checkpoint moved aside while the same step is saved again; removed once the
                            replacement is in place, moved back if a crash came in between
    .bad-step_00000007/     a checkpoint that failed verification or loading, set aside (never deleted)
Each checkpoint also carries what an export needs without the run's files (`CHECKPOINT_MODEL`: the model's
Hugging Face config.json and the tokenizer; `CHECKPOINT_CONFIG`: the run's config), so a copied checkpoint exports
and evaluates from anywhere.
    .trash-.../             a directory being deleted (renamed first, so that a half-deleted one is never listed)
So at every instant of a save the newest complete checkpoint on disk is either the previous one or the new one.
On resume the manifest is checked first (every rank hashes its share of the files); a damaged checkpoint is set
aside with a warning and the previous complete one is loaded instead.

Everything that must resume lives in one dict: model and optimizer shards (DTensors, so DCP reshards them to a new
world size), and `train_state` (run step, optimizer steps, skipped steps, scheduler, data position, every rank's RNG
states) serialised into one blob.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np

try:
    from numpy._core.multiarray import _reconstruct  # numpy 2; numpy 1 names it numpy.core
except ImportError:  # pragma: no cover
    from numpy.core.multiarray import _reconstruct
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from transformers import AutoModelForCausalLM

from twofold.engine.train.model import DTYPES, PolicyModel
from twofold.engine.train.trainer import Trainer

log = logging.getLogger("twofold")
MANIFEST = "manifest.json"
PREFIX = "step_"
TMP_PREFIX, OLD_PREFIX, BAD_PREFIX, TRASH_PREFIX = ".tmp-", ".old-", ".bad-", ".trash-"
CHECKPOINT_MODEL = "model"
"""Subdirectory of a checkpoint: the architecture (Hugging Face config.json) and the tokenizer of the run."""
CHECKPOINT_CONFIG = "config.yaml"
"""The run's resolved config, as <run_dir>/config.yaml."""
EXPORT_MARKER = "twofold_export.json"
"""Written into every Hugging Face export: a later export may replace a directory that holds it."""


class CheckpointDamaged(RuntimeError):
    """A checkpoint whose files do not match its manifest, or that DCP / torch.load could not read."""


class CheckpointRefused(RuntimeError):
    """A checkpoint holding a pickled object that twofold never writes: code that loading it would run. Refused
    before anything in it runs (docs/security.md); never set aside quietly, since its manifest matched."""


class FileOps:
    """Every change a save makes to the file system, in order of use (fault-injection tests wrap each one)."""

    def make_dir(self, path: Path) -> None:
        path.mkdir(parents=True)

    def save_shards(self, state: dict, path: Path) -> None:
        dcp.save(state, checkpoint_id=str(path))  # DCP fsyncs every file it writes

    def write_file(self, path: Path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def rename(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)
        _fsync_dir(dst.parent)

    def delete_tree(self, path: Path) -> None:
        shutil.rmtree(path)


FILES = FileOps()


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(path: Path) -> int:
    return int(path.name.removeprefix(OLD_PREFIX).removeprefix(PREFIX))


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints with a manifest, oldest first: `step_*`, and a `.old-step_*` whose replacement never arrived.
    (Whether their files match the manifest is checked when one is loaded.)"""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if (p / MANIFEST).is_file()]
    found += [p for p in root.glob(f"{OLD_PREFIX}{PREFIX}*")
              if (p / MANIFEST).is_file() and not (root / p.name.removeprefix(OLD_PREFIX) / MANIFEST).is_file()]
    return sorted(found, key=step_of)


def damaged_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    return sorted(root.glob(f"{BAD_PREFIX}*")) if root.is_dir() else []


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


# ---- save ------------------------------------------------------------------------------------------------------

def save_checkpoint(run_dir: str | Path, trainer: Trainer, data_state: dict, keep_last: int,
                    extras: dict | None = None, step: int | None = None, tokenizer=None,
                    run_config: str | None = None) -> Path:
    """Collective: every rank writes its shards into a temporary directory; rank 0 adds the model's config and
    `tokenizer` (CHECKPOINT_MODEL), `run_config` (YAML text, CHECKPOINT_CONFIG) and the manifest, publishes it as
    `step_<step>` (default: the optimizer step) and prunes old ones, never removing a complete checkpoint before its
    replacement is in place."""
    step = trainer.steps_done if step is None else step
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp, aside = root / f"{TMP_PREFIX}{final.name}", root / f"{OLD_PREFIX}{final.name}"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        _tidy(root)
        FILES.make_dir(tmp)
    dist.barrier()
    rng = [None] * dist.get_world_size()
    dist.all_gather_object(rng, _rng_state())
    blob = io.BytesIO()
    torch.save({"run_step": step, "step": trainer.steps_done, "skipped": trainer.skipped_steps, "data": data_state,
                "rng": rng, "scheduler": trainer.scheduler.state_dict()}, blob)
    FILES.save_shards({**_state_dicts(trainer, extras), "train_state": blob}, tmp)
    if dist.get_rank() == 0:
        write_export_files(tmp, trainer.policy, tokenizer, run_config)
    dist.barrier()
    files = _checksums(tmp)
    if dist.get_rank() == 0:
        FILES.write_file(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=1).encode())
        if (final / MANIFEST).is_file():  # saving the same step again: keep the old one until the new one is in
            FILES.rename(final, aside)
        elif final.exists():
            _remove(final)  # a directory without a manifest is no checkpoint
        FILES.rename(tmp, final)
        if aside.exists():
            _remove(aside)
        # the one just written is kept whatever its number (a run resumed from an older checkpoint saves below
        # newer ones); keep_last - 1 of the others, newest first
        others = [p for p in complete_checkpoints(run_dir) if p != final]
        for old in others[:max(0, len(others) - (keep_last - 1))]:
            _remove(old)
    dist.barrier()
    return final


def write_export_files(directory: Path, policy: PolicyModel, tokenizer, run_config: str | None) -> None:
    """What an export of this checkpoint reads besides the shards: the architecture, the tokenizer, the config."""
    model_dir = directory / CHECKPOINT_MODEL
    policy.causal_lm.config.save_pretrained(model_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(model_dir)
    if run_config is not None:
        (directory / CHECKPOINT_CONFIG).write_text(run_config)


def _tidy(root: Path) -> None:
    """Rank 0, before a save: finish what a crash interrupted. Unfinished saves and deletions go; a checkpoint moved
    aside for a re-save comes back when its replacement never arrived."""
    for stale in [*root.glob(f"{TMP_PREFIX}*"), *root.glob(f"{TRASH_PREFIX}*")]:
        FILES.delete_tree(stale)
    for aside in root.glob(f"{OLD_PREFIX}*"):
        final = root / aside.name.removeprefix(OLD_PREFIX)
        if (final / MANIFEST).is_file():
            _remove(aside)
        else:
            if final.exists():
                _remove(final)
            FILES.rename(aside, final)


def _remove(path: Path) -> None:
    """Rename first, then delete: a kill halfway through leaves a `.trash-` directory, never a half checkpoint."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}")
    FILES.rename(path, trash)
    FILES.delete_tree(trash)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _checksums(directory: Path) -> dict[str, dict]:
    """Collective: {file name: {size, sha256}} of every file in `directory`, each rank hashing its share. (The
    export files under CHECKPOINT_MODEL/ are not listed: a manifest names top-level files only, and those are JSON
    and tokenizer files that only an export reads, with transformers' loaders, never code.)"""
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {name: {"size": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
            for name in names[rank::world]}
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return {name: part[name] for part in parts for name in part}


# ---- load ------------------------------------------------------------------------------------------------------

# What DCP's .metadata pickle may name: its own metadata dataclasses and enums, the file reader's storage record,
# tensor shapes, dtypes and layouts, and the path DCP records of where it was saved. Nothing here runs code when
# rebuilt (constructors of plain records), so a pickle naming anything else is refused.
_DCP_GLOBALS = {("torch.distributed.checkpoint.metadata", name) for name, obj in vars(dcp_metadata).items()
                if isinstance(obj, type) and obj.__module__ == dcp_metadata.__name__}
_DCP_GLOBALS |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                 ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
_DCP_GLOBALS |= {("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")}
# train_state: torch.load(weights_only=True) admits tensors and plain containers; numpy's RNG state also needs these
_TRAIN_STATE_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, _reconstruct]


def _refuse(path: Path, what: str, name: str) -> CheckpointRefused:
    return CheckpointRefused(
        f"refusing to load checkpoint {path}: its {what} names {name}, which no checkpoint twofold writes holds "
        "(loading it would run code). Nothing in it was run. If you did not put it there, the directory was "
        "tampered with: move it away, or set checkpoint.resume=never (docs/security.md)")


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                               torch.dtype)):
            return super().find_class(module, name)
        raise _refuse(self.path, "DCP .metadata", f"{module}.{name}")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with its one pickle.load (of .metadata) replaced by the allow-list above; the shards
    themselves are raw tensor bytes (and DCP reads any serialised tensor with weights_only=True)."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream, Path(self.path)).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise _refuse(Path(self.path), "DCP .metadata", type(metadata).__name__)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_shards(state: dict, path: str | Path, **kwargs) -> None:
    """`dcp.load` of `state` from `path` through `SafeReader`. The metadata is read first, outside DCP, so that a
    planted pickle raises CheckpointRefused itself (DCP turns a reader's errors into strings)."""
    reader = SafeReader(str(path))
    reader.read_metadata()
    dcp.load(state, storage_reader=reader, **kwargs)


def load_train_state(blob: io.BytesIO, path: Path) -> dict:
    """The train_state blob through torch.load(weights_only=True): tensors, numbers, strings and containers only."""
    blob.seek(0)
    try:
        with torch.serialization.safe_globals(_TRAIN_STATE_GLOBALS):
            return torch.load(blob, weights_only=True)
    except pickle.UnpicklingError as err:
        blob.seek(0)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(blob)
        names = [name for name in unsafe if name not in {f"{g.__module__}.{g.__qualname__}"
                                                         for g in _TRAIN_STATE_GLOBALS}]
        raise _refuse(path, "train_state", ", ".join(names) or str(err).splitlines()[0]) from None

def verify_checkpoint(path: Path) -> str | None:
    """Collective: what is wrong with a checkpoint (None: every file matches its manifest)."""
    problem = None
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        problem = _malformed(files, path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        problem = f"unreadable {MANIFEST} ({type(err).__name__}: {err})"
    if problem:
        files = {}
    rank, world = dist.get_rank(), dist.get_world_size()
    for name in sorted(files)[rank::world]:
        if problem:
            break
        file, expected = path / name, files[name]
        if not file.is_file():
            problem = f"{name} is missing"
        elif file.stat().st_size != expected["size"]:
            problem = f"{name} has {file.stat().st_size} bytes, the manifest says {expected['size']}"
        elif _sha256(file) != expected["sha256"]:
            problem = f"{name} does not match its SHA-256 in the manifest"
    problems = [None] * world
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p), None)


def _malformed(files, path: Path) -> str | None:
    """What is wrong with a manifest's `files` ({name: {size, sha256}} covering every file of the checkpoint)."""
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()):
        return f"malformed {MANIFEST}: 'files' must map each file name to its size and sha256, got " \
               f"{type(files).__name__}"
    unlisted = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != MANIFEST and p.name not in files)
    if unlisted:
        return f"{', '.join(unlisted)} not in {MANIFEST} (its contents are not vouched for)"
    if any(Path(name).name != name for name in files):
        return f"malformed {MANIFEST}: a file name with a directory in it"
    return None


def incomplete_newer(run_dir: str | Path, newest: Path | None) -> list[Path]:
    """`step_*` directories without a manifest above the newest complete checkpoint: steps a resume discards."""
    root = checkpoint_dir(run_dir)
    floor = step_of(newest) if newest is not None else -1
    return sorted((p for p in root.glob(f"{PREFIX}*") if p.is_dir() and not (p / MANIFEST).is_file()
                   and step_of(p) > floor), key=step_of) if root.is_dir() else []


def load_checkpoint(path: str | Path, trainer: Trainer, extras: dict | None = None) -> dict:
    """Restore model, optimizer, scheduler, counters and RNG into `trainer` (and `extras`, as saved) at any world
    size; returns the data position that was saved. Raises CheckpointDamaged when the files do not match the
    manifest or cannot be read."""
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem:
        raise CheckpointDamaged(problem)
    state = {**_state_dicts(trainer, extras), "train_state": io.BytesIO()}
    try:
        load_shards(state, path)
        train_state = load_train_state(state["train_state"], path)  # DCP may hand back a new buffer, not fill ours
    except CheckpointRefused:
        raise
    except Exception as err:  # noqa: BLE001  any failure to read the files means this checkpoint is unusable
        raise CheckpointDamaged(f"{type(err).__name__}: {str(err)[:300]}") from err
    set_state_dict(trainer.policy, trainer.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    for name, (module, optimizer) in (extras or {}).items():
        set_state_dict(module, optimizer, model_state_dict=state[f"{name}.model"],
                       optim_state_dict=state[f"{name}.optimizer"])
    trainer.scheduler.load_state_dict(train_state["scheduler"])
    trainer.steps_done, trainer.skipped_steps = train_state["step"], train_state["skipped"]
    rank = dist.get_rank()
    if rank < len(train_state["rng"]):  # a rank that did not exist at save time keeps its seeded RNG
        _set_rng_state(train_state["rng"][rank])
    return train_state["data"]


def resume_newest(candidates: list[Path], trainer: Trainer, extras: dict | None = None,
                  set_aside: bool = True) -> tuple[Path, dict] | None:
    """Load the newest of `candidates` (oldest first) that is intact: (its path, its data position), or None when
    there are none. A damaged one is set aside as `.bad-step_*` (when `set_aside`; else the error is raised) with a
    warning, and the previous one is tried."""
    bad = []
    for path in reversed(candidates):
        try:
            return path, load_checkpoint(path, trainer, extras)
        except CheckpointDamaged as err:
            if not set_aside:
                raise CheckpointDamaged(f"checkpoint {path} is damaged: {err}") from None
            moved = path.with_name(f"{BAD_PREFIX}{path.name.removeprefix(OLD_PREFIX)}")
            if dist.get_rank() == 0:
                while moved.exists():  # one set aside before: keep both
                    moved = moved.with_name(moved.name + "+")
                log.warning("checkpoint %s is damaged (%s): set aside as %s; trying the previous one", path, err,
                            moved.name)
                FILES.rename(path, moved)
            dist.barrier()
            bad.append(moved)
    if bad:
        raise CheckpointDamaged(f"no intact checkpoint left; the damaged ones were set aside as "
                                f"{', '.join(str(p) for p in bad)}; set checkpoint.resume=never to start over")
    return None


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
        (tmp / EXPORT_MARKER).write_text(json.dumps({"dtype": dtype}) + "\n")
        old = out_dir.with_name(OLD_PREFIX + out_dir.name)
        if out_dir.exists():  # the previous export stays until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            FILES.rename(out_dir, old)
        FILES.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return out_dir
