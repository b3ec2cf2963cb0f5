"""Config loading/validation and the JSONL data path: clear errors and logged skips that name the row."""
import json
import logging

import pytest

from twofold.engine.run.config import load_config, to_yaml
from twofold.engine.data.loading import BatchStream, load_sequences
from twofold.engine.train.tiny import build_char_tokenizer


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"Q{i}: ", "response": f"A{i}", "rewards": i % 2} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp_path, data_file, **extra):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {{preset: tiny-qwen2}}\ndata: {{path: {data_file}}}\n" + "".join(
        f"{k}: {v}\n" for k, v in extra.items()))
    return path


def test_overrides_are_typed_and_applied(tmp_path, data_file):
    config = load_config(_recipe(tmp_path, data_file), ["optim.lr=3e-4", "train.steps=7", "optim.betas=[0.8,0.9]",
                                                        "objective.kwargs={agg: token_mean}"])
    assert config.optim.lr == 3e-4 and config.train.steps == 7 and config.optim.betas == [0.8, 0.9]
    assert config.objective.kwargs == {"agg": "token_mean"}
    assert "lr: 0.0003" in to_yaml(config)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
    ("train.steps=ten", "config train.steps must be int, got str 'ten'"),
    ("model.dtype=float16", "config model.dtype must be one of"),
    ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0"),
    ("model.path=/nonexistent", "set exactly one of model.path"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last must be >= 1"),
    ("optim=3", "config section optim must be a mapping"),
    ("objective.name=ppo2", "objective.name 'ppo2' is unknown"),
])
def test_bad_config_is_rejected_with_the_key_named(tmp_path, data_file, override, message):
    with pytest.raises(ValueError, match=message):
        load_config(_recipe(tmp_path, data_file), [override])


def test_malformed_row_stops_with_its_row_id(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": 5}\n')
    with pytest.raises(ValueError, match=r"row 2: field 'response' must be a string"):
        load_sequences(path, build_char_tokenizer(), budget=64, on_bad_row="error")


def test_bad_rows_are_skipped_and_logged_with_their_row_id(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([
        '{"prompt": "ok ", "response": "yes"}',
        '{"prompt": "broken',
        '{"prompt": "empty ", "response": ""}',
        json.dumps({"prompt": "long " * 20, "response": "x"}),
        '{"prompt": "ok ", "response": "again"}',
    ]) + "\n")
    with caplog.at_level(logging.WARNING, logger="twofold.data"):
        seqs = load_sequences(path, build_char_tokenizer(), budget=64, on_bad_row="skip")
    assert [s.row_id for s in seqs] == [1, 5]
    text = caplog.text
    assert "row 2: not valid JSON" in text
    assert "row 3: empty response" in text
    assert "row 4: 102 tokens exceed data.max_tokens_per_microbatch=64" in text


def test_batch_stream_resumes_at_the_same_sequence_across_epochs(data_file):
    seqs = load_sequences(data_file, build_char_tokenizer(), budget=64)
    straight = BatchStream(seqs, 4, shuffle=True, seed=1)
    expected = [[s.row_id for s in straight.next_batch()] for _ in range(4)]
    first = BatchStream(seqs, 4, shuffle=True, seed=1)
    first.next_batch()
    resumed = BatchStream(seqs, 4, shuffle=True, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert [[s.row_id for s in resumed.next_batch()] for _ in range(3)] == expected[1:]


def test_resuming_on_a_different_dataset_fails_loudly(data_file):
    seqs = load_sequences(data_file, build_char_tokenizer(), budget=64)
    state = BatchStream(seqs, 2, True, 0).state_dict()
    with pytest.raises(ValueError, match="dataset differs from the one in the checkpoint"):
        BatchStream(seqs[1:], 2, True, 0).load_state_dict(state)


def test_preference_row_becomes_two_sequences_of_one_pair(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3", "weight": 0.5}) + "\n")
    chosen, rejected = load_sequences(path, build_char_tokenizer(), budget=64)
    assert chosen.fields == {"weight": 0.5, "pair_id": 1, "chosen": 1}
    assert rejected.fields == {"weight": 0.5, "pair_id": 1, "chosen": 0}
    assert chosen.tokens[:chosen.prompt_len] == rejected.tokens[:rejected.prompt_len]


@pytest.mark.parametrize("overrides, message", [
    (["objective.kwargs={foo: 1}"], r"objective.kwargs.foo is not a hyperparameter of 'sft' \(sft takes: agg, "),
    (["objective.kwargs={agg: tokenmean}"], r"objective.kwargs.agg must be one of \['token_mean'"),
    (["objective.kwargs={constant: big}"], "objective.kwargs.constant must be float"),
    (["train.mode=online", "objective.name=grpo", "objective.kwargs={kl: k1}"], "k1.*expected gradient"),
    (["train.mode=online", "objective.name=grpo", "objective.kwargs={prompt_weight: sqrt}"],
     "prompt_weight is not a hyperparameter of 'grpo'"),
    (["train.mode=online", "objective.name=nft", "objective.kwargs={rate_bounds: [0.1]}"],
     "objective.kwargs.rate_bounds must be a list of 2 values"),
    (["train.mode=online", "objective.name=gspo", "objective.kwargs={entropy_coef: true}"],
     "objective.kwargs.entropy_coef must be float, got bool"),
])
def test_objective_kwargs_are_checked_at_load_naming_the_key(tmp_path, data_file, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(_recipe(tmp_path, data_file), overrides)


def test_objective_kwargs_are_coerced_to_the_loss_types(tmp_path, data_file):
    config = load_config(_recipe(tmp_path, data_file), [
        "train.mode=online", "objective.name=nft", "objective.kwargs={eps: 1, rate_bounds: [0, 1], agg: token_mean}"])
    assert config.objective.kwargs == {"eps": 1.0, "rate_bounds": (0.0, 1.0), "agg": "token_mean"}


def test_changing_the_objective_on_the_command_line_needs_its_kwargs(tmp_path, data_file):
    recipe = _recipe(tmp_path, data_file, train="{mode: online}",
                     objective="{name: nft, kwargs: {eps: 1.0, prompt_weight: '1-r'}}")
    with pytest.raises(ValueError, match=r"objective.name=grpo on the command line replaces the file's objective "
                                         r"'nft', but objective.kwargs .* were written for 'nft'"):
        load_config(recipe, ["objective.name=grpo"])
    assert load_config(recipe, ["objective.name=grpo", "objective.kwargs={}"]).objective.kwargs == {}
    assert load_config(recipe, ["objective.name=nft"]).objective.kwargs["eps"] == 1.0  # same objective: fine


def test_drgrpo_constant_defaults_to_the_generation_budget(tmp_path, data_file):
    from twofold.engine.run.config import objective_kwargs
    config = load_config(_recipe(tmp_path, data_file), ["train.mode=online", "objective.name=drgrpo",
                                                        "rollout.max_new_tokens=12"])
    assert objective_kwargs(config) == {"constant": 12.0}
    config = load_config(_recipe(tmp_path, data_file), ["train.mode=online", "objective.name=drgrpo",
                                                        "objective.kwargs={constant: 3000}"])
    assert objective_kwargs(config) == {"constant": 3000.0}
    nft = load_config(_recipe(tmp_path, data_file), ["train.mode=online", "objective.name=nft"])
    assert objective_kwargs(nft) == {}  # NFT's own constant (1000) stays
