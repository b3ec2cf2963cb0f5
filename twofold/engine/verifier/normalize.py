"""String normalisation of answers before parsing: plain `str` operations only, nothing is evaluated."""

from __future__ import annotations

import re
import unicodedata

from twofold.engine.verifier.extract import _matching_brace

# Unicode super/subscripts and vulgar fractions are rewritten before NFKC, which would fold `x⁴` into `x4` (4x),
# `10⁶` into `106`, `x₂` into `x2` and `3½` into `31/2`.
_SCRIPTS = {"<super>": "^", "<sub>": "_"}
_UNICODE_MATH = {
    "\u2212": "-", "\u2013": "-", "\u00b0": "\\degree ", "\u00d7": "\\times ", "\u00f7": "\\div ", "\u00b7": "\\cdot ",
    "\u22c5": "\\cdot ", "\u03c0": "\\pi ", "\u221e": "\\infty ", "\u221a": "\\sqrt ", "\u2264": "\\le ",
    "\u2265": "\\ge ", "\u2260": "\\ne ", "\u222a": "\\cup ", "\u2208": "\\in ", "\u2044": "/",
}
_TEXT_COMMANDS = ("\\text", "\\textrm", "\\textit", "\\textbf", "\\mbox", "\\mathrm", "\\textnormal", "\\textsf",
                  "\\texttt", "\\emph")
_UNWRAP_COMMANDS = ("\\boxed", "\\fbox", "\\mathbf", "\\displaystyle", "\\bm", "\\mathit", "\\mathsf", "\\mathtt",
                    "\\boldsymbol", "\\underline", "\\operatorname", "\\textstyle", "\\scriptstyle")
# Commands whose first argument is not part of the value: a colour, or something invisible (`\\phantom{1}2` is 2).
_DROP_WITH_ARGUMENT = ("\\textcolor", "\\colorbox", "\\color", "\\phantom", "\\hphantom", "\\vphantom", "\\hspace",
                       "\\vspace")
# Number words that scale the value: never dropped as units (`5 million` is not 5).
_SCALES = {"hundred": "100", "thousand": "1000", "million": "10^{6}", "billion": "10^{9}", "trillion": "10^{12}",
           "dozen": "12"}
_SCALE_RE = re.compile(rf"(?<=[\d}}]) ?({'|'.join(_SCALES)})s?(?![A-Za-z])")
_UNITS = (
    "cm", "km", "mm", "in", "inch", "inches", "ft", "foot", "feet", "yd", "yard", "yards", "mile", "miles",
    "meter", "meters", "centimeter", "centimeters", "unit", "units", "sq", "square", "cubic", "kg", "gram",
    "grams", "sec", "second", "seconds", "min", "minute", "minutes", "hour", "hours", "day", "days",
    "dollar", "dollars", "cent", "cents", "mph", "degree", "degrees", "radian", "radians", "liter", "liters",
    "people", "students", "ways", "times", "percent", "percentage", "pct",
)
_UNIT_WORDS = "|".join(sorted(_UNITS, key=len, reverse=True))
# Single letters (m, g, s) are left out: `2 m` is more often a product than a length.
_UNIT = rf"(?:{_UNIT_WORDS})(?: ?\^\{{?[23]\}}?)?"
_TRAILING_UNITS_RE = re.compile(rf"(?<=[\d}}]) {_UNIT}(?: {_UNIT})*$")
_REPLACEMENTS = (
    ("\\left.", ""), ("\\right.", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"),
    ("\\dbinom", "\\binom"), ("\\tbinom", "\\binom"), ("^{\\circ}", "\\degree "), ("^\\circ", "\\degree "),
    ("\\circ", "\\degree "), ("\\%", ""), ("%", ""), ("\\$", ""), ("$", ""), ("{,}", ""), ("\\lvert", "|"),
    ("\\rvert", "|"), ("\\vert", "|"), ("\\lbrace", "\\{"), ("\\rbrace", "\\}"), ("\\leqslant", "\\le"),
    ("\\geqslant", "\\ge"), ("\\infin", "\\infty"),
)
_SIZING_RE = re.compile(r"\\(?:left|right|[bB]igg?[lr]?)(?![A-Za-z])")
_SPACING_RE = re.compile(r"(?<!\\)\\[,;:! ]|\\q?quad(?![A-Za-z])|~")  # not the `\\` row break
_WORD_SEPARATOR_RE = re.compile(r"\s+(?:and|or)\s+|;")
_THIN_THOUSANDS_RE = re.compile(r"(?<=\d),\\!\s*(?=\d{3}(?!\d))")  # `11,\! 111`: a comma kept tight is a separator
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SPACED_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?: \d{3})+(?:\.\d+)?")
_MIXED_NUMBER_RE = re.compile(r"(-?\d+) (\d+)/(\d+)")


def normalize(answer: str) -> str:
    """Canonical spelling of an answer: delimiters, sizing, spacing, units and percent removed (degrees become
    `\\degree`, which the parser reads as pi/180 inside a trigonometric argument and drops elsewhere)."""
    return normalize_with_units(answer)[0]


def normalize_with_units(answer: str) -> tuple[str, tuple]:
    """`normalize(answer)` and the units it dropped, as sorted (unit, power) pairs of the units it knows
    (`5 \\text{ cm}^2` -> (("cm", 2),)); words it does not know (`people`, `ways`) are dropped but not compared."""
    s = _scripts(answer)
    s = unicodedata.normalize("NFKC", s)
    for old, new in _UNICODE_MATH.items():
        s = s.replace(old, new)
    s = _strip_math_delimiters(s.strip())
    s = _THIN_THOUSANDS_RE.sub(",", s)
    for old, new in _REPLACEMENTS:
        s = s.replace(old, new)
    s = _SIZING_RE.sub("", s)
    s = _SPACING_RE.sub(" ", s)
    for command in _DROP_WITH_ARGUMENT:
        s = _unwrap(s, command, drop=True)
    for command in _UNWRAP_COMMANDS:
        s = _unwrap(s, command)
    s, units = _drop_text(s)
    s = re.sub(r"\s+", " ", s).strip()
    s = _SCALE_RE.sub(lambda m: f" \\times {_SCALES[m[1]]}", s).strip()
    trailing = _TRAILING_UNITS_RE.search(s)
    if trailing:
        s, units = s[:trailing.start()].strip(), units + [trailing[0]]
    s = _WORD_SEPARATOR_RE.sub(", ", s).strip()
    return _numeric_spelling(s.rstrip(". ").strip()), unit_key(" ".join(units))


def _scripts(s: str) -> str:
    """Runs of superscript (subscript) characters as `^{...}` (`_{...}`), vulgar fractions as `\\frac{p}{q}`."""
    out, run, kind = [], [], None
    for c in s + "\0":
        decomposition = unicodedata.decomposition(c)
        tag, _, codes = decomposition.partition(" ")
        script = _SCRIPTS.get(tag)
        if script != kind and run:
            out.append(f"{kind}{{{''.join(run)}}}")
            run = []
        kind = script
        if script:
            run.append(chr(int(codes, 16)))
        elif tag == "<fraction>":
            numerator, _, denominator = unicodedata.normalize("NFKC", c).partition("\u2044")
            out.append(f"\\frac{{{numerator}}}{{{denominator}}}" if denominator else c)
        else:
            out.append(c)
    return "".join(out)[:-1]


_UNIT_ALIASES = {
    "in": "inch", "inch": "inch", "inches": "inch", "ft": "foot", "foot": "foot", "feet": "foot", "yd": "yard",
    "mi": "mile", "m": "m", "meter": "m", "metre": "m", "mm": "mm", "millimeter": "mm", "cm": "cm",
    "centimeter": "cm", "km": "km", "kilometer": "km", "g": "g", "gram": "g", "kg": "kg", "kilogram": "kg",
    "mg": "mg", "s": "s", "sec": "s", "second": "s", "min": "min", "minute": "min", "h": "h", "hr": "h",
    "hour": "h", "l": "l", "liter": "l", "litre": "l", "ml": "ml", "milliliter": "ml", "rad": "radian",
    **{word: word for word in ("yard", "mile", "day", "week", "year", "dollar", "cent", "degree", "radian", "mph")},
}
_POWER_WORDS = {"sq": 2, "square": 2, "cubic": 3}


def unit_key(text: str) -> tuple:
    """Sorted (unit, power) pairs of the known units in `text`: `square feet` and `ft^2` are both (("foot", 2),)."""
    pairs, power = [], 1
    for token in re.findall(r"[A-Za-z]+|\^\{?[23]", text):
        word = token.lower()
        if token.startswith("^"):
            if pairs:
                pairs[-1] = (pairs[-1][0], int(token[-1]))
        elif word in _POWER_WORDS:
            power = _POWER_WORDS[word]
        else:
            unit = _UNIT_ALIASES.get(word) or (_UNIT_ALIASES.get(word[:-1]) if len(word) > 3 and word.endswith("s")
                                               else None)
            if unit:
                pairs.append((unit, power))
            power = 1
    return tuple(sorted(pairs))


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


def _unwrap(s: str, command: str, drop: bool = False) -> str:
    """Replace every `\\command{X}` by `X` (by nothing if `drop`); a bare `\\command` (no group) is dropped."""
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
            s = s[:start] + ("" if drop else s[end + 1:close]) + s[close + 1:]
        else:
            s = s[:start] + s[end:]
        start = s.find(command, start)
    return s


def _drop_text(s: str) -> tuple[str, list[str]]:
    """`\\text{...}` after some math is a unit and goes (returned); elsewhere (`\\text{Monday}`, `\\text{ and }`,
    `\\text{ million}`) it is unwrapped."""
    units = []
    for command in _TEXT_COMMANDS:
        start = s.find(command + "{")
        while start >= 0:
            open_at = start + len(command)
            close = _matching_brace(s, open_at, len(s))
            if close < 0:
                break
            content = s[open_at + 1:close]
            is_unit = s[:start].strip() and re.fullmatch(r"\s*[A-Za-z][A-Za-z .]*", content) \
                and content.strip() not in ("and", "or") and content.strip().lower().rstrip("s") not in _SCALES
            tail = re.match(r"\s*\^\{?[23]\}?", s[close + 1:]) if is_unit else None
            skip = close + 1 + (tail.end() if tail else 0)
            if is_unit:
                units.append(content + (tail[0].strip() if tail else ""))
            s = s[:start] + ("" if is_unit else f" {content} ") + s[skip:]
            start = s.find(command + "{", start)
    return s, units


def _numeric_spelling(s: str) -> str:
    """Thousands separators (`1,000`, `1 000`) and spaced mixed numbers (`2 1/2`)."""
    if _THOUSANDS_RE.fullmatch(s) or _SPACED_THOUSANDS_RE.fullmatch(s):
        return s.replace(",", "").replace(" ", "")
    mixed = _MIXED_NUMBER_RE.fullmatch(s)
    return f"{mixed[1]}\\frac{{{mixed[2]}}}{{{mixed[3]}}}" if mixed else s
