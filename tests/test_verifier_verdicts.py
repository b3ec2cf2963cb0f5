"""Verdicts that were wrong once, and gold answers parsed in the verifier's workers (never in the trainer)."""
import json
import time

import pytest

from twofold.engine.data.loading import Fields
from twofold.engine.data.tasks import load_problems
from twofold.engine.train.tiny import build_char_tokenizer
from twofold.engine.verifier import VerifierPool, is_equivalent
from twofold.engine.verifier import equivalence as equivalence_module
from twofold.engine.verifier import parser as parser_module
from twofold.engine.verifier.parser import ParseError, parse

PI_36 = "3.14159265358979323846264338327950288"  # pi to 36 significant digits


@pytest.mark.parametrize("answer, gold, expected", [
    ("\\pi\\cdot10^{-50}", "0", False),  # tiny but not zero: no absolute tolerance
    ("10^{-60}", "0", False),
    ("1+10^{-60}", "1", False),
    ("e^{-200}", "0", False),
    ("\\sqrt{2}+\\sqrt{3}-\\sqrt{5+2\\sqrt{6}}", "0", True),  # a true zero that evalf cannot separate from 0
    ("\\tan(\\pi/8)", "\\sqrt{2}-1", True),
])
def test_no_absolute_tolerance_between_a_value_and_zero(answer, gold, expected):
    assert is_equivalent(answer, gold) is expected
    assert is_equivalent(gold, answer) is expected


def test_a_decimal_is_exact_unless_a_numeric_tolerance_is_asked_for():
    assert not is_equivalent(PI_36, "\\pi") and not is_equivalent("\\pi", PI_36)
    assert not is_equivalent(PI_36 + "\\cdot x", "\\pi x")
    assert is_equivalent("1.0", "\\sqrt{3+2\\sqrt{2}}-\\sqrt{2}")  # proved equal, not just close
    assert is_equivalent("0.5", "\\sin(\\pi/6)") and is_equivalent("2.5", "\\frac{5}{2}")
    assert is_equivalent("3.141593", "\\pi", numeric_tolerance=1e-6)
    assert is_equivalent(PI_36, "\\pi", numeric_tolerance=1e-6)
    assert not is_equivalent("3.14", "\\pi", numeric_tolerance=1e-6)
    assert not is_equivalent("3", "\\pi", numeric_tolerance=0.1)  # no decimal written: exact as ever


def test_the_pool_passes_the_numeric_tolerance_to_its_workers():
    with VerifierPool(num_workers=1, check_kwargs={"numeric_tolerance": 1e-6}) as tolerant, \
            VerifierPool(num_workers=1) as exact:
        responses, golds = ["\\boxed{3.141593}", "\\boxed{3.14}"], ["\\pi", "\\pi"]
        assert tolerant.verify_batch(responses, golds) == [1.0, 0.0]
        assert exact.verify_batch(responses, golds) == [0.0, 0.0]


@pytest.mark.parametrize("answer, gold, expected", [
    ("5!!", "15", True), ("6!!", "48", True), ("0!!", "1", True), ("5!!", "120!", False), ("(5!)!", "5!!", False),
    ("3!!+1", "4", True), ("5!", "120", True),
])
def test_double_factorial(answer, gold, expected):
    assert is_equivalent(answer, gold) is expected


def test_three_exclamation_marks_are_ambiguous():
    with pytest.raises(ParseError, match="ambiguous"):
        parse("4!!!")


@pytest.mark.parametrize("hazard", ["\\sqrt{2^{49999}+1}", "\\sqrt{2^{20000}+1}", "(2^{9000}+1)^{1/3}",
                                    "\\log(2^{30000}+1)", "\\log_{2^{5000}+1} 7"])
def test_roots_and_logs_of_huge_integers_are_refused_fast(hazard):
    # CPU time of this process, not wall time: a loaded machine does not stretch it
    start = time.process_time()
    with pytest.raises(ParseError, match="too large a number"):
        parse(hazard)
    assert not is_equivalent(hazard, hazard.replace("+1", "+ 1") + "+0")
    assert time.process_time() - start < 1.0


def test_roots_of_integers_up_to_the_bound_still_work():
    start = time.process_time()  # CPU time: see above
    assert is_equivalent("\\sqrt{2^{1000}}", "2^{500}")
    assert is_equivalent("\\sqrt{2^{1000}+1}", "(2^{1000}+1)^{1/2}")
    assert time.process_time() - start < 2.0


# Within every bound: 50 roots of 1020-bit integers, each a perfect-power search in sympy. It parses in 0.33 s on an
# AMD EPYC with AVX512 (`parse(SLOW_GOLD)`, one core), ~2 s on an AVX2 one; the 1 ms timeout below is 300x less than
# the first, which no CPU closes, and the pool only counts from the moment the job reaches its worker.
SLOW_GOLD = "+".join(f"\\sqrt{{2^{{1020}}+{2 * k + 1}}}" for k in range(50))
FAR_BELOW_SLOW_GOLD = 1e-3  # seconds


def write_golds(path, golds):
    path.write_text("".join(json.dumps({"prompt": chr(97 + k), "answer": gold}) + "\n" for k, gold in enumerate(golds)))
    return path


def test_gold_answers_are_parsed_in_the_workers_and_bad_or_slow_ones_are_skipped_and_counted(tmp_path, monkeypatch):
    def not_in_the_trainer(*args, **kwargs):
        raise AssertionError("a gold answer was parsed in the trainer process")

    for module in (parser_module, equivalence_module):  # the workers are fresh processes: they parse for real
        monkeypatch.setattr(module, "parse", not_in_the_trainer)
    path = write_golds(tmp_path / "p.jsonl", ["7", "\\sqrt{2^{20000}+1}", SLOW_GOLD, "\\frac{", "7"])
    # a timeout no machine reaches: the slow gold is a valid one, and kept
    with VerifierPool(num_workers=1, timeout=120) as pool:
        found = load_problems(path, build_char_tokenizer(), Fields(), 64, check_golds=pool.check_golds)
        assert pool.stats.timeouts == 0
    assert [p.row_id for p in found.problems] == [1, 3, 5]
    assert found.skipped == {"unparseable gold answer": 2}
    # a timeout far below its cost: killed in the worker, and named as too slow
    with VerifierPool(num_workers=1, timeout=FAR_BELOW_SLOW_GOLD) as pool:
        assert pool.check_golds([SLOW_GOLD]) == ["gold answer too slow to parse (verifier.timeout)"]
        assert pool.stats.timeouts == 1 and pool.stats.restarts == 1
