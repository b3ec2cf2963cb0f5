"""The tricky classes of answers (bench/verifier_cases.py): every verdict right, both ways round, in-process and
through the worker pool; above all, no wrong answer scores 1."""
import pytest

from bench.verifier_cases import TRICKY, all_cases, response
from twofold.engine.verifier import VerifierPool, extract_answer, is_equivalent
from twofold.engine.verifier.normalize import normalize_with_units


@pytest.mark.parametrize("name", sorted(TRICKY))
def test_each_tricky_class_has_no_false_positive_and_no_false_negative(name):
    cases = TRICKY[name]
    assert {e for _, _, e in cases} == {True, False}, "each class needs matches and near-misses"
    verdicts = [(a, g, e, is_equivalent(extract_answer(response(a)), g)) for a, g, e in cases]
    assert [v for v in verdicts if v[3] and not v[2]] == [], "false positives"
    assert [v for v in verdicts if v[2] and not v[3]] == [], "false negatives"
    # the verdict does not depend on which side is the gold answer
    swapped = [(a, g, e) for a, g, e in cases if "\\boxed" not in a and is_equivalent(g, a) is not e]
    assert swapped == []


def test_the_pool_gives_the_same_verdicts_in_its_workers():
    cases = all_cases()
    with VerifierPool(num_workers=2, timeout=10.0) as pool:
        scores = pool.verify_batch([response(a) for _, a, _, _ in cases], [g for _, _, g, _ in cases])
    assert [(c, a, g) for (c, a, g, e), s in zip(cases, scores) if s != float(e)] == []
    assert pool.stats.timeouts == 0 and pool.stats.errors == 0


@pytest.mark.parametrize("text, units", [
    ("5\\text{ cm}^2", (("cm", 2),)), ("12 square feet", (("foot", 2),)), ("12\\text{ ft}^2", (("foot", 2),)),
    ("3 \\text{ people}", ()), ("7", ()), ("4\\text{ hours}", (("h", 1),)), ("2\\text{ meters}", (("m", 1),)),
])
def test_units_are_recognised_in_every_spelling_and_unknown_words_are_not_compared(text, units):
    assert normalize_with_units(text)[1] == units


def test_the_outermost_and_last_box_is_the_answer_in_linear_time():
    assert extract_answer("\\boxed{2^{\\boxed{3}}}") == "2^{\\boxed{3}}"
    assert extract_answer("\\boxed{1} then \\boxed{2") == "1"  # an unclosed box never counts
    assert extract_answer("\\boxed{\\{1\\}}") == "\\{1\\}"  # escaped braces do not close the box
    assert extract_answer("\\boxed 5 then \\boxed{6}") == "6"
    nested = "\\boxed{" * 20_000 + "1" + "}" * 20_000
    assert extract_answer(nested).startswith("\\boxed{")  # a 20 000-deep nest: one pass, no recursion
