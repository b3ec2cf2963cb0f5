"""Answer equivalence: normalise, parse into sympy objects, compare by kind.

Scalars: equal if structurally equal after sympy's automatic canonicalisation. Otherwise both sides
are evaluated to 50 digits (at three sample points per free symbol, one of them negative); a clear
difference proves inequality. Equality is then decided exactly by `cancel` when the difference is a
rational function with rational coefficients (integers, decimals, fractions, polynomials). With
radicals, pi, e or functions, zero-testing is undecidable in general (Richardson), so agreement to
`RTOL` (35 significant digits) at every sample point is accepted; `simplify` is used only when a
value does not evaluate to a number.

Agreement is relative, never absolute: a value evalf tells apart from zero (pi * 10^-50) never equals
zero. A decimal is the exact number it spells: when one side is written with a decimal point, digits
agreeing with an irrational value are not enough (3.14159265358979323846264338327950288 is not pi) and
only `simplify` can prove equality, unless the caller passes `numeric_tolerance` (relative), under
which a decimal equals any value it matches to that tolerance.
"""

from __future__ import annotations

import contextvars

import sympy

from twofold.engine.verifier.normalize import normalize, normalize_with_units, text_key
from twofold.engine.verifier.parser import Matrix, ParseError, Rel, Seq, parse, to_set, tokenize

MAX_ANSWER_CHARS = 1000
PRECISION = 50  # digits for numeric comparison
RTOL = sympy.Float(10) ** -35
PROOF_DIGITS = 1000
"""Least working precision (digits) for evaluating the difference of two values that agree to RTOL: a difference
that is not zero comes back from evalf with full precision (sqrt(2) * 10^-40 is told apart from 0), a true zero as
a value evalf cannot separate from zero. Raised to 4x the digits of the numbers written in the answers, so that a
perturbation (cos(10^-1000) - 1 is about 10^-2000) stays visible; past MAX_PROOF_DIGITS no verdict of equality is
given."""
MAX_PROOF_DIGITS = 40_000
# Sample values per free symbol; symbol k adds k/13 so distinct symbols never coincide.
_SAMPLES = (sympy.Rational(7, 11), sympy.Rational(-13, 7), sympy.Rational(23, 9))
_SPECIAL = (sympy.oo, -sympy.oo, sympy.zoo, sympy.nan)
_FLIP = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "=": "=", "!=": "!="}
# Set for one comparison by is_equivalent: whether a side is written with decimals, and the caller's tolerance.
_DECIMALS: contextvars.ContextVar[bool] = contextvars.ContextVar("decimals", default=False)
_TOLERANCE: contextvars.ContextVar[float] = contextvars.ContextVar("numeric_tolerance", default=0.0)


def is_equivalent(answer: str | None, gold: str, numeric_tolerance: float = 0.0) -> bool:
    """True when `answer` names the same mathematical object as `gold` (gold decides tuple vs interval).
    `numeric_tolerance` > 0 (relative, e.g. 1e-6) lets a decimal equal an irrational value it approximates."""
    if not answer or not gold or max(len(answer), len(gold)) > MAX_ANSWER_CHARS:
        return False
    (a, units_a), (g, units_g) = normalize_with_units(answer), normalize_with_units(gold)
    if not a or (units_a and units_g and units_a != units_g):
        return False  # `5 cm` is not `5 m`; units are not converted (`50 mm` is not `5 cm` either)
    if text_key(a) == text_key(g):
        return True
    decimals, tolerance = _DECIMALS.set(_has_decimal(a) or _has_decimal(g)), _TOLERANCE.set(numeric_tolerance)
    try:
        return same(parse_answer(a), parse_answer(g))
    except ParseError:
        return False
    except Exception:  # noqa: BLE001  sympy raises many types on odd input; none of them means "equal"
        return False
    finally:
        _DECIMALS.reset(decimals)
        _TOLERANCE.reset(tolerance)


def _has_decimal(text: str) -> bool:
    try:
        return any(kind == "num" and ("." in value or "e" in value.lower()) for kind, value in tokenize(text))
    except ParseError:
        return False


def gold_parses(_answer, gold: str) -> float:
    """1.0 when the verifier can compare anything with this gold answer (run in a worker: parsing is bounded
    but may still be slow, and the pool's timeout applies)."""
    text = normalize(gold)
    if not text or len(gold) > MAX_ANSWER_CHARS:
        return 0.0
    try:
        parse_answer(text)
    except ParseError:
        return 0.0
    return 1.0


def parse_answer(text: str):
    """Parse a normalised answer; a single `\\pm` makes the two-element answer {a+b, a-b}."""
    for sign in ("\\pm", "\\mp"):
        if text.count(sign) == 1 and "," not in text:
            return Seq((parse(text.replace(sign, "+")), parse(text.replace(sign, "-"))), "", "")
    return parse(text)


def same(answer, gold) -> bool:
    tuple_a, tuple_g = _as_tuple(answer, gold), _as_tuple(gold, answer)
    if tuple_a is None or tuple_g is None:
        return False
    # assignments to distinct variables name a tuple: a bare list on the other side is then read in order too
    converted_a, converted_g = tuple_a is not answer, tuple_g is not gold
    answer = tuple_a if converted_a else _ordered(answer) if converted_g else answer
    gold = tuple_g if converted_g else _ordered(gold) if converted_a else gold
    answer, gold = _drop_label(answer, gold), _drop_label(gold, answer)
    answer_set, gold_set = _as_set(answer, gold), _as_set(gold, answer)
    if answer_set is not None and gold_set is not None:
        return same_set(answer_set, gold_set)
    if (answer_set is not None or gold_set is not None) and not (isinstance(answer, Rel) and isinstance(gold, Rel)):
        return False  # a set is not a number, a tuple or a list: `1, 2` is not the interval [1, 2]
    if isinstance(answer, (Seq, Matrix)) or isinstance(gold, (Seq, Matrix)):
        return same_sequence(answer, gold)
    if isinstance(answer, Rel) and isinstance(gold, Rel):
        return same_relation(answer, gold)
    if isinstance(answer, sympy.Expr) and isinstance(gold, sympy.Expr):
        return same_scalar(answer, gold)
    return False


def _assignment(value):
    """(symbol, value) for `x = 3` or `3 = x` (a bare symbol on one side, none of it on the other), else None."""
    if not (isinstance(value, Rel) and value.ops == ("=",)):
        return None
    for symbol, other in (value.exprs, value.exprs[::-1]):
        if isinstance(symbol, sympy.Symbol) and symbol not in other.free_symbols:
            return symbol, other
    return None


def _as_tuple(value, other):
    """Assignments answering a tuple: `y = 4, x = 3` is the tuple (3, 4), its variables in alphabetical order, the
    convention of (x, y), (a, b, c) and (r, theta) answers. Against an ordered tuple or vector a repeated variable
    is no match (None: `x = 3, x = 3` lists solutions of x); against a bare list it stays a list of solutions."""
    ordered = (isinstance(other, Seq) and other.open in ("(", "[")) or (isinstance(other, Matrix) and
                                                                        _items(other) is not None)
    bare = isinstance(other, Seq) and other.open == "" and not _has_equation(other)
    if not ((ordered or bare) and isinstance(value, Seq) and value.open == ""):
        return value
    pairs = [_assignment(item) for item in value.items]
    if any(p is None for p in pairs) or len(pairs) != len(_items(other)):
        return value
    if len({symbol for symbol, _ in pairs}) != len(pairs):
        return None if ordered else value
    return Seq(tuple(v for _, v in sorted(pairs, key=lambda p: str(p[0]))), "(", ")")


def _ordered(value):
    """A bare list read as a tuple."""
    return Seq(value.items, "(", ")") if isinstance(value, Seq) and value.open == "" else value


def _drop_label(value, other):
    """`x = 3` (or `3 = x`) answers a question whose gold is `3`: drop `symbol =` unless the other side has
    equations too."""
    if _has_equation(other):
        return value
    if isinstance(value, Seq):
        return Seq(tuple(_drop_label(item, other) for item in value.items), value.open, value.close)
    pair = _assignment(value)
    return value if pair is None else pair[1]


def _has_equation(value) -> bool:
    if isinstance(value, Seq):
        return any(_has_equation(item) for item in value.items)
    return isinstance(value, Rel) and "=" in value.ops


def _as_set(value, other):
    """The value as a sympy Set when it denotes one: a Set, an inequality in one variable, `[a, b]`, `(a, b]` and
    `[a, b)` with a < b; `(a, b)` (else an ordered pair) and `\\{...\\}` (else compared as an unordered list) only
    next to one of those."""
    if isinstance(value, sympy.Set):
        return value
    if isinstance(value, Rel):
        return _inequality_set(value)
    if _is_pair(value) and ((value.open, value.close) != ("(", ")") or _is_proper_set(other)):
        return _try_set(value)
    if isinstance(value, Seq) and value.open == "{" and (_is_proper_set(other) or _holds_a_set(value)):
        return _try_set(value)
    if isinstance(value, Seq) and value.open == "" and all(_as_set(item, None) is not None for item in value.items):
        return sympy.Union(*(_as_set(item, None) for item in value.items))  # `x<-1, x>1`
    return None


def _is_proper_set(value) -> bool:
    """A value that is a set whatever it is compared with."""
    return isinstance(value, sympy.Set) or (isinstance(value, Rel) and _inequality_set(value) is not None) \
        or (_is_pair(value) and (value.open, value.close) != ("(", ")") and _try_set(value) is not None)


def _holds_a_set(value: Seq) -> bool:
    return any(isinstance(item, sympy.Set) for item in value.items)  # `\\{\\emptyset\\}` is no list of numbers


def _try_set(value):
    try:
        return to_set(value)
    except ParseError:
        return None


def _is_pair(value) -> bool:
    """Two items in round or square brackets: an interval, or (only with `(`...`)`) an ordered pair."""
    return isinstance(value, Seq) and len(value.items) == 2 and value.open in ("(", "[")


def _inequality_set(rel: Rel):
    """`1 < x <= 2`, `x > 3`, `3 < x`: a chain of inequalities in one bare symbol, as an interval; `x \\neq c` and
    `|x - a| < c` (any of < <= > >=) as the sets they solve to. Nothing else is solved: `x^2 < 4` restates a
    problem, it does not answer it."""
    if len(rel.ops) == 1:
        special = _not_equal_set(rel) if rel.ops[0] == "!=" else _absolute_set(rel)
        if special is not None:
            return special
    symbols = [e for e in rel.exprs if e.free_symbols]
    if "=" in rel.ops or "!=" in rel.ops or len(symbols) != 1 or not isinstance(symbols[0], sympy.Symbol):
        return None
    at = rel.exprs.index(symbols[0])
    interval = sympy.Interval(-sympy.oo, sympy.oo)
    for k, op in enumerate(rel.ops):
        if k + 1 == at:  # constant op symbol: read it as symbol op' constant
            op, bound = _FLIP[op], rel.exprs[k]
        elif k == at:
            bound = rel.exprs[k + 1]
        else:
            return None
        lower = op in (">", ">=")
        piece = sympy.Interval(bound if lower else -sympy.oo, sympy.oo if lower else bound,
                               op == ">", op == "<")
        interval = interval.intersect(piece)
    return interval


def _not_equal_set(rel: Rel):
    (left, right), symbol = rel.exprs, None
    for symbol, bound in ((left, right), (right, left)):
        if isinstance(symbol, sympy.Symbol) and not bound.free_symbols and bound.is_extended_real:
            return sympy.Complement(sympy.S.Reals, sympy.FiniteSet(bound))
    return None


def _absolute_set(rel: Rel):
    """`|k x + b| op c` (or `c op |k x + b|`) with constants k != 0, b and c, as a set of real x."""
    (left, right), (op,) = rel.exprs, rel.ops
    if _scaled_abs(right) and not _scaled_abs(left):
        left, right, op = right, left, _FLIP[op]
    if not _scaled_abs(left) or right.free_symbols or not right.is_extended_real or len(left.free_symbols) != 1:
        return None
    scale, left = left.as_coeff_Mul()  # sympy writes |2x| as 2|x|
    right = right / scale
    (x,) = left.free_symbols
    inner = left.args[0]
    slope = sympy.diff(inner, x)
    if slope.free_symbols or slope == 0 or not slope.is_extended_real:
        return None
    center, radius = -inner.subs(x, 0) / slope, right / abs(slope)
    if sympy.expand(inner - slope * (x - center)) != 0:
        return None
    if op in ("<", "<="):
        return sympy.Interval(center - radius, center + radius, op == "<", op == "<")
    return sympy.Complement(sympy.S.Reals, sympy.Interval(center - radius, center + radius, op == ">=", op == ">="))


def _scaled_abs(e: sympy.Expr) -> bool:
    """`|...|` times a positive number."""
    scale, rest = e.as_coeff_Mul()
    return isinstance(rest, sympy.Abs) and scale > 0


def same_set(a: sympy.Set, b: sympy.Set) -> bool:
    if a == b:
        return True
    if isinstance(a, sympy.FiniteSet) and isinstance(b, sympy.FiniteSet):
        return len(a) == len(b) and _match_unordered(list(a), list(b))
    parts_a, parts_b = _set_parts(a), _set_parts(b)
    if len(parts_a) != len(parts_b):
        return False
    return all(any(_same_interval(x, y) for y in parts_b) for x in parts_a)


def _set_parts(s: sympy.Set) -> list:
    return list(s.args) if isinstance(s, sympy.Union) else [s]


def _same_interval(x, y) -> bool:
    if not (isinstance(x, sympy.Interval) and isinstance(y, sympy.Interval)):
        return x == y
    return x.left_open == y.left_open and x.right_open == y.right_open \
        and same_scalar(x.start, y.start) and same_scalar(x.end, y.end)


def same_sequence(answer, gold) -> bool:
    """Order matters when the gold is a tuple or a matrix; sets `{...}` and bare lists (all solutions) are unordered."""
    if isinstance(answer, Matrix) and isinstance(gold, Matrix):
        return len(answer.rows) == len(gold.rows) and all(
            same_sequence(Seq(x, "(", ")"), Seq(y, "(", ")")) for x, y in zip(answer.rows, gold.rows))
    if {_bracket(answer), _bracket(gold)} in ({"{", "("}, {"{", "["}):
        return False  # the set {1, 2} is neither the pair (1, 2) nor the interval [1, 2]
    items_a, items_b = _items(answer), _items(gold)
    if items_a is None or items_b is None or len(items_a) != len(items_b):
        return False
    if isinstance(gold, Matrix) or (isinstance(gold, Seq) and gold.open in ("(", "[")):
        return all(same(x, y) for x, y in zip(items_a, items_b))
    return _match_unordered(items_a, items_b)


def _bracket(value) -> str | None:
    return value.open if isinstance(value, Seq) else "(" if isinstance(value, Matrix) else None


def _items(value):
    """Items of a list, or of a row / column vector; None for a proper matrix."""
    if isinstance(value, Seq):
        return list(value.items)
    if isinstance(value, Matrix):
        shape = (len(value.rows), len(value.rows[0]))
        return [x for row in value.rows for x in row] if 1 in shape else None
    return [value]


def _match_unordered(items_a: list, items_b: list) -> bool:
    unused = list(items_a)
    for target in items_b:
        hit = next((k for k, x in enumerate(unused) if same(x, target)), None)
        if hit is None:
            return False
        unused.pop(hit)
    return True


def same_relation(a: Rel, b: Rel) -> bool:
    """Equations match up to a nonzero factor, inequalities up to a positive one (after orienting). A solved equation
    (`x = 3`) is matched only by a solved one: `x + 1 = 4` restates the problem, it does not answer it."""
    solved = [p for p in (_assignment(a), _assignment(b)) if p is not None and not p[1].free_symbols]
    if solved and (_assignment(a) is None or _assignment(b) is None):
        return False
    if len(a.ops) != 1 or len(b.ops) != 1:
        return a.ops == b.ops and all(same_scalar(x, y) for x, y in zip(a.exprs, b.exprs))
    (op_a,), (op_b,) = a.ops, b.ops
    diff_a, diff_b = a.exprs[0] - a.exprs[1], b.exprs[0] - b.exprs[1]
    if op_a in ("=", "!=") or op_b in ("=", "!="):
        return op_a == op_b and _proportional(diff_a, diff_b, positive=False)
    if op_a in (">", ">="):
        op_a, diff_a = _FLIP[op_a], -diff_a
    if op_b in (">", ">="):
        op_b, diff_b = _FLIP[op_b], -diff_b
    return op_a == op_b and _proportional(diff_a, diff_b, positive=True)


def _proportional(a: sympy.Expr, b: sympy.Expr, positive: bool) -> bool:
    if same_scalar(a, b) or (not positive and same_scalar(a, -b)):
        return True
    if b == 0:
        return False
    quotient = a / b
    ratio = sympy.cancel(quotient) if _rational_with_rational_coefficients(quotient) else sympy.simplify(quotient)
    if ratio.free_symbols or ratio == 0 or ratio.has(*_SPECIAL):
        return False
    return bool(ratio.is_positive) if positive else True


def same_scalar(a: sympy.Expr, b: sympy.Expr) -> bool:
    if a == b:
        return True
    if a.has(*_SPECIAL) or b.has(*_SPECIAL):
        return False  # infinities and undefined values only match structurally
    tolerance = _TOLERANCE.get() if _DECIMALS.get() else 0.0
    if tolerance > 0 and _numerically_agree(a, b, sympy.Float(tolerance)):
        return True  # the caller asked for decimals to count as approximations
    agree = _numerically_agree(a, b, RTOL)  # cheap, and a clear difference is a proof of inequality
    if agree is False:
        return False
    difference = a - b
    if _rational_with_rational_coefficients(difference):
        return sympy.cancel(difference) == 0  # exact and decidable
    if agree and not _difference_vanishes(difference, _proof_digits(a, b)):
        return False  # equal to 35 digits, but not beyond: sqrt(2) (1 + 10^-40) is not sqrt(2)
    if agree is None or _DECIMALS.get():  # no number to compare, or an exact decimal: only a proof will do
        return sympy.simplify(difference) == 0
    return True


def _rational_with_rational_coefficients(e: sympy.Expr) -> bool:
    return bool(e.is_rational_function()) and not e.atoms(sympy.NumberSymbol) and not e.has(sympy.I) \
        and not e.atoms(sympy.Function) and all(p.exp.is_Integer for p in e.atoms(sympy.Pow))  # cos(1) is a constant


def _numerically_agree(a: sympy.Expr, b: sympy.Expr, rtol: sympy.Float) -> bool | None:
    """Relative agreement to `rtol` at every sample point; None when a value is not a finite number. A value that
    evalf cannot tell apart from zero agrees only with another such value (no absolute tolerance)."""
    for point in _points(a.free_symbols | b.free_symbols):
        va, vb = a.evalf(PRECISION, subs=point), b.evalf(PRECISION, subs=point)
        if not all(v.is_Float or v == 0 for v in (abs(va), abs(vb))):
            return None
        zero_a, zero_b = _indistinguishable_from_zero(va), _indistinguishable_from_zero(vb)
        if zero_a or zero_b:
            if zero_a != zero_b:
                return False
            continue
        if abs(va - vb) > rtol * sympy.Max(abs(va), abs(vb)):
            return False
    return True


def _points(symbols) -> list[dict]:
    """The sample points: one per entry of _SAMPLES (a single empty point for a constant)."""
    symbols = sorted(symbols, key=str)
    return [{s: _SAMPLES[j] + sympy.Rational(k, 13) for k, s in enumerate(symbols)}
            for j in range(len(_SAMPLES) if symbols else 1)]


def _proof_digits(a: sympy.Expr, b: sympy.Expr) -> int:
    written = sum(len(str(max(abs(r.p), r.q))) for e in (a, b) for r in e.atoms(sympy.Rational))
    return max(PROOF_DIGITS, 4 * written)


def _difference_vanishes(difference: sympy.Expr, digits: int) -> bool:
    """Whether the difference, evaluated at each sample point with up to `digits` digits of working precision,
    stays indistinguishable from zero (never, past MAX_PROOF_DIGITS)."""
    if digits > MAX_PROOF_DIGITS:
        return False
    for point in _points(difference.free_symbols):
        value = difference.evalf(15, subs=point, maxn=digits)
        if not (value.is_number and _indistinguishable_from_zero(abs(value))):
            return False
    return True


def _indistinguishable_from_zero(value) -> bool:
    """Zero, or what evalf returns when it cannot separate a value from zero: a Float of a few bits (`0.e-159`),
    where a non-zero value comes back with all PRECISION digits."""
    return value == 0 or (value.is_Float and value._prec < 10)
