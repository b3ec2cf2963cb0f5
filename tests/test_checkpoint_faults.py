"""Fault injection into real checkpoints (FSDP2 + DCP on CPU): a kill before, or in the middle of, every file
operation of a save and of a re-save of the same step, a truncated shard and a flipped bit. After each, a new
invocation resumes from the newest intact step and ends with exactly the metrics of an uninterrupted run.

The kill is simulated in-process: the save's file operations (`checkpoint.FILES`) are wrapped so that the n-th one
raises a BaseException before it runs (or after doing half of its work), which unwinds the run as a SIGKILL would
leave the disk: nothing after that operation happens."""
import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from twofold.engine.train.checkpoint import FILES, MANIFEST, CheckpointDamaged, complete_checkpoints, step_of
from twofold.engine.run.config import load_config
from twofold.engine.run.tracking import read_metrics
from twofold.engine.run.train import run

REPO = Path(__file__).resolve().parents[1]
BASE = ["model.preset=tiny-qwen2", "model.dtype=float32", f"data.path={REPO / 'configs/data/tiny_arith.jsonl'}",
        "data.batch_size=8", "data.max_tokens_per_microbatch=64", "optim.lr=3e-3", "optim.warmup_steps=1",
        "optim.schedule=cosine", "train.steps=3", "checkpoint.every=0", "checkpoint.export_hf=false",
        "log.progress_bar=false", "log.plot=false"]
# The file operations of a save, in order: a first save of step 2 with keep_last=1 (the previous checkpoint is
# pruned), and a save of step 2 again over a complete step_2 (it is moved aside until the new one is in place).
FRESH_SAVE = ["make_dir", "save_shards", "write_file", "rename", "rename", "delete_tree"]
RE_SAVE = ["make_dir", "save_shards", "write_file", "rename", "rename", "rename", "delete_tree"]
PUBLISHED = {"fresh": 4, "again": 5}  # index of the operation after which the new step_2 is in place
TORN = ("save_shards", "write_file", "delete_tree")  # operations that can be cut halfway (a rename cannot)


class Kill(BaseException):
    """What a SIGKILL does to the run: everything stops here (no except clause catches it)."""


def _config(run_dir, *extra):
    return load_config(None, BASE + [f"run_dir={run_dir}", *extra])


def _run(config):
    with contextlib.redirect_stdout(io.StringIO()):  # the resolved config is printed at every start
        return run(config)


def deterministic(row: dict) -> dict:
    return {k: v for k, v in row.items() if not (k.endswith(("_per_s", "_time_s")) or k == "peak_mem_gib")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, one_thread):
    return [deterministic(r) for r in _run(_config(tmp_path_factory.mktemp("straight")))]


@pytest.fixture(scope="module")
def after_one_step(tmp_path_factory, one_thread):
    """A run stopped after step 1: checkpoints/step_00000001 (keep_last=1)."""
    run_dir = tmp_path_factory.mktemp("one")
    _run(_config(run_dir, "train.stop_after_steps=1", "checkpoint.keep_last=1"))
    return run_dir


@pytest.fixture(scope="module")
def after_two_steps(tmp_path_factory, one_thread):
    """A run stopped after step 2 that saved each step: step_00000001 and step_00000002."""
    run_dir = tmp_path_factory.mktemp("two")
    _run(_config(run_dir, "train.stop_after_steps=2", "checkpoint.every=1", "checkpoint.keep_last=2"))
    return run_dir


def _tear(name: str, real, args) -> None:
    """Half of an operation's work, as a kill in its middle leaves it."""
    if name == "save_shards":
        state, path = args
        real(state, path)
        shard = next(path.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif name == "write_file":
        path, data = args
        path.write_bytes(data[: len(data) // 2])
    elif name == "delete_tree":
        (path,) = args
        next(p for p in path.iterdir() if p.is_file()).unlink()


@contextlib.contextmanager
def kill_at(index: int | None, torn: bool = False):
    """Record every file operation of the save; the `index`-th dies before it runs (or halfway when `torn`)."""
    done = []

    def wrap(name, real):
        def operation(*args):
            done.append(name)
            if len(done) - 1 == index:
                if torn:
                    _tear(name, real, args)
                raise Kill(f"killed at {name}")
            return real(*args)
        return operation

    with pytest.MonkeyPatch.context() as patch:
        for name in set(FRESH_SAVE):
            patch.setattr(FILES, name, wrap(name, getattr(FILES, name)))
        yield done


def _interrupted_save(template: Path, run_dir: Path, kind: str, index: int | None, torn: bool) -> list[str]:
    """Copy the template run and train step 2 in a new invocation, killing its save of step 2 at `index`."""
    shutil.copytree(template, run_dir)
    if kind == "fresh":  # step_1 is the newest and only checkpoint; keep_last=1 prunes it after the save
        config = _config(run_dir, "train.stop_after_steps=1", "checkpoint.keep_last=1")
    else:  # step_2 exists: train step 2 again from step_1 and save it again over the complete step_2
        config = _config(run_dir, "train.stop_after_steps=1", "checkpoint.keep_last=2",
                         f"checkpoint.resume={run_dir / 'checkpoints' / 'step_00000001'}")
    with kill_at(index, torn) as done:
        if index is None:
            _run(config)
        else:
            with pytest.raises(Kill):
                _run(config)
    return done


def _resume_and_compare(run_dir: Path, uninterrupted: list[dict], expected_start: int) -> None:
    resumed = _run(_config(run_dir))
    assert [r["step"] for r in resumed] == list(range(expected_start + 1, 4))  # resumed from step expected_start
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # each step once: the rows past the checkpoint were dropped before they were redone
    assert [deterministic(r) for r in read_metrics(run_dir / "metrics.jsonl")] == uninterrupted
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert [n for n in names if n.startswith(".") and not n.startswith(".bad-")] == []  # the next save tidied up
    assert complete_checkpoints(run_dir)[-1].name == "step_00000003"


@pytest.mark.parametrize("kind", ["fresh", "again"])
def test_a_save_makes_its_file_operations_in_the_order_the_kill_tests_assume(kind, after_one_step, after_two_steps,
                                                                             tmp_path, uninterrupted):
    template = after_one_step if kind == "fresh" else after_two_steps
    done = _interrupted_save(template, tmp_path / "run", kind, None, False)
    assert done == (FRESH_SAVE if kind == "fresh" else RE_SAVE)
    _resume_and_compare(tmp_path / "run", uninterrupted, expected_start=2)


KILLS = [(kind, index, torn) for kind, ops in (("fresh", FRESH_SAVE), ("again", RE_SAVE))
         for index, name in enumerate(ops) for torn in (False, True) if not torn or name in TORN]


@pytest.mark.parametrize("kind, index, torn", KILLS,
                         ids=[f"{k}-{i}-{(FRESH_SAVE if k == 'fresh' else RE_SAVE)[i]}{'-torn' if t else ''}"
                              for k, i, t in KILLS])
def test_a_kill_anywhere_in_a_save_resumes_from_the_newest_intact_step(kind, index, torn, after_one_step,
                                                                       after_two_steps, tmp_path, uninterrupted):
    template = after_one_step if kind == "fresh" else after_two_steps
    _interrupted_save(template, tmp_path / "run", kind, index, torn)
    # a re-save never takes the complete step_2 away: it is in place, moved aside, or replaced by the new one
    newest = 2 if kind == "again" or index >= PUBLISHED[kind] else 1
    _resume_and_compare(tmp_path / "run", uninterrupted, expected_start=newest)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # an exponent bit of some weight or moment, as the probe did
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_a_bit], ids=["truncated", "flipped-bit"])
def test_a_damaged_shard_is_set_aside_and_the_previous_checkpoint_resumes(damage, after_two_steps, tmp_path,
                                                                          uninterrupted, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(after_two_steps, run_dir)
    damage(next((run_dir / "checkpoints" / "step_00000002").glob("*.distcp")))
    _resume_and_compare(run_dir, uninterrupted, expected_start=1)
    assert "step_00000002 is damaged" in caplog.text and ".distcp" in caplog.text
    assert (run_dir / "checkpoints" / ".bad-step_00000002").is_dir()  # kept for inspection, never resumed


def test_a_checkpoint_without_its_manifest_is_never_resumed(after_two_steps, tmp_path, uninterrupted):
    """The wedge of the issue: a step directory with .metadata but no shards (and so no manifest)."""
    run_dir = tmp_path / "run"
    shutil.copytree(after_two_steps, run_dir)
    step_2 = run_dir / "checkpoints" / "step_00000002"
    for shard in step_2.glob("*.distcp"):
        shard.unlink()
    (step_2 / MANIFEST).unlink()
    _resume_and_compare(run_dir, uninterrupted, expected_start=1)


def test_an_explicit_damaged_checkpoint_stops_the_run_and_only_damaged_ones_never_restart_it(after_two_steps,
                                                                                             tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(after_two_steps, run_dir)
    for step in ("step_00000001", "step_00000002"):
        _truncate(next((run_dir / "checkpoints" / step).glob("*.distcp")))
    with pytest.raises(CheckpointDamaged, match=r"step_00000002 is damaged: __0_0.distcp has \d+ bytes"):
        _run(_config(run_dir, f"checkpoint.resume={run_dir / 'checkpoints' / 'step_00000002'}"))
    with pytest.raises(CheckpointDamaged, match="no intact checkpoint left"):
        _run(_config(run_dir))
    with pytest.raises(CheckpointDamaged, match="holds only damaged checkpoints"):  # not a silent restart at 0
        _run(_config(run_dir))


# ---- hostile checkpoints: a pickled call planted with a matching manifest is refused, never run ---------------

class Payload:
    """Unpickles as os.system(command): what a planted pickle does to a loader that trusts it."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os
        return os.system, (self.command,)


def _reseal(step: Path) -> None:
    """Rewrite the manifest to match the files as they are now (the manifest proves integrity, not origin)."""
    from twofold.engine.train.checkpoint import _sha256
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(step.iterdir())
             if p.is_file() and p.name != MANIFEST}
    (step / MANIFEST).write_text(json.dumps({"step": step_of(step), "files": files}))


def _plant_in_metadata(step: Path, marker: Path) -> None:
    import pickle
    with open(step / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own checkpoint: safe to load in full here
    metadata.planner_data = Payload(f"touch {marker}")
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    _reseal(step)


def test_a_pickled_call_in_the_dcp_metadata_is_refused_on_resume_and_export(after_two_steps, tmp_path):
    from twofold.engine.train.checkpoint import CheckpointRefused
    from twofold.engine.run.export import export_checkpoint
    run_dir, marker = tmp_path / "run", tmp_path / "ran"
    shutil.copytree(after_two_steps, run_dir)
    step = run_dir / "checkpoints" / "step_00000002"
    _plant_in_metadata(step, marker)
    with pytest.raises(CheckpointRefused, match=r"its DCP \.metadata names posix\.system.*Nothing in it was run"):
        _run(_config(run_dir))
    assert step.is_dir() and not marker.exists()  # not run, and not set aside as if it were merely damaged
    with pytest.raises(CheckpointRefused, match=r"posix\.system"):
        with contextlib.redirect_stdout(io.StringIO()):
            export_checkpoint(step, tmp_path / "out", "float32")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_pickled_call_in_train_state_is_refused(after_one_step, tmp_path):
    """The save itself writes the planted blob (so shards and manifest match); the next resume refuses it."""
    from twofold.engine.train.checkpoint import CheckpointRefused
    run_dir, marker = tmp_path / "run", tmp_path / "ran"
    shutil.copytree(after_one_step, run_dir)
    real = FILES.save_shards

    def planted(state, path):
        blob = io.BytesIO()
        torch.save({"step": 2, "payload": Payload(f"touch {marker}")}, blob)
        return real({**state, "train_state": blob}, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FILES, "save_shards", planted)
        _run(_config(run_dir, "train.stop_after_steps=1"))
    assert not marker.exists()
    with pytest.raises(CheckpointRefused, match=r"its train_state names posix\.system"):
        _run(_config(run_dir))
    assert not marker.exists()


def test_the_dcp_metadata_allow_list_admits_what_dcp_writes(after_two_steps):
    """Every global a real .metadata names is on the list (and nothing else is needed to read it)."""
    import pickle

    from twofold.engine.train.checkpoint import _DCP_GLOBALS, SafeReader
    named = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            named.add((module, name))
            return super().find_class(module, name)

    step = after_two_steps / "checkpoints" / "step_00000002"
    with open(step / ".metadata", "rb") as f:
        expected = Recorder(f).load()
    assert {n for n in named if n[0] != "torch" or n[1] in ("Size",)} <= _DCP_GLOBALS
    assert SafeReader(str(step)).read_metadata().state_dict_metadata == expected.state_dict_metadata


# ---- manifests: a missing one is named with the steps it discards, a malformed one is damage -------------------

def test_a_deleted_manifest_warns_naming_the_steps_the_resume_discards(after_two_steps, tmp_path, uninterrupted,
                                                                      caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(after_two_steps, run_dir)
    (run_dir / "checkpoints" / "step_00000002" / MANIFEST).unlink()
    _resume_and_compare(run_dir, uninterrupted, expected_start=1)
    assert ("step_00000002 has no manifest.json (a save that never finished, or a deleted manifest): not "
            "resumable; resuming from step_00000001 discards what was trained up to step 2") in caplog.text


@pytest.mark.parametrize("tamper, says", [
    (lambda m: {**m, "files": sorted(m["files"])}, "malformed manifest.json: 'files' must map each file name"),
    (lambda m: {**m, "files": {k: v for k, v in m["files"].items() if k != ".metadata"}},
     ".metadata not in manifest.json (its contents are not vouched for)"),
    (lambda m: {**m, "files": {**m["files"], "../x": {"size": 1, "sha256": "0"}}}, "a file name with a directory"),
], ids=["files-a-list", "a-file-unlisted", "a-path-outside"])
def test_a_malformed_manifest_is_set_aside_like_a_damaged_checkpoint(tamper, says, after_two_steps, tmp_path,
                                                                     uninterrupted, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(after_two_steps, run_dir)
    manifest = run_dir / "checkpoints" / "step_00000002" / MANIFEST
    manifest.write_text(json.dumps(tamper(json.loads(manifest.read_text()))))
    _resume_and_compare(run_dir, uninterrupted, expected_start=1)
    assert "step_00000002 is damaged" in caplog.text and says in caplog.text
    assert (run_dir / "checkpoints" / ".bad-step_00000002").is_dir()
