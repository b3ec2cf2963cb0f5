"""bench.tasks, the task suite of bench.algorithms: every error mode yields a wrong answer the verifier can parse,
and the teacher's right traces verify as right, with the project's verifier."""
import random

import pytest

from bench.tasks import (LEVELS, MODES, Problem, error_options, problem_sets, random_problem, sloppy_trace, solve,
                         trace, wrong_trace)
from twofold.engine.verifier import VerifierPool
from twofold.engine.verifier.extract import last_boxed


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(1, 5.0) as p:
        yield p


def test_every_error_mode_gives_a_wrong_parseable_answer_and_right_traces_verify(pool):
    rng = random.Random(0)
    problems = [random_problem(rng, level) for level in LEVELS for _ in range(60)]
    texts, golds, expected, seen, wrong_answers = [], [], [], set(), []
    for p in problems:
        right, boxed = trace(p)
        assert boxed == p.answer and last_boxed(right) == str(p.answer)
        texts.append(right), golds.append(str(p.answer)), expected.append(1.0)
        for mode, at in error_options(p):
            text, wrong = trace(p, mode, at)
            assert wrong != p.answer and last_boxed(text) == str(wrong), (p.prompt, mode, text)
            wrong_answers.append(last_boxed(text))
            texts.append(text), golds.append(str(p.answer)), expected.append(0.0)
            seen.add(mode)
    assert seen == set(MODES)
    assert pool.check_golds(wrong_answers) == [None] * len(wrong_answers)  # every wrong answer parses
    assert pool.verify_batch(texts, golds, timeout=5.0) == expected


def test_a_slip_is_carried_through_the_later_steps():
    p = Problem(55, (("+", 9), ("+", 5), ("+", 2)))
    assert trace(p) == ("55+9=64 64+5=69 69+2=71 \\boxed{71}", 71)
    assert trace(p, "carry", 0) == ("55+9=54 54+5=59 59+2=61 \\boxed{61}", 61)
    assert trace(p, "sign", 1)[0] == "55+9=64 64-5=59 59+2=61 \\boxed{61}"
    assert trace(p, "copy", 2)[0] == "55+9=64 64+5=69 64+2=66 \\boxed{66}"
    assert trace(p, "transcribe")[0] == "55+9=64 64+5=69 69+2=71 \\boxed{17}"
    assert ("carry", 1) not in error_options(p)  # 64+5 does not carry: that slip changes nothing
    with pytest.raises(ValueError, match="borrow"):
        wrong_trace(p, random.Random(0), "borrow")


def test_every_problem_has_a_wrong_trace_and_the_sets_are_disjoint():
    train, held_out = problem_sets(0, 600, 90)
    assert len(train) == 600 and len(held_out) == 90
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    assert {p.level for p in held_out} == set(LEVELS)
    rng = random.Random(1)
    for p in train:
        assert error_options(p) and wrong_trace(p, rng)[1] != p.answer
        assert all(0 <= step[3] <= 99 for step in solve(p))
    slips = [sloppy_trace(p, rng, 0.5)[2] for p in train]
    assert 0.4 < sum(s is not None for s in slips) / len(slips) < 0.6
