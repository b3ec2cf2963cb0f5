"""Answer extraction, normalisation and the reward functions built on the verifier."""

import time

import pytest

from twofold.engine.verifier import ExtractConfig, binary_reward, extract_answer, format_reward, math_rewards, \
    overlong_penalty
from twofold.engine.verifier.normalize import normalize

EXTRACTION = [
    ("We get \\boxed{5}.", "5"),
    ("First \\boxed{1}, then corrected: \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("nested \\boxed{\\sqrt{\\frac{a}{b}}} end", "\\sqrt{\\frac{a}{b}}"),
    ("\\fbox{7}", "7"),
    ("$\\boxed 42$", "42"),
    ("\\boxed{3} and a truncated \\boxed{\\frac{1}{", "3"),
    ("<think>maybe \\boxed{1}</think> so \\boxed{2}", "2"),
    ("<think>\\boxed{1}</think> The answer is 4.", "4"),
    ("The answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("Final answer: 12\nmore text", "12"),
    ("the final answer is: (1, 2)", "(1, 2)"),
    ("answer: x = 3.5.", "x = 3.5"),
]


@pytest.mark.parametrize("text,expected", EXTRACTION)
def test_extract_answer_takes_the_last_complete_box_or_a_phrase(text, expected):
    start = time.process_time()
    assert extract_answer(text) == expected
    assert time.process_time() - start < 0.1


def test_extract_answer_returns_none_without_a_marked_answer():
    start = time.process_time()
    assert extract_answer("I think it is 7") is None
    assert extract_answer("<think>still thinking \\boxed{3}") is None  # reasoning never finished
    assert extract_answer("\\boxed{unclosed") is None
    assert extract_answer("\\boxedx{3}") is None
    assert extract_answer(None) is None
    assert time.process_time() - start < 0.1


def test_last_number_fallback_only_when_configured():
    start = time.process_time()
    text = "we add 3 and 4 to get 1,234.5 apples"
    assert extract_answer(text) is None
    assert extract_answer(text, ExtractConfig(last_number=True)) == "1,234.5"
    assert extract_answer("ratio 3/4", ExtractConfig(last_number=True)) == "3/4"
    assert extract_answer("so \\boxed{9} (not 10)", ExtractConfig(last_number=True)) == "9"
    assert time.process_time() - start < 0.1


def test_extraction_phrases_and_think_handling_are_configurable():
    start = time.process_time()
    config = ExtractConfig(phrases=("Result =",), after_think=False)
    assert extract_answer("Result = 8", config) == "8"
    assert extract_answer("The answer is 8", config) is None
    assert extract_answer("<think>\\boxed{5}", config) == "5"
    assert time.process_time() - start < 0.1


@pytest.mark.parametrize("raw,expected", [
    ("\\left( 1, 2 \\right]", "( 1, 2 ]"), ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("45^{\\circ}", "45\\degree"),  # for trig arguments
    ("25\\%", "25"), ("\\$1{,}000", "1000"), ("5\\text{ cm}^2", "5"), ("\\text{Monday}", "Monday"),
    ("10.", "10"), ("1 \\text{ or } 2", "1, 2"), ("3\\,\\!", "3"), ("12 square feet", "12"), ("\\(x\\)", "x"),
])
def test_normalize_removes_presentation_but_keeps_the_value(raw, expected):
    start = time.process_time()
    assert normalize(raw) == expected
    assert time.process_time() - start < 0.1


def test_binary_reward_supports_zero_one_and_plus_minus_one():
    start = time.process_time()
    assert [binary_reward(c) for c in (1.0, 0.0, True, False)] == [1.0, 0.0, 1.0, 0.0]
    assert [binary_reward(c, negative=-1.0) for c in (1.0, 0.0)] == [1.0, -1.0]
    assert time.process_time() - start < 0.1


def test_overlong_penalty_follows_dapo_equation_13():
    """L_max = 20, L_cache = 4: free up to 16, linear to -1 at 20, -1 beyond."""
    start = time.process_time()
    assert [overlong_penalty(n, 20, 4) for n in (10, 16, 17, 18, 20, 21, 100)] == \
        [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="cache_length"):
        overlong_penalty(5, 20, 0)
    assert time.process_time() - start < 0.1


def test_math_rewards_add_overlong_shaping_to_correctness():
    start = time.process_time()
    assert math_rewards([1.0, 0.0], negative=-1.0) == [1.0, -1.0]
    assert math_rewards([1.0, 1.0, 0.0], lengths=[10, 18, 30], max_length=20, cache_length=4) == [1.0, 0.5, -1.0]
    with pytest.raises(ValueError, match="lengths"):
        math_rewards([1.0], lengths=[1, 2], max_length=20, cache_length=4)
    assert time.process_time() - start < 0.1


@pytest.mark.parametrize("response,require_think,expected", [
    ("<think>work</think> so \\boxed{3}", True, 1.0),
    ("<think>work</think> no box", True, 0.0),
    ("\\boxed{3}", True, 0.0),
    ("<think>a</think><think>b</think>\\boxed{3}", True, 0.0),
    ("preamble <think>a</think>\\boxed{3}", True, 0.0),
    ("<think>\\boxed{3}</think> no box after", True, 0.0),
    ("\\boxed{3}", False, 1.0),
    ("\\boxed{3", False, 0.0),
])
def test_format_reward_requires_one_leading_think_block_and_a_closed_box(response, require_think, expected):
    start = time.process_time()
    assert format_reward(response, require_think=require_think) == expected
    assert time.process_time() - start < 0.1
