"""bench.verifier runs end to end on a slice (twofold and Math-Verify in worker pools, one table), and the vendored
Math-Verify cases carry their licence notice."""
import json
from pathlib import Path

import pytest

from bench import verifier

DATA = Path(verifier.__file__).resolve().parent / "data"


def test_the_vendored_cases_have_their_notice_and_the_fields_the_bench_reads():
    rows = [json.loads(line) for line in (DATA / "math_verify_cases.jsonl").read_text().splitlines()]
    assert len(rows) == 125 and all(set(r) == {"suite", "gold", "response", "equal"} for r in rows)
    notice = (DATA / "math_verify_cases.NOTICE.md").read_text()
    assert "MIT License" in notice and "Copyright (c) 2024 The HuggingFace Team" in notice
    assert "5d148cfaaf99214c2e4ffb4bc497ab042c592a7a" in notice


@pytest.mark.slow  # about 15 s: six worker pools start, three of them importing Math-Verify
def test_bench_verifier_scores_both_verifiers_and_reports_false_positives_apart(tmp_path, capsys):
    out = tmp_path / "verifier.json"
    results = verifier.main(["--suites", "twofold_tricky,hostile", "--limit", "4", "--throughput", "20",
                             "--timeout", "1", "--workers", "2", "--out", str(out)])
    table = capsys.readouterr().out
    assert "false positives" in table and "| twofold | hostile | 4 | 4 | **0** of 4 |" in table
    assert set(results["suites"]) == {"twofold", "math_verify"} and json.loads(out.read_text())["workers"] == 2
    assert results["suites"]["twofold"]["hostile"]["timeouts"] == 0  # every hostile input refused, none hung
    assert results["throughput"]["twofold"]["responses"] == 20
