"""Datasets of the loops: prompt files with gold answers, field names, bad rows, the demo task, recipes."""
import json
from pathlib import Path

import pytest

from twofold.engine.run.config import load_config
from twofold.engine.data.loading import Fields, load_sequences
from twofold.engine.data.tasks import load_problems, sloppy_answer, write_addition_data
from twofold.engine.train.tiny import build_char_tokenizer
from twofold.objectives import names

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_unparseable_gold_answers_are_skipped_and_counted(tmp_path):
    rows = [{"q": "1+1=", "gold": 2}, {"q": "2+2=", "gold": "\\frac{"}, {"q": "3+3=", "gold": "\\boxed{6}"},
            {"q": "4+4=", "gold": ""}]
    fields = Fields(prompt="q", answer="gold", template="Q: {prompt}")
    found = load_problems(write_jsonl(tmp_path / "p.jsonl", rows), build_char_tokenizer(), fields, 64)
    assert [(p.row_id, p.answer) for p in found.problems] == [(1, "2"), (3, "6")]
    assert found.skipped == {"unparseable gold answer": 2}
    tok = build_char_tokenizer()
    assert tok.decode(list(found.problems[0].prompt_ids), skip_special_tokens=True) == "Q: 1+1="


def test_missing_field_names_field_and_row(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}])
    with pytest.raises(ValueError, match=r"row 2: missing field 'answer'"):
        load_problems(prompts, build_char_tokenizer(), Fields(), 64)
    rows = write_jsonl(tmp_path / "r.jsonl", [{"question": "a", "solution": "b"}, {"question": "c"}])
    with pytest.raises(ValueError, match=r"row 2: missing field 'solution'"):
        load_sequences(rows, build_char_tokenizer(), 64, fields=Fields(prompt="question", response="solution"))


def test_parquet_rows_read_like_jsonl(tmp_path):
    import pyarrow as pa  # a dev dependency; users without it get a clear error (twofold/engine/data/loading.py)
    import pyarrow.parquet as pq
    rows = [{"q": "1+1=", "gold": "2", "sol": "\\boxed{2}"}, {"q": "2+5=", "gold": "7", "sol": "\\boxed{7}"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    write_jsonl(tmp_path / "p.jsonl", rows)
    tok = build_char_tokenizer()
    fields = Fields(prompt="q", answer="gold", response="sol")
    from_parquet = load_problems(tmp_path / "p.parquet", tok, fields, 64).problems
    assert [(p.row_id, p.answer) for p in from_parquet] == [(1, "2"), (2, "7")]
    as_parquet = load_sequences(tmp_path / "p.parquet", tok, 64, fields=fields)
    as_jsonl = load_sequences(tmp_path / "p.jsonl", tok, 64, fields=fields)
    assert [s.tokens for s in as_parquet] == [s.tokens for s in as_jsonl]


def test_every_prompt_unusable_is_an_error(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x" * 100, "answer": "2"}])
    with pytest.raises(ValueError, match="no usable prompts"):
        load_problems(prompts, build_char_tokenizer(), Fields(), 64)


def test_demo_task_holds_out_its_eval_problems(tmp_path):
    paths = write_addition_data(tmp_path, sft_rows=2000, rl_prompts=100, eval_prompts=50, forget_carry=0.6)
    read = {k: [json.loads(line) for line in p.read_text().splitlines()] for k, p in paths.items()}
    held_out = {r["prompt"] for r in read["eval"]}
    assert len(held_out) == 50 and not held_out & {r["prompt"] for r in read["sft"] + read["prompts"]}
    for row in read["eval"] + read["prompts"]:
        a, b = map(int, row["prompt"].rstrip("=").split("+"))
        assert row["answer"] == str(a + b)
    carried = [r for r in read["sft"] if sum(map(lambda x: int(x) % 10, r["prompt"].rstrip("=").split("+"))) >= 10]
    wrong = sum(r["response"] != "\\boxed{%d}" % sum(map(int, r["prompt"].rstrip("=").split("+"))) for r in carried)
    assert 0.5 < wrong / len(carried) < 0.7  # the teacher forgets 60% of carries, and nothing else
    assert sloppy_answer(12, 3, __import__("random").Random(0), 1.0) == 15


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_recipes_load(recipe, tmp_path):
    """Every recipe validates once its user-provided files exist (paper recipes name a model path)."""
    text = (REPO / "configs" / recipe).read_text()
    config = __import__("yaml").safe_load(text)
    overrides = []
    for key, value in (("data.path", config.get("data", {}).get("path")),
                       ("eval.path", config.get("eval", {}).get("path"))):
        if value and not (REPO / value).is_file():
            overrides.append(f"{key}={write_jsonl(tmp_path / Path(value).name, [{'prompt': 'p', 'answer': '1'}])}")
    model_path = config.get("model", {}).get("path")
    if model_path and not Path(model_path).is_dir():
        (tmp_path / "model").mkdir(exist_ok=True)
        for name in ("config.json", "tokenizer.json"):  # what validation looks for in a model directory
            (tmp_path / "model" / name).write_text("{}")
        overrides.append(f"model.path={tmp_path / 'model'}")
    import os
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        loaded = load_config(REPO / "configs" / recipe, overrides)
    finally:
        os.chdir(cwd)
    assert loaded.objective.name


@pytest.mark.parametrize("objective", names("online"))
def test_a_rollout_with_no_informative_group_builds_an_empty_batch(objective):
    """Dynamic sampling can drop every group (all samples right, or all wrong): the batch is empty, not an error."""
    from twofold.engine.run.schema import RolloutConfig
    from twofold.engine.rollout.build import build_sequences
    assert build_sequences(objective, [], RolloutConfig(), tokenizer=None) == []


def test_the_demo_finds_its_configs():
    """`python -m twofold.engine.run.demo` loads configs/demo_sft.yaml and demo_nft.yaml from the repository root."""
    from twofold.engine.run.demo import CONFIGS
    assert CONFIGS == REPO / "configs"
    assert (CONFIGS / "demo_sft.yaml").is_file() and (CONFIGS / "demo_nft.yaml").is_file()
