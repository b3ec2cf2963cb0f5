"""The README's "Using twofold in another trainer" examples run as written: each ```python block of that section
is executed in a fresh namespace, in the order it appears."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Using twofold in another trainer"


def section_blocks() -> list[str]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_the_section_has_its_examples():
    blocks = section_blocks()
    assert len(blocks) == 3
    assert "completion_logprobs" in blocks[0] and "twofold.nn." in blocks[1] and "GRPOTrainer" in blocks[2]


@pytest.mark.parametrize("index", range(3))
def test_readme_example_runs(index):
    code = section_blocks()[index]
    namespace = {"__name__": f"readme_example_{index}"}
    exec(compile(code, f"README.md example {index}", "exec"), namespace)
    loss = namespace.get("loss")
    if loss is not None:
        assert bool(loss.isfinite())
    if "trainer" in namespace:
        assert namespace["trainer"].state.global_step == 2
