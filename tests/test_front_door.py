"""What a new user meets first: run directories that never mix two runs, Hub ids from the HF cache, a CLI that
lists its keys, the end-of-run summary, export of any checkpoint, and the log's progress lines."""
import json
import sys

import pytest
import torch

from twofold.engine.run.config import load_config
from twofold.engine.run.export import export_checkpoint
from twofold.engine.train.tiny import build_char_tokenizer, save_preset
from twofold.engine.run.tracking import Tracker, read_metrics
from twofold.engine.run.train import RunDirError, main, run


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("front_door") / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+0=", "response": f"\\boxed{{{a}}}"}) + "\n"
                            for a in range(10)))
    return path


def overrides(rows, run_dir, *extra):
    return [f"run_dir={run_dir}", "model.preset=tiny-qwen2", "model.dtype=float32", "model.attn_implementation=sdpa",
            "model.activation_checkpointing=false", f"data.path={rows}", "data.batch_size=4",
            "data.max_tokens_per_microbatch=64", "optim.lr=1e-2", "train.steps=2", "log.progress_bar=false",
            "log.plot=false", "checkpoint.export_dtype=float32", *extra]


def train(rows, run_dir, *extra):
    return run(load_config(None, overrides(rows, run_dir, *extra)))


def test_a_fresh_run_into_a_used_run_dir_stops_naming_it(rows, tmp_path, capsys):
    train(rows, tmp_path / "r")
    with pytest.raises(RunDirError, match=f"run_dir {tmp_path / 'r'} already holds files of another run"):
        train(rows, tmp_path / "r", "checkpoint.resume=never")
    with pytest.raises(SystemExit, match="run_dir_policy=overwrite"):
        main(overrides(rows, tmp_path / "r", "checkpoint.resume=never"))


def test_overwrite_starts_clean_and_new_takes_a_numbered_sibling(rows, tmp_path):
    train(rows, tmp_path / "r", "train.steps=3")
    train(rows, tmp_path / "r", "checkpoint.resume=never", "run_dir_policy=overwrite")
    assert [r["step"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl")] == [1, 2]
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 2  # nothing of the old run
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step_00000002"]
    train(rows, tmp_path / "r", "checkpoint.resume=never", "run_dir_policy=new")
    train(rows, tmp_path / "r", "checkpoint.resume=never", "run_dir_policy=new")
    assert (tmp_path / "r-1" / "hf" / "config.json").is_file() and (tmp_path / "r-2" / "metrics.jsonl").is_file()
    assert len((tmp_path / "r").glob("metrics.jsonl").__next__().read_text().splitlines()) == 2


def test_a_finished_run_says_complete_and_does_nothing(rows, tmp_path, capsys):
    train(rows, tmp_path / "r")
    out = capsys.readouterr().out
    assert f"run {tmp_path / 'r'} complete: 2 steps this invocation, loss " in out
    assert f"outputs: {tmp_path / 'r' / 'metrics.jsonl'}, {tmp_path / 'r' / 'hf'}" in out
    assert "rollout:" not in out and "sampler:" not in out  # the console shows the sections offline runs read
    assert "rollout:" in (tmp_path / "r" / "config.yaml").read_text()  # the file has them all
    main(overrides(rows, tmp_path / "r"))  # returns: exit status 0
    assert f"run {tmp_path / 'r'} is complete (2 of train.steps=2); nothing to do" in capsys.readouterr().out
    assert len(train(rows, tmp_path / "r", "train.steps=3")) == 1  # more steps asked for: it continues


def test_keep_last_never_deletes_the_checkpoint_just_written(rows, tmp_path):
    train(rows, tmp_path / "r", "train.steps=4", "checkpoint.every=1", "checkpoint.keep_last=2")
    older = tmp_path / "r" / "checkpoints" / "step_00000003"
    history = train(rows, tmp_path / "r", "train.steps=4", "checkpoint.every=1", "checkpoint.keep_last=1",
                    f"checkpoint.resume={older}")
    assert [m["step"] for m in history] == [4]
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step_00000004"]


def hub_cache(root, repo_id: str, directory) -> str:
    """A model laid out as huggingface_hub lays out its cache: blobs, a snapshot of links, refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(p for p in directory.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"{i:040x}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(f"../../blobs/{blob.name}")
    return str(snapshot)


def test_a_hub_id_trains_from_the_offline_cache_and_an_absent_one_says_how_to_fetch_it(rows, tmp_path,
                                                                                         monkeypatch):
    from huggingface_hub import constants
    snapshot = hub_cache(tmp_path / "hub", "acme/tiny-qwen2", save_preset("tiny-qwen2", tmp_path / "model"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = [o for o in overrides(rows, tmp_path / "r") if not o.startswith("model.preset")]
    config = load_config(None, base + ["model.path=acme/tiny-qwen2", "train.steps=1"])
    assert len(run(config)) == 1 and config.model.path == snapshot
    absent = load_config(None, base + ["model.path=acme/absent", f"run_dir={tmp_path / 'r2'}"])
    with pytest.raises(ValueError, match=r"model.path 'acme/absent' is not a local directory and not in the "
                                         r"Hugging Face cache .*offline.*`hf download acme/absent`"):
        run(absent)


def test_help_lists_every_key_with_type_default_and_doc(capsys, rows):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "  rollout.samples_per_prompt  (int, default 8)" in text
    assert "  data.prompt_template  (str, default '{prompt}')" in text
    assert "or `chat`: the prompt as a user message through the tokenizer's chat template" in " ".join(text.split())
    assert "  reward.functions  (list of {name, weight}, default [])" in text
    assert "  verifier.check  ('twofold' | 'math_verify', default twofold)" in text
    main(["--print-config", "model.preset=tiny-qwen2", f"data.path={rows}", "optim.lr=3e-4"])
    printed = capsys.readouterr().out
    assert "lr: 0.0003" in printed and "samples_per_prompt: 8" in printed


def test_asking_for_a_missing_tracker_is_a_config_error(rows):
    import importlib.util
    for option in ("tensorboard", "wandb"):
        if importlib.util.find_spec(option) is None:
            with pytest.raises(ValueError, match=f"log.{option}=true needs the {option} package: pip install "
                                                 r"'twofold\[tracking\]'"):
                load_config(None, ["model.preset=tiny-qwen2", f"data.path={rows}", f"log.{option}=true"])


def test_progress_lines_into_a_log_file_come_at_most_every_30_s(rows, tmp_path, capsys):
    assert not sys.stderr.isatty()
    config = load_config(None, overrides(rows, tmp_path, "log.progress_bar=true", "train.steps=200"))
    tracker = Tracker(config, True, 0)
    for step in range(1, 201):
        tracker.log({"step": step, "loss": 1.0 / step, "grad_norm": 1.0, "tokens_per_s": 10.0})
    tracker.close(plot=False)
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    assert len(lines) <= 3, lines  # the start, and the end (200/200); never one per step


def test_export_of_a_step_checkpoint_matches_the_runs_own_export_and_its_tokenizer(rows, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    train(rows, tmp_path / "r")
    out = export_checkpoint(tmp_path / "r" / "checkpoints" / "step_00000002", tmp_path / "exported", "float32")
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "hf").state_dict()
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)
    text = "12 + 3 = \\boxed{15}"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer(text).input_ids == build_char_tokenizer()(text).input_ids
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    again = export_checkpoint(out, tmp_path / "bf16", "bfloat16")  # an HF directory re-saved
    assert next(AutoModelForCausalLM.from_pretrained(again).parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="neither a training checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "x")
