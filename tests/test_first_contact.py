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

from twofold.engine.config import load_config
from twofold.engine.data import Fields, load_sequences
from twofold.engine.tasks import load_problems
from twofold.engine.tiny import build_char_tokenizer
from twofold.engine.train import run

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
    assert cli("twofold-export", trained["step"], out, "--dtype", "float32").returncode == 0  # its own: replaced
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    refused = cli("twofold-export", trained["step"], precious)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"error: out_dir {precious} is not empty (notes.txt) and no export wrote it: exporting would replace it. "
        "Choose a new directory, or pass --overwrite to replace it"]
    assert (precious / "notes.txt").read_text() == "keep me"
    forced = cli("twofold-export", trained["step"], precious, "--overwrite")
    assert forced.returncode == 0, forced.stderr
    assert not (precious / "notes.txt").exists() and (precious / "config.json").is_file()


def test_exporting_into_the_run_directory_that_holds_the_checkpoint_is_refused_even_with_overwrite(trained):
    from twofold.engine.export import export_checkpoint
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
