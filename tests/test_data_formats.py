"""The dataset layouts users bring, read as they are: TRL (prompt/completion, messages, conversational pairs),
verl (chat prompt, reward_model.ground_truth, metadata columns), lists of files, `datasets` directories, and chat
prompts rendered with the tokenizer's chat template. Each test writes rows in exactly that layout."""
import json
import string

import pytest

from twofold.engine.run.config import load_config
from twofold.engine.data.loading import Fields, get_field, load_sequences, prompt_ids
from twofold.engine.data.tasks import load_problems
from twofold.engine.train.tiny import build_char_tokenizer, save_preset

# a minimal ChatML-like template, in the char tokenizer's alphabet
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def chat_tokenizer():
    tok = build_char_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def text_of(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


VERL_ROWS = [{"data_source": "tiny-arith", "ability": "math",
              "prompt": [{"role": "system", "content": "Box it."}, {"role": "user", "content": f"{a}+0="}],
              "reward_model": {"style": "rule", "ground_truth": str(a)},
              "extra_info": {"index": a, "split": "train"}} for a in range(4)]


def test_verl_parquet_rows_become_chat_prompts_with_their_ground_truth(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", VERL_ROWS)
    tok = chat_tokenizer()
    problems = load_problems(path, tok, Fields(), 64).problems
    assert [p.answer for p in problems] == ["0", "1", "2", "3"]
    assert text_of(tok, problems[1].prompt_ids) == "<system>Box it.\n<user>1+0=\n<assistant>"
    explicit = load_problems(path, tok, Fields(answer="reward_model.ground_truth"), 64).problems
    assert explicit == problems


def test_trl_messages_rows_split_at_the_last_assistant_turn(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "\\boxed{4}"}]}]
    tok = chat_tokenizer()
    (seq,) = load_sequences(write_jsonl(tmp_path / "m.jsonl", rows), tok, 64)
    assert text_of(tok, seq.tokens[:seq.prompt_len]) == "<user>2+2=\n<assistant>"
    assert text_of(tok, seq.tokens[seq.prompt_len:]) == "\\boxed{4}"
    assert seq.tokens[-1] == tok.eos_token_id
    prompts = load_problems(write_jsonl(tmp_path / "p.jsonl", [{**rows[0], "answer": "4"}]), tok, Fields(), 64)
    assert text_of(tok, prompts.problems[0].prompt_ids) == "<user>2+2=\n<assistant>"


def test_trl_prompt_completion_rows_standard_and_conversational(tmp_path):
    tok = chat_tokenizer()
    standard = load_sequences(write_jsonl(tmp_path / "s.jsonl", [{"prompt": "1+1=", "completion": "2"}]), tok, 64)
    assert text_of(tok, standard[0].tokens) == "1+1=2"
    conversational = [{"prompt": [{"role": "user", "content": "1+1="}],
                       "completion": [{"role": "assistant", "content": "2"}]}]
    (seq,) = load_sequences(write_jsonl(tmp_path / "c.jsonl", conversational), tok, 64)
    assert text_of(tok, seq.tokens) == "<user>1+1=\n<assistant>2"


def test_trl_conversational_pairs_with_an_implicit_prompt(tmp_path):
    user = {"role": "user", "content": "1+1="}
    rows = [{"chosen": [user, {"role": "assistant", "content": "2"}],
             "rejected": [user, {"role": "assistant", "content": "3"}]}]
    tok = chat_tokenizer()
    chosen, rejected = load_sequences(write_jsonl(tmp_path / "pairs.jsonl", rows), tok, 64)
    assert chosen.tokens[:chosen.prompt_len] == rejected.tokens[:rejected.prompt_len]
    assert text_of(tok, chosen.tokens) == "<user>1+1=\n<assistant>2"
    assert (chosen.fields["chosen"], rejected.fields["chosen"]) == (1, 0)


def test_string_prompts_through_the_chat_template_with_the_one_knob(tmp_path):
    tok = chat_tokenizer()
    assert text_of(tok, prompt_ids(tok, "3+4=", "chat")) == "<user>3+4=\n<assistant>"
    assert text_of(tok, prompt_ids(tok, "3+4=", "Q: {prompt}")) == "Q: 3+4="
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        prompt_ids(build_char_tokenizer(), [{"role": "user", "content": "x"}])


def test_dotted_field_paths_and_metadata_columns(tmp_path):
    rows = [{"q": {"text": "5+0="}, "sol": {"text": "\\boxed{5}"}, "score": {"value": 1}, "source": "x",
             "rewards": 1.0}]
    (seq,) = load_sequences(write_jsonl(tmp_path / "n.jsonl", rows), build_char_tokenizer(), 64,
                            fields=Fields(prompt="q.text", response="sol.text"))
    assert seq.fields == {"rewards": 1.0}  # numbers only; the string and the mappings are metadata
    assert get_field({"a": {"b": 2}, "a.b": 3}, "a.b") == 3  # a key holding the dot itself wins
    with pytest.raises(ValueError, match="missing field 'q.nope'"):
        get_field(rows[0], "q.nope")


def test_a_list_of_files_reads_in_order_with_running_row_ids(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1+0=", "answer": "1"}, {"prompt": "2+0=", "answer": "2"}])
    b = write_parquet(tmp_path / "b.parquet", [{"prompt": "3+0=", "answer": "3"}])
    found = load_problems([str(a), str(b)], build_char_tokenizer(), Fields(), 64).problems
    assert [(p.row_id, p.answer) for p in found] == [(1, "1"), (2, "2"), (3, "3")]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])
    with pytest.raises(ValueError, match=r"bad.jsonl row 3: missing field 'answer'"):
        load_problems([str(a), str(bad)], build_char_tokenizer(), Fields(), 64)


def test_a_datasets_save_to_disk_directory_and_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the data extra (pip install 'twofold[data]')")
    rows = {"prompt": ["1+0=", "2+0="], "response": ["\\boxed{1}", "\\boxed{2}"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict({k: v[:1] for k, v in rows.items()})}
                         ).save_to_disk(str(tmp_path / "ds"))
    tok = build_char_tokenizer()
    train = load_sequences(tmp_path / "ds", tok, 64)
    assert [text_of(tok, s.tokens) for s in train] == ["1+0=\\boxed{1}", "2+0=\\boxed{2}"]
    assert len(load_sequences(tmp_path / "ds", tok, 64, split="test")) == 1
    with pytest.raises(ValueError, match="has no split 'dev'"):
        load_sequences(tmp_path / "ds", tok, 64, split="dev")


def test_data_path_in_the_config_takes_lists_and_names_a_missing_file(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1", "response": "2"}])
    config = load_config(None, ["model.preset=tiny-qwen2", f"data.path=[{a}, {a}]", "data.prompt_template=chat"])
    assert config.data.path == [str(a), str(a)]
    with pytest.raises(ValueError, match="data.path .*missing.jsonl' does not exist"):
        load_config(None, ["model.preset=tiny-qwen2", f"data.path=[{a}, {tmp_path / 'missing.jsonl'}]"])
    with pytest.raises(ValueError, match="data.prompt_template must contain {prompt} or be 'chat'"):
        load_config(None, ["model.preset=tiny-qwen2", f"data.path={a}", "data.prompt_template=plain"])


def test_saved_char_tokenizer_loads_through_auto_tokenizer_to_the_same_ids(tmp_path):
    from transformers import AutoTokenizer
    text = string.printable + "12 + 3 = \\boxed{15}  done"
    for preset in ("tiny-qwen2", "tiny-llama"):
        loaded = AutoTokenizer.from_pretrained(save_preset(preset, tmp_path / preset))
        assert loaded(text).input_ids == build_char_tokenizer()(text).input_ids
        assert loaded.decode(loaded(text).input_ids, skip_special_tokens=True) == text


def test_a_hub_dataset_name_offline_and_not_cached_says_how_to_fetch_it(tmp_path):
    """In a fresh process, so that datasets reads the offline switch and the empty cache at import."""
    import os
    import subprocess
    import sys
    pytest.importorskip("datasets", reason="the data extra (pip install 'twofold[data]')")
    code = ("from twofold.engine.data.loading import load_sequences\n"
            "from twofold.engine.train.tiny import build_char_tokenizer\n"
            "load_sequences('acme/absent-math', build_char_tokenizer(), 64)\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode != 0
    assert ("data.path 'acme/absent-math' is neither a local file or directory nor a Hub dataset that can be "
            "loaded") in done.stderr
    assert "`hf download --repo-type dataset acme/absent-math`" in done.stderr
