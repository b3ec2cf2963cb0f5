"""Bad input is stopped at the door with a one-line error that names the row, field, key or file (or, for rows
under data.on_bad_row=skip, a logged skip), before any model loads."""
import json
import logging

import pytest

from twofold.engine.run.config import load_config
from twofold.engine.data.loading import load_sequences
from twofold.engine.train.tiny import build_char_tokenizer
from twofold.engine.run.train import main

GOOD = '{"prompt": "Q: ", "response": "A", "rewards": 1}\n'


def _rows(tmp_path, bad: bytes) -> object:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(GOOD.encode() + bad + b"\n" + GOOD.encode())
    return path


@pytest.mark.parametrize("bad, message", [
    (b'{"prompt": "Q: ", "response": "A", "rewards": NaN}', "field 'rewards' must be a finite number, got nan"),
    (b'{"prompt": "Q: ", "response": "A", "rewards": Infinity}', "field 'rewards' must be a finite number, got inf"),
    (b'{"prompt": "Q: ", "response": "A", "advantages": -Infinity, "rewards": 0}',
     "field 'advantages' must be a finite number, got -inf"),
    (b'{"prompt": "Q: ", "response": "A", "rewards": 1e999}', "field 'rewards' must be a finite number, got inf"),
    (b'{"prompt": "Q: ", "response": "A", "rewards": ' + str(10**30).encode() + b'}',
     "field 'rewards' is out of range for a 64-bit integer"),
    (b'{"prompt": "Q: \xff\xfe", "response": "A", "rewards": 1}', r"not valid UTF-8 \(byte 0xff at column 16\)"),
])
def test_a_bad_value_names_its_row_and_field_and_skip_skips_only_that_row(tmp_path, caplog, bad, message):
    path = _rows(tmp_path, bad)
    with pytest.raises(ValueError, match=f"row 2: {message}"):
        load_sequences(path, build_char_tokenizer(), budget=64, on_bad_row="error")
    with caplog.at_level(logging.WARNING, logger="twofold.data"):
        sequences = load_sequences(path, build_char_tokenizer(), budget=64, on_bad_row="skip")
    assert [s.row_id for s in sequences] == [1, 3]
    assert "skipping" in caplog.text and "row 2" in caplog.text


@pytest.fixture
def recipe(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(GOOD * 4)
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {{preset: tiny-qwen2}}\ndata: {{path: {data}}}\n")
    return path


@pytest.mark.parametrize("override, message", [
    ("optim.lr=.inf", "config optim.lr must be a finite number, got inf"),
    ("optim.lr=.nan", "config optim.lr must be a finite number, got nan"),
    ("optim.lr=1e999", "config optim.lr must be a finite number"),  # YAML reads it as the string '1e999'
    ("optim.eps=.nan", "config optim.eps must be a finite number"),
    ("optim.eps=0", "config optim.eps must be > 0"),
    ("optim.weight_decay=-0.1", "config optim.weight_decay must be >= 0, got -0.1"),
    ("optim.betas=[0.9, .nan]", r"config optim.betas\[1\] must be a finite number"),
    ("optim.max_grad_norm=-.inf", "config optim.max_grad_norm must be a finite number"),
    ("objective.kwargs={beta: .inf}", "config objective.kwargs.beta must be a finite number"),
    ("rollout.temperature=.nan", "config rollout.temperature must be a finite number"),
    ("rollout.format_penalty=-1", "config rollout.format_penalty must be >= 0"),
    ("rollout.top_k=-1", "config rollout.top_k must be >= 0"),
    ("sampler.gpu_memory_utilization=1.5", r"config sampler.gpu_memory_utilization must be in \(0, 1\]"),
    ("verifier.timeout=.inf", "config verifier.timeout must be a finite number"),
    ("optim.lr=[1", "override 'optim.lr=\\[1': the value is not valid YAML"),
])
def test_a_bad_config_value_names_its_key(recipe, override, message):
    with pytest.raises(ValueError, match=message):
        load_config(recipe, [override])


def test_unreadable_config_files_get_one_line_errors(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  preset: tiny-qwen2\n data: [\n")
    for path, message in ((broken, f"config file {broken} is not valid YAML: .* at line 3"),
                          (tmp_path / "missing.yaml", f"config file {tmp_path / 'missing.yaml'} does not exist"),
                          (tmp_path, f"config file {tmp_path} is not a file")):
        with pytest.raises(SystemExit) as exit_:
            main(["--config", str(path)])
        text = str(exit_.value.code)
        assert text.startswith("config error: ") and "\n" not in text
        assert __import__("re").search(message, text), text


def test_paths_that_cannot_be_what_they_name_are_rejected_before_loading(recipe, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(ValueError, match=f"model.path '{model}' has no config.json"):
        load_config(recipe, [f"model.path={model}", "model.preset="])
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match=f"model.path '{model}' has no tokenizer .*set model.tokenizer"):
        load_config(recipe, [f"model.path={model}", "model.preset="])
    (model / "tokenizer.json").write_text("{}")
    load_config(recipe, [f"model.path={model}", "model.preset="])  # now it is accepted
    with pytest.raises(ValueError, match=f"data.path '{tmp_path}' is a directory, not a JSONL or Parquet file"):
        load_config(recipe, [f"data.path={tmp_path}"])
    with pytest.raises(ValueError, match="model.tokenizer '/nonexistent' does not exist: it is a local path"):
        load_config(recipe, ["model.tokenizer=/nonexistent"])


# ---- silent acceptance: input that used to load and then quietly mean something else, or train nothing --------

@pytest.mark.parametrize("text, message", [
    ("optim: {lr: 0.001}\noptim: {weight_decay: 0.1}\n",
     r"key 'optim' appears twice in one mapping \(line 3 and line 4\)"),
    ("optim:\n  lr: 0.001\n  warmup_steps: 2\n  lr: 0.1\n",
     r"key 'lr' appears twice in one mapping \(line 4 and line 6\)"),
])
def test_a_key_given_twice_in_a_config_file_is_an_error(recipe, text, message, capsys):
    recipe.write_text(recipe.read_text() + text)
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(recipe)])
    line = str(exit_.value.code)
    assert line.startswith(f"config error: config file {recipe} is not valid YAML: ") and "\n" not in line
    assert __import__("re").search(message + ".*the second would silently replace the first: merge them", line), line


def test_a_key_given_twice_in_an_override_value_is_an_error(recipe):
    with pytest.raises(ValueError, match=r"key 'beta' appears twice in one mapping"):
        load_config(recipe, ["objective.kwargs={beta: 0.1, beta: 0.2}"])
    recipe.write_text(recipe.read_text() + "base: &b {lr: 0.001}\n")  # merge keys still override, as YAML says
    with pytest.raises(ValueError, match="unknown config key 'base'"):  # (and then an unknown section is named)
        load_config(recipe)


ONLINE = ["train.mode=online", "objective.name=nft", "rollout.samples_per_prompt=4"]


@pytest.mark.parametrize("overrides, message", [
    (["train.steps=0"], r"config train.steps must be >= 1, got 0"),
    (ONLINE + ["train.steps=0"], r"config train.steps must be >= 1, got 0"),
    (ONLINE + ["objective.name=grpo", "rollout.samples_per_prompt=1"],
     r"config rollout.samples_per_prompt must be >= 2 for grpo \(its advantages are relative to the prompt's group\)"),
    (ONLINE + ["objective.name=dapo", "rollout.samples_per_prompt=1", "rollout.dynamic_sampling=false"],
     r"must be >= 2 for dapo"),
    (ONLINE + ["rollout.samples_per_prompt=1"], r"must be >= 2 for rollout.dynamic_sampling=true"),
    (ONLINE + ["objective.name=oreal", "rollout.samples_per_prompt=1"], r"must be >= 2 for oreal"),
    (ONLINE + ["reward.verifier_weight=0"], r"config reward.verifier_weight must be != 0 without reward.functions"),
    (ONLINE + ["reward.positive_threshold=1.5"], r"config reward.positive_threshold must be in \(0, 1\]"),
    (ONLINE + ["reward.positive_threshold=0"], r"config reward.positive_threshold must be in \(0, 1\]"),
    (ONLINE + ["reward.functions=[{name: 'a.b:f'}, {name: 'a.b:f', weight: 2}]"],
     r"config reward.functions\[1\] repeats reward.functions\[0\] \(a.b:f\)"),
    (ONLINE + ["reward.functions=[{name: 'a.b:'}]"], r"reward.functions\[0\].name must look like package.module:func"),
    (ONLINE + ["reward.max_error_frac=1.5"], r"config reward.max_error_frac must be in \[0, 1\]"),
    (ONLINE + ["sampler.max_num_seqs=0"], r"config sampler.max_num_seqs must be >= 1, got 0"),
    (ONLINE + ["sampler.stop=['']"], r"config sampler.stop\[0\] must be a non-empty string"),
])
def test_input_that_would_train_nothing_or_mean_something_else_is_named(recipe, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(recipe, overrides)


def test_one_sample_per_prompt_is_fine_where_nothing_compares_samples(recipe):
    load_config(recipe, ONLINE + ["rollout.samples_per_prompt=1", "rollout.dynamic_sampling=false"])
    load_config(recipe, ONLINE + ["objective.name=rft", "rollout.samples_per_prompt=1",
                                  "rollout.dynamic_sampling=false"])


def test_a_tokenizer_larger_than_the_models_vocabulary_stops_before_anything_starts(recipe, tmp_path):
    from twofold.engine.train.tiny import build_char_tokenizer
    tokenizer = build_char_tokenizer()
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(40)])  # 104 + 40 > the preset's 128 rows
    tokenizer.save_pretrained(tmp_path / "big_tokenizer")
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(recipe), f"model.tokenizer={tmp_path / 'big_tokenizer'}", f"run_dir={run_dir}"])
    line = str(exit_.value.code)
    assert line.startswith(f"error: the tokenizer ({tmp_path / 'big_tokenizer'}) has 144 tokens but the model's "
                           "embedding has vocab_size=128 rows (model.preset)"), line
    assert "\n" not in line and "Use the model's own tokenizer" in line
