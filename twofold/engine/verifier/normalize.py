"""String normalisation of answers before parsing: plain `str` operations only, nothing is evaluated."""

from __future__ import annotations

import re
import unicodedata

from twofold.engine.verifier.extract import _matching_brace

# Superscripts must be mapped before NFKC, which would turn `x²` into `x2`.
_SUPERSCRIPTS = {"\u00b2": "^2", "\u00b3": "^3", "\u00b9": "^1"}
_UNICODE_MATH = {
    "\u2212": "-", "\u2013": "-", "\u00d7": "\\times ", "\u00f7": "\\div ", "\u00b7": "\\cdot ",
    "\u22c5": "\\cdot ", "\u03c0": "\\pi ", "\u221e": "\\infty ", "\u221a": "\\sqrt ", "\u2264": "\\le ",
    "\u2265": "\\ge ", "\u2260": "\\ne ", "\u222a": "\\cup ", "\u2208": "\\in ", "\u2044": "/", "\u00b0": "",
}
_TEXT_COMMANDS = ("\\text", "\\textrm", "\\textit", "\\textbf", "\\mbox", "\\mathrm", "\\textnormal")
_UNWRAP_COMMANDS = ("\\boxed", "\\fbox", "\\mathbf", "\\displaystyle", "\\bm", "\\mathit")
_UNITS = (
    "cm", "km", "mm", "in", "inch", "inches", "ft", "foot", "feet", "yd", "yard", "yards", "mile", "miles",
    "meter", "meters", "centimeter", "centimeters", "unit", "units", "sq", "square", "cubic", "kg", "gram",
    "grams", "sec", "second", "seconds", "min", "minute", "minutes", "hour", "hours", "day", "days",
    "dollar", "dollars", "cent", "cents", "mph", "degree", "degrees", "radian", "radians", "liter", "liters",
    "people", "students", "ways", "times",
)
_UNIT_WORDS = "|".join(sorted(_UNITS, key=len, reverse=True))
# Single letters (m, g, s) are left out: `2 m` is more often a product than a length.
_UNIT = rf"(?:{_UNIT_WORDS})(?: ?\^\{{?[23]\}}?)?"
_TRAILING_UNITS_RE = re.compile(rf"(?<=[\d}}]) {_UNIT}(?: {_UNIT})*$")
_REPLACEMENTS = (
    ("\\left.", ""), ("\\right.", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"),
    ("\\dbinom", "\\binom"), ("\\tbinom", "\\binom"), ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""),
    ("\\degree", ""), ("\\%", ""), ("%", ""), ("\\$", ""), ("$", ""), ("{,}", ""), ("\\lvert", "|"),
    ("\\rvert", "|"), ("\\vert", "|"), ("\\lbrace", "\\{"), ("\\rbrace", "\\}"), ("\\leqslant", "\\le"),
    ("\\geqslant", "\\ge"), ("\\infin", "\\infty"),
)
_SIZING_RE = re.compile(r"\\(?:left|right|[bB]igg?[lr]?)(?![A-Za-z])")
_SPACING_RE = re.compile(r"(?<!\\)\\[,;:! ]|\\q?quad(?![A-Za-z])|~")  # not the `\\` row break
_WORD_SEPARATOR_RE = re.compile(r"\s+(?:and|or)\s+|;")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SPACED_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?: \d{3})+(?:\.\d+)?")
_MIXED_NUMBER_RE = re.compile(r"(-?\d+) (\d+)/(\d+)")


def normalize(answer: str) -> str:
    """Canonical spelling of an answer: delimiters, sizing, spacing, units, degrees and percent removed."""
    s = "".join(_SUPERSCRIPTS.get(c, c) for c in answer)
    s = unicodedata.normalize("NFKC", s)
    for old, new in _UNICODE_MATH.items():
        s = s.replace(old, new)
    s = _strip_math_delimiters(s.strip())
    for old, new in _REPLACEMENTS:
        s = s.replace(old, new)
    s = _SIZING_RE.sub("", s)
    s = _SPACING_RE.sub(" ", s)
    for command in _UNWRAP_COMMANDS:
        s = _unwrap(s, command)
    s = _drop_text(s)
    s = re.sub(r"\s+", " ", s).strip()
    s = _TRAILING_UNITS_RE.sub("", s).strip()
    s = _WORD_SEPARATOR_RE.sub(", ", s).strip()
    return _numeric_spelling(s.rstrip(". ").strip())


def text_key(s: str) -> str:
    """Key for the last-resort string comparison of answers the parser cannot read (words, choices)."""
    s = re.sub(r"(?<!\w) | (?!\w)", "", s).lower()  # `1 2` must stay apart from `12`
    if len(s) == 3 and s[0] == "(" and s[2] == ")":
        s = s[1]  # "(A)" and "A" name the same choice
    return s


def _strip_math_delimiters(s: str) -> str:
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right):
            s = s[len(left):-len(right)].strip()
    return s


def _unwrap(s: str, command: str) -> str:
    """Replace every `\\command{X}` by `X`; a bare `\\command` (no group) is dropped."""
    start = s.find(command)
    while start >= 0:
        end = start + len(command)
        if end < len(s) and s[end].isalpha():
            start = s.find(command, end)
            continue
        if end < len(s) and s[end] == "{":
            close = _matching_brace(s, end, len(s))
            if close < 0:
                return s
            s = s[:start] + s[end + 1:close] + s[close + 1:]
        else:
            s = s[:start] + s[end:]
        start = s.find(command, start)
    return s


def _drop_text(s: str) -> str:
    """`\\text{...}` after some math is a unit and goes; elsewhere (`\\text{Monday}`, `\\text{ and }`) it is unwrapped."""
    for command in _TEXT_COMMANDS:
        start = s.find(command + "{")
        while start >= 0:
            open_at = start + len(command)
            close = _matching_brace(s, open_at, len(s))
            if close < 0:
                break
            content = s[open_at + 1:close]
            is_unit = s[:start].strip() and re.fullmatch(r"\s*[A-Za-z][A-Za-z .]*", content) \
                and content.strip() not in ("and", "or")
            tail = re.match(r"\s*\^\{?[23]\}?", s[close + 1:]) if is_unit else None
            skip = close + 1 + (tail.end() if tail else 0)
            s = s[:start] + ("" if is_unit else f" {content} ") + s[skip:]
            start = s.find(command + "{", start)
    return s


def _numeric_spelling(s: str) -> str:
    """Thousands separators (`1,000`, `1 000`) and spaced mixed numbers (`2 1/2`)."""
    if _THOUSANDS_RE.fullmatch(s) or _SPACED_THOUSANDS_RE.fullmatch(s):
        return s.replace(",", "").replace(" ", "")
    mixed = _MIXED_NUMBER_RE.fullmatch(s)
    return f"{mixed[1]}\\frac{{{mixed[2]}}}{{{mixed[3]}}}" if mixed else s
