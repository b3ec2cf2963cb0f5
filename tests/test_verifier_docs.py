"""docs/verifier.md's examples run as written: each ```python block, in a fresh namespace (the first trains two
TRL GRPOTrainer steps with twofold's math reward); the rules table's examples hold."""
import re
from pathlib import Path

import pytest

from twofold.verifier import extract_answer, is_equivalent

DOC = Path(__file__).resolve().parents[1] / "docs" / "verifier.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_has_its_examples():
    python = blocks("python")
    # the fourth is the engine-level API sketch (VerifierPool, math_rewards) of the last section
    assert len(python) == 4 and "GRPOTrainer" in python[0] and "compute_score" in python[1]
    assert "pkg://twofold.verifier" in blocks("bash")[0]


@pytest.mark.parametrize("index", range(3))
def test_doc_example_runs(index):
    namespace = {"__name__": f"verifier_doc_example_{index}"}
    exec(compile(blocks("python")[index], f"docs/verifier.md example {index}", "exec"), namespace)
    if "trainer" in namespace:  # TRL trained with the reward, and logged it under its name
        trainer = namespace["trainer"]
        assert trainer.state.global_step == 2
        logged = [row["rewards/math_reward/mean"] for row in trainer.state.log_history
                  if "rewards/math_reward/mean" in row]
        assert logged and all(0.0 <= r <= 1.0 for r in logged)


def table_examples() -> list[tuple[str, str, bool]]:
    """Every `answer` vs `gold`: verdict in the rules table."""
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| ") and "`: " in line]
    found = []
    for row in rows:
        examples = row.rstrip(" |").rsplit(" | ", 1)[1].replace("\\|", "|")
        for case in examples.split("; "):
            match = re.fullmatch(r"(?:`(?P<a>[^`]+)` )?vs `(?P<g>[^`]+)`: (?P<v>[01])", case.strip())
            assert match, case
            answer = match["a"] or found[-1][0]  # "vs `x`: 0" reuses the previous answer
            found.append((answer, match["g"], match["v"] == "1"))
    return found


def test_the_rules_table_examples_hold():
    cases = table_examples()
    assert len(cases) >= 30
    wrong = [(a, g, v) for a, g, v in cases if is_equivalent(extract_answer(f"\\boxed{{{a}}}") if "boxed" not in a
                                                             else extract_answer(a), g) is not v]
    assert wrong == []
