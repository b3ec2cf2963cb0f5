"""Hub ids for `model.path` / `model.tokenizer`: resolved to a directory of the local Hugging Face cache.

A local directory is used as it is. Anything else is a Hub id: the snapshot in the HF cache (`HF_HOME` /
`HF_HUB_CACHE`, laid out as `huggingface_hub` lays it out) is used, and fetched first when it is missing and the
Hub can be reached. Offline (`HF_HUB_OFFLINE=1`, or no network) and absent, the error says how to fetch it.
Under torchrun rank 0 resolves (and downloads) first; the other ranks then read the cache only.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
"""What a causal LM needs (config, weights, tokenizer); never the .bin / .pth / .gguf copies some repos hold."""


def offline() -> bool:
    from huggingface_hub import constants
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_model_path(path: str, key: str = "model.path", local_files_only: bool = False) -> str:
    """The local directory for `path`: itself when it is a directory, else the cached snapshot of a Hub id."""
    if not path or Path(path).is_dir():
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError
    only_local = local_files_only or offline()
    try:
        return snapshot_download(path, allow_patterns=MODEL_FILES, local_files_only=only_local,
                                 cache_dir=constants.HF_HUB_CACHE)
    except HFValidationError:
        raise ValueError(f"{key} {path!r} is neither a local directory nor a Hub id (owner/name)") from None
    except Exception as err:  # noqa: BLE001  offline, no network, unknown repo, gated repo: one clear message
        where = "offline (HF_HUB_OFFLINE=1)" if only_local else f"the Hub did not serve it ({type(err).__name__})"
        raise ValueError(
            f"{key} {path!r} is not a local directory and not in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"{where}. Fetch it where there is network with `hf download {path}` (older huggingface_hub: "
            f"`huggingface-cli download {path}`) into that cache, or set {key} to a local directory") from None


def resolve_model(model_cfg) -> None:
    """Replace Hub ids in `model.path` / `model.tokenizer` by their cache directories. Under torchrun rank 0 goes
    first (it may download) and tells the others whether it worked; they then find the snapshot in the cache
    (another node with its own cache fetches its copy)."""
    def resolve() -> None:
        for key in ("path", "tokenizer"):
            setattr(model_cfg, key, resolve_model_path(getattr(model_cfg, key), f"model.{key}"))

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        resolve()
        return
    outcome: list = [None]
    if dist.get_rank() == 0:
        try:
            resolve()
        except ValueError as err:
            outcome = [err]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise outcome[0]
    if dist.get_rank() != 0:
        resolve()
