"""Hostile model output: nothing it contains is executed, and every call returns quickly.

Each hazard is its own test with a wall-clock bound. Code execution is ruled out twice: a planted
file that the payloads try to create never appears, and a Python audit hook (in a fresh process,
since hooks cannot be removed) records no exec/compile/process-spawn/file-write event while the
payloads are verified.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twofold.engine.verifier import ParseError, VerifierPool, extract_answer, is_equivalent
from twofold.engine.verifier.parser import parse

REPO = Path(__file__).resolve().parents[1]
PAYLOADS = [
    "__import__('os').system('touch {path}')",
    "exec(\"open('{path}', 'w')\")",
    "eval(compile('open(\"{path}\", \"w\")', 'x', 'exec'))",
    "lambda: open('{path}', 'w')",
    "[c for c in ().__class__.__bases__[0].__subclasses__()]",
    "x.__class__.__init__.__globals__['os'].system('touch {path}')",
    "import os; os.system('touch {path}')",
    "__builtins__['open']('{path}', 'w')",
    "sympify(\"__import__('os').system('touch {path}')\")",
    "Symbol('x').__class__",
    "S('__import__(\"os\").system(\"touch {path}\")')",
    "\uff45\uff56\uff41\uff4c(\"__import__('os').system('touch {path}')\")",  # fullwidth: NFKC gives `eval`
    "\\input{{{path}}}",
    "\\immediate\\write18{{touch {path}}}",
    "\\newcommand{{\\x}}{{\\input{{{path}}}}}\\x",
    "$(touch {path})",
    "`touch {path}`",
    "1; touch {path}",
    "{{{{ ''.__class__.__mro__[1].__subclasses__() }}}}",
    "cos\nsystem\n(S'touch {path}'\ntR.",  # a protocol-0 pickle
]
AUDIT_SCRIPT = r"""
import json, os, sys
events, armed = [], False
def hook(event, args):
    if not armed:
        return
    writes = event == "open" and (any(c in str(args[1] or "") for c in "wax+") or (args[2] or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    if writes or event in ("exec", "compile", "os.system", "subprocess.Popen", "os.posix_spawn", "os.exec", "os.fork"):
        events.append(event)
sys.addaudithook(hook)
from twofold.engine.verifier import extract_answer, is_equivalent
is_equivalent("\\sqrt{8}", "2\\sqrt2"), is_equivalent("x^2-1", "(x-1)(x+1)")  # warm sympy's lazy paths
payloads = json.loads(sys.stdin.read())
armed = True
verdicts = [is_equivalent(p, "0") or is_equivalent(extract_answer("\\boxed{" + p + "}") or p, "x") for p in payloads]
armed = False
seen, events[:] = list(events), []
armed = True
eval("1 + 1")  # positive control: the hook does see an eval
armed = False
print(json.dumps({"events": seen, "control": events, "verdicts": verdicts}))
"""


def _payloads(path: Path) -> list[str]:
    return [p.format(path=path) for p in PAYLOADS]


def test_injection_payloads_trigger_no_exec_compile_spawn_or_write(tmp_path):
    start = time.monotonic()
    planted = tmp_path / "pwned"
    result = subprocess.run([sys.executable, "-c", AUDIT_SCRIPT], input=json.dumps(_payloads(planted)),
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["events"] == []
    assert "exec" in report["control"] or "compile" in report["control"]
    assert report["verdicts"] == [False] * len(PAYLOADS)
    assert not planted.exists()
    assert time.monotonic() - start < 30


def test_injection_payloads_are_parse_errors(tmp_path):
    start = time.monotonic()
    for payload in _payloads(tmp_path / "pwned"):
        with pytest.raises(ParseError):
            parse(payload)
    assert time.monotonic() - start < 2


def test_injection_payloads_through_the_pool_score_zero_and_create_nothing(tmp_path):
    start = time.monotonic()
    planted = tmp_path / "pwned"
    responses = [f"Final: \\boxed{{{p}}}" for p in _payloads(planted)]
    with VerifierPool(num_workers=1, timeout=3.0) as pool:
        scores = pool.verify_batch(responses, ["0"] * len(responses))
    assert scores == [0.0] * len(responses)
    assert not planted.exists()
    assert time.monotonic() - start < 20


HUGE = [
    "9^{9^{9^9}}", "10^{10^{100}}", "2^{2^{2^{2^{2^{2}}}}}", "(10^{100})!", "1000000!", "4!!!",
    "\\binom{10^{9}}{5\\cdot10^8}", "\\binom{x}{10^{9}}", "x^{10^{9}}", "(x+1)^{10^{6}}", "x^{x^{x^{x}}}",
    "e^{e^{e^{e^{100}}}}", "\\exp(\\exp(\\exp(\\exp(100))))", "\\cosh(\\cosh(\\cosh(100)))", "\\sin(10^{300})",
    "\\sqrt{2}^{10^{9}}", "\\pi^{10^{10}}", "i^{10^{20}}", "(2^{60000})^{2}", "\\sqrt[10^{30}]{2}", "1.5e99999",
]


@pytest.mark.parametrize("hazard", HUGE)
def test_towers_factorials_and_huge_powers_are_refused_fast(hazard):
    start = time.monotonic()
    with pytest.raises(ParseError):
        parse(hazard)
    assert is_equivalent(hazard, "1") is False
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("bounded", ["2^{50000}", "x^{x^{x}}", "\\binom{100}{50}", "1000!", "(x+y+z)^{100}"])
def test_large_but_bounded_values_still_parse_quickly(bounded):
    start = time.monotonic()
    assert is_equivalent(bounded, bounded.replace(" ", "") + "+0")
    assert time.monotonic() - start < 2.0


NESTED = {
    "parentheses": "(" * 10_000 + "1" + ")" * 10_000,
    "fractions": "\\frac{" * 500 + "1" + "}{2}" * 500,
    "braces": "{" * 100_000,
    "roots": "\\sqrt{" * 1000 + "2" + "}" * 1000,
    "minus_signs": "-" * 900 + "1",
    "exponent_chain": "2^" * 500 + "2",
    "absolute_bars": "|" * 1000,
    "sets": "\\{" * 300 + "1" + "\\}" * 300,
}


@pytest.mark.parametrize("name", sorted(NESTED))
def test_deep_nesting_is_a_parse_error_not_a_recursion_error(name):
    start = time.monotonic()
    with pytest.raises(ParseError):
        parse(NESTED[name])
    assert time.monotonic() - start < 1.0


def test_megabyte_responses_are_extracted_in_linear_time():
    start = time.monotonic()
    assert extract_answer("a" * 1_000_000 + " so \\boxed{3}") == "3"
    assert extract_answer("\\boxed{" * 200_000) is None  # each unclosed box bounds the scan of the earlier ones
    assert extract_answer("\\boxed{" + "{" * 1_000_000) is None
    assert extract_answer("}" * 1_000_000 + "\\boxed{1}") == "1"
    assert extract_answer("x" * 1_000_000 + "The answer is 5.") == "5"
    assert extract_answer("The answer is 5. " + "9" * 1_000_000) is None  # only the tail is searched
    assert time.monotonic() - start < 1.5


def test_megabyte_answers_are_rejected_by_length_before_any_parsing():
    start = time.monotonic()
    assert not is_equivalent("1" * 1_000_000, "1")
    assert not is_equivalent("x+" * 500_000 + "1", "1")
    with pytest.raises(ParseError):
        parse("1" * 5000)  # too many digits for one literal
    assert time.monotonic() - start < 1.0


def test_megabyte_response_through_the_pool_is_scored_within_the_timeout():
    start = time.monotonic()
    with VerifierPool(num_workers=1, timeout=2.0) as pool:
        scores = pool.verify_batch(["x" * 1_000_000 + "\\boxed{\\frac{1}{2}}", "\\boxed{" + "1" * 1_000_000 + "}"],
                                   ["0.5", "1"])
    assert scores == [1.0, 0.0]
    assert pool.stats.no_answer == 1  # the 1 MB box exceeds MAX_ANSWER_CHARS and never reaches a worker
    assert time.monotonic() - start < 10


LOOKALIKES = [
    ("\u0445+1", "x+1", False),   # Cyrillic ha
    ("\u0417", "3", False),       # Cyrillic Ze
    ("\u03bf", "o", False),       # Greek omicron
    ("1\u200b2", "12", False),    # zero-width space
    ("\u202e21", "12", False),    # right-to-left override
    ("3\u0338", "3", False),      # combining long solidus
    ("\u216b", "12", False),      # Roman numeral twelve: NFKC gives the letters XII
    ("\uff11\uff12", "12", True),  # fullwidth digits: NFKC gives the same number
    ("\U0001d7d1", "3", True),    # mathematical bold digit three
]


@pytest.mark.parametrize("answer,gold,expected", LOOKALIKES)
def test_unicode_lookalikes_are_not_confused_with_ascii(answer, gold, expected):
    start = time.monotonic()
    assert is_equivalent(answer, gold) is expected
    assert time.monotonic() - start < 0.5


@pytest.mark.parametrize("answer,gold", [("\\frac{1}{0}", "\\infty"), ("\\frac{0}{0}", "1"), ("\\log 0", "-\\infty"),
                                         ("\\tan(\\pi/2)", "\\infty"), ("0^{-1}", "1")])
def test_undefined_values_never_match(answer, gold):
    start = time.monotonic()
    assert not is_equivalent(answer, gold)
    assert time.monotonic() - start < 0.5
