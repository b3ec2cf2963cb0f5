"""What a new user meets on the first try, tried the way they try it: every shipped recipe's prompt template on
string and chat prompts, the installed console scripts and their exit codes, an export that never deletes what it
did not write, and a checkpoint copied away from its run that still exports and evaluates."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from twofold.engine.run.config import load_config
from twofold.engine.data.loading import Fields, load_sequences
from twofold.engine.data.tasks import load_problems
from twofold.engine.train.tiny import build_char_tokenizer
from twofold.engine.run.train import run

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(ROOT.glob("configs/*.yaml"))
TEMPLATED = [p for p in RECIPES if "prompt_template" in (yaml.safe_load(p.read_text()).get("data") or {})]
CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli(name, *args, cwd=None):
    """An installed console script (`.venv/bin/twofold-*`), with this checkout first on the path."""
    script = Path(sys.executable).with_name(name)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


# ---- prompt templates: LaTeX braces are text -------------------------------------------------------------------

def test_the_shipped_recipes_with_a_template_are_found():
    assert len(TEMPLATED) >= 8, [p.name for p in TEMPLATED]  # dapo, drgrpo, grpo, jepo, nft, oreal, 2x redi


@pytest.mark.parametrize("recipe", TEMPLATED, ids=lambda p: p.stem)
def test_every_recipe_template_renders_string_prompts_and_leaves_chat_prompts_to_the_chat_template(recipe, tmp_path):
    template = yaml.safe_load(recipe.read_text())["data"]["prompt_template"]
    assert "\\boxed{}" in template  # the braces that str.format read as a replacement field
    tok = build_char_tokenizer()
    tok.chat_template = CHAT
    fields = Fields(template=template)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1=", "answer": "2"},
                                                 {"prompt": [{"role": "user", "content": "2+2="}], "answer": "4"}])
    text, chat = (tok.decode(p.prompt_ids) for p in load_problems(prompts, tok, fields, 4096, check_golds=None).problems)
    assert text == template.replace("{prompt}", "1+1=")
    assert chat == "<user>2+2=\n<assistant>"
    rows = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "1+1=", "response": "\\boxed{2}"}])
    (seq,) = load_sequences(rows, tok, 4096, fields=fields)
    assert tok.decode(seq.tokens[:seq.prompt_len]) == template.replace("{prompt}", "1+1=")


def test_a_template_without_the_placeholder_is_a_config_error_that_says_how_it_is_filled(tmp_path):
    rows = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "1", "response": "2"}])
    with pytest.raises(ValueError, match=r"data.prompt_template must contain \{prompt\} or be 'chat' \(the prompt "
                                         r"replaces \{prompt\}\), got 'Solve \\\\boxed\{\}'"):
        load_config(None, ["model.preset=tiny-qwen2", f"data.path={rows}", "data.prompt_template=Solve \\boxed{}"])


# ---- console scripts: exit codes --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step SFT run of the tiny preset, one checkpoint per step, and its HF export."""
    tmp = tmp_path_factory.mktemp("first_contact")
    rows = write_jsonl(tmp / "sft.jsonl", [{"prompt": f"{a}+0=", "response": f"\\boxed{{{a}}}", "answer": str(a)}
                                           for a in range(8)])
    run_dir = tmp / "run"
    run(load_config(None, [f"run_dir={run_dir}", "model.preset=tiny-qwen2", "model.dtype=float32",
                           "model.attn_implementation=sdpa", "model.activation_checkpointing=false",
                           f"data.path={rows}", "data.batch_size=4", "data.max_tokens_per_microbatch=64",
                           "optim.lr=1e-2", "train.steps=2", "checkpoint.every=1", "log.progress_bar=false",
                           "log.plot=false", "checkpoint.export_dtype=float32"]))
    return {"rows": rows, "run_dir": run_dir, "step": run_dir / "checkpoints" / "step_00000002"}


def test_twofold_export_exits_0_and_refuses_a_directory_it_did_not_write(trained, tmp_path):
    out = tmp_path / "exported"
    done = cli("twofold-export", trained["step"], out, "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    assert f"exported {trained['step']} to {out}" in done.stdout and (out / "config.json").is_file()
    from twofold.engine.run.export import main as export
    assert export([str(trained["step"]), str(out), "--dtype", "float32"]) == 0  # an earlier export: replaced
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    refused = cli("twofold-export", trained["step"], precious)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"error: out_dir {precious} is not empty (notes.txt) and no export wrote it: exporting would replace it. "
        "Choose a new directory, or pass --overwrite to replace it"]
    assert (precious / "notes.txt").read_text() == "keep me"
    assert export([str(trained["step"]), str(precious), "--overwrite"]) == 0
    assert not (precious / "notes.txt").exists() and (precious / "config.json").is_file()


def test_exporting_into_the_run_directory_that_holds_the_checkpoint_is_refused_even_with_overwrite(trained):
    from twofold.engine.run.export import export_checkpoint
    for target in (trained["run_dir"], trained["step"]):
        with pytest.raises(ValueError, match="holds the checkpoint .* being exported"):
            export_checkpoint(trained["step"], target, "float32", overwrite=True)
    assert (trained["step"] / ".metadata").is_file() and (trained["run_dir"] / "metrics.jsonl").is_file()


def test_a_copied_checkpoint_exports_and_evaluates_without_its_run(trained, tmp_path):
    """The checkpoint alone, copied away from its run (no config.yaml, no data, no model.path beside it), exports
    the same weights and tokenizer as the run's own export, and twofold-eval scores it with exit code 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    elsewhere = tmp_path / "elsewhere"
    copy = shutil.copytree(trained["step"], elsewhere / "step_00000002")
    assert not (elsewhere / "config.yaml").exists()
    done = cli("twofold-export", copy, elsewhere / "hf", "--dtype", "float32", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    mine = AutoModelForCausalLM.from_pretrained(elsewhere / "hf").state_dict()
    final = AutoModelForCausalLM.from_pretrained(trained["run_dir"] / "hf").state_dict()
    assert mine.keys() == final.keys() and all(torch.equal(mine[k], final[k]) for k in final)
    text = "12 + 3 = \\boxed{15}"
    assert AutoTokenizer.from_pretrained(elsewhere / "hf")(text).input_ids == build_char_tokenizer()(text).input_ids
    prompts = write_jsonl(elsewhere / "eval.jsonl", [{"prompt": f"{a}+0=", "answer": str(a)} for a in range(3)])
    scored = cli("twofold-eval", copy, prompts, "--out", elsewhere / "scores.json", "eval.samples=0",
                 "rollout.max_new_tokens=4", "sampler.backend=transformers", "sampler.max_model_len=64",
                 "verifier.workers=1", cwd=elsewhere)
    assert scored.returncode == 0, scored.stderr
    scores = json.loads((elsewhere / "scores.json").read_text())
    assert scores["eval/prompts"] == 3.0 and 0.0 <= scores["eval/pass1_greedy"] <= 1.0


# ---- bad input ends the run early, in one line that names it and the fix -----------------------------------------

def offline(run_dir, rows, *extra):
    return [f"run_dir={run_dir}", "model.preset=tiny-qwen2", "model.dtype=float32", "model.attn_implementation=sdpa",
            "model.activation_checkpointing=false", f"data.path={rows}", "data.batch_size=2",
            "data.max_tokens_per_microbatch=64", "train.steps=1", "log.progress_bar=false", "log.plot=false",
            "checkpoint.export_hf=false", *extra]


PAIRS = [{"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a + 2)} for a in range(4)]


def test_a_pairs_file_with_sft_is_refused_and_the_corrected_rerun_reuses_the_run_dir(tmp_path, capsys):
    """SFT on (prompt, chosen, rejected) rows would train on the rejected answers too: refused, naming the pair
    objectives. That start wrote only its config.yaml, so the rerun with the right data goes into the same run_dir
    (it used to be refused as 'another run')."""
    from twofold.engine.run.train import main
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(SystemExit) as stop:
        main(offline(tmp_path / "run", pairs))
    assert str(stop.value) == (
        f"error: data.path {pairs} holds preference pairs (row 1: chosen/rejected) and objective.name=sft trains on "
        "every sequence, so it would train on the rejected answers too. Use a pair objective (redi, dpo, simpo), or "
        "give sft rows of prompt and response (the chosen answers) (log.verbose=true shows where it was raised)")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml"]
    rows = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p["prompt"], "response": p["chosen"]} for p in PAIRS])
    main(offline(tmp_path / "run", rows))
    assert "complete: 1 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="objective.name=redi trains on preference pairs, but data.path .* holds "
                                         "single responses \\(row 1\\)"):
        main(offline(tmp_path / "redi", rows, "objective.name=redi"))


def test_online_data_errors_end_the_run_before_the_sampler_starts_in_one_line(tmp_path):
    """twofold-train online on pairs data, with a wrong answer field, with chat prompts and a tokenizer without a
    chat template: exit 1, the last stderr line names the row, the field and the fix, no traceback, and the sampler
    never started (it writes the preset's model files into run_dir/sampler_model first)."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"question": "1+1=", "gold": "2"}])
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}])
    base = ["model.preset=tiny-qwen2-vllm", "train.mode=online", "objective.name=nft", "verifier.workers=1"]
    cases = [(pairs, [], f"error: {pairs} row 1: missing field 'answer' (row has ['chosen', 'prompt', 'rejected']). "
                         "This row is a preference pair (chosen/rejected): online objectives read prompts with gold "
                         "answers; train pairs offline (train.mode=offline, objective.name=redi, dpo or simpo)"),
             (prompts, ["data.prompt_field=question"],
              f"error: {prompts} row 1: missing field 'answer' (row has ['gold', 'question']). Set data.answer_field to "
              "the field of the row that holds it (fields: gold, question)"),
             (chats, [], f"error: {chats} row 1: chat-message prompts (or data.prompt_template=chat) need a tokenizer "
                         "with a chat template; set model.tokenizer to one that has it, or give string prompts")]
    for i, (data, extra, line) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        done = cli("twofold-train", *base, f"run_dir={run_dir}", f"data.path={data}", *extra)
        assert done.returncode == 1
        last = done.stderr.strip().splitlines()[-1]
        assert last == line + " (log.verbose=true shows where it was raised)"
        assert "Traceback" not in done.stderr and not (run_dir / "sampler_model").exists()


FAIL_AFTER_THE_SAMPLER = """
import sys
import twofold.engine.run.online as online
def build_policy(*args, **kwargs):
    raise ValueError("the policy failed to build")
online.build_policy = build_policy  # the first step of OnlineRun's construction after the vLLM engine started
from twofold.engine.run.train import main
main(sys.argv[1:])
"""


def test_a_run_that_fails_once_the_sampler_runs_ends_in_our_error_line_with_nothing_after_it(tmp_path):
    """Once the in-process vLLM engine runs, a failure in the online loop (a reward function failing past
    reward.max_error_frac) or in the rest of the run's construction (a fault injected into the policy build, which
    no small config reaches) stops the engine before the process groups go: exit 1, the last stderr line is ours,
    no traceback after it (vLLM's shutdown at exit raised `Invalid process group specified`) and no leak dump."""
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(8)])
    base = ["model.preset=tiny-qwen2-vllm", "train.mode=online", "objective.name=nft", "verifier.workers=1",
            "train.steps=1", "rollout.max_new_tokens=8", f"data.path={data}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    reward = subprocess.run([str(Path(sys.executable).with_name("twofold-train")), *base, f"run_dir={tmp_path / 'a'}",
                             "reward.functions=[{name: 'verifier_functions:raises'}]", "reward.max_error_frac=0"],
                            capture_output=True, text=True, env=env, timeout=600)
    injected = subprocess.run([sys.executable, "-c", FAIL_AFTER_THE_SAMPLER, *base, f"run_dir={tmp_path / 'b'}"],
                              capture_output=True, text=True, env=env, timeout=600)
    for done, run_dir, line in [
            (reward, "a", "error: reward function raises failed on "),
            (injected, "b", "error: the policy failed to build (log.verbose=true shows where it was raised)")]:
        assert done.returncode == 1, done.stderr[-3000:]
        assert (tmp_path / run_dir / "sampler_model").is_dir()  # the engine had started
        assert done.stderr.rstrip().splitlines()[-1].startswith(line), done.stderr[-3000:]
        after = done.stderr[done.stderr.rindex("error: "):]
        assert "Traceback" not in after and "nanobind" not in done.stderr, done.stderr[-3000:]


def test_a_mistyped_local_path_is_called_a_path_not_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "assets").mkdir()
    rows = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "1", "response": "2"}])
    monkeypatch.chdir(tmp_path)
    for path in (str(tmp_path / "assets" / "tiny-qwen"), "assets/tiny-qwen"):  # owner/name-like, but assets/ is here
        with pytest.raises(ValueError, match=f"model.path '{path}' does not exist: it is a local path, not a Hub id"):
            load_config(None, [f"model.path={path}", f"data.path={rows}"])


def test_recipe_lengths_that_a_short_run_or_a_small_model_cannot_hold_are_fitted_with_a_warning(tmp_path, caplog):
    from twofold.engine.train.model import load_hf_config
    from twofold.engine.rollout.sampler import fit_to_model
    rows = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "1", "answer": "2"}])
    with caplog.at_level("WARNING", logger="twofold"):
        config = load_config(ROOT / "configs" / "nft-qwen2.5-math-7b.yaml",
                             ["model.path=", "model.preset=tiny-qwen2-vllm", f"data.path={rows}", "eval.path=",
                              "train.steps=1", "rollout.mini_batches=1"])
        assert config.optim.warmup_steps == 1  # the recipe's 10 warm-up steps, in a 1-step run
        fitted = fit_to_model(config.sampler, load_hf_config(config.model), "model.preset=tiny-qwen2-vllm")
    assert fitted.max_model_len == 1024 and config.sampler.max_model_len == 4096
    assert caplog.messages == [
        "optim.warmup_steps=10 is longer than the run (optimizer steps=1): warming up over all 1 steps",
        "sampler.max_model_len=4096 is more than the model's max_position_embeddings=1024 "
        "(model.preset=tiny-qwen2-vllm): using 1024"]


# ---- the quickstart: one command on your own model and data -----------------------------------------------------

def test_the_readme_quickstart_reaches_an_online_step_in_one_command(tmp_path):
    """`twofold-train --model DIR --data PATH --objective nft` (README, Quickstart) on a model saved with
    save_pretrained and a JSONL of prompts with answers, with train.steps=1 so that CI stops after the first step:
    it prints what it chose, trains online with the real vLLM sampler, and exits 0."""
    from twofold.engine.train.tiny import save_preset
    model = save_preset("tiny-qwen2-vllm", tmp_path / "my-model")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(8)])
    done = cli("twofold-train", "--model", model, "--data", data, "--objective", "nft", "train.steps=1",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"quickstart: model.path={model} data.path={data} objective.name=nft "
                                  "train.mode=online run_dir=runs/nft-my-model run_dir_policy=new")
    assert "run runs/nft-my-model complete: 1 steps this invocation" in done.stdout
    assert (tmp_path / "runs" / "nft-my-model" / "hf" / "config.json").is_file()
    # vLLM's ~15 environment warnings per start (tcmalloc, triton-cpu, thread binding) are off unless log.verbose
    assert [line for line in done.stderr.splitlines() if "WARNING" in line] == []


# ---- what a run logs and what it ignores -------------------------------------------------------------------------

def test_nft_logs_the_nll_of_correct_and_wrong_samples_whose_curves_move_while_its_loss_is_0():
    import twofold
    torch.manual_seed(0)
    logp = -torch.rand(4, 5, dtype=torch.float64) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    rewards, groups = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1])
    loss, metrics = twofold.nft_loss(logp, None, rewards, groups, mask)
    assert loss.item() == 0.0  # on-policy: R = 1
    positive = mask & (rewards[:, None] > 0)
    assert metrics["pos_nll"].item() == pytest.approx((-logp[positive]).mean().item(), rel=1e-12)
    assert metrics["neg_nll"].item() == pytest.approx((-logp[mask & ~positive]).mean().item(), rel=1e-12)


def test_keys_the_run_never_reads_are_named_in_a_warning(tmp_path, caplog):
    rows = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "1", "response": "2", "answer": "2"}])
    with caplog.at_level("WARNING", logger="twofold"):
        load_config(None, ["model.preset=tiny-qwen2", f"data.path={rows}", f"eval.path={rows}",
                           "rollout.max_new_tokens=64", "sampler.max_model_len=4096"])  # the default: not named
        load_config(None, ["model.preset=tiny-qwen2", f"data.path={rows}", "train.mode=online",
                           "objective.name=nft", "data.batch_size=64"])
    assert caplog.messages == [
        "config rollout.max_new_tokens has no effect: offline runs (train.mode=offline) do not read it",
        "config eval.path has no effect: offline runs (train.mode=offline) do not read it",
        "config data.batch_size has no effect: online runs train on rollout.prompts_per_step prompts per step"]
