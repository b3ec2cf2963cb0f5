"""The synthetic task suite of `bench.algorithms`: chains of one-digit additions and subtractions on a two-digit
start, solved step by step before `\\boxed{}`, with several distinct ways to get each problem wrong.

    prompt    47+8-9+6=
    right     47+8=55 55-9=46 46+6=52 \\boxed{52}
    wrong     47+8=45 45-9=36 36+6=42 \\boxed{42}          (forgot the carry in step 1)

Difficulty is the number of steps (1-3). Error modes, each applied at one step and carried through the rest
(a mode is applicable to a problem only when it changes the final answer):
- carry:      an addition that carries into the tens forgets the carry (-10);
- borrow:     a subtraction that borrows forgets to lower the tens (+10);
- sign:       the step applies the other operation (+ for -, - for +);
- copy:       the step starts from the previous step's left operand instead of its result (steps 2-3);
- transcribe: every step is right but the boxed answer swaps its two digits.
A negative therefore says something a positive does not: which of several slips the chain contains, at which
step, whereas a positive only repeats the one right chain. The sloppy teacher (SFT data) and the pair teacher
(one right and one wrong trace per problem, offline arm) both write traces with `trace`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

MODES = ("carry", "borrow", "sign", "copy", "transcribe")
LEVELS = (1, 2, 3)


@dataclass(frozen=True)
class Problem:
    start: int
    """Two-digit starting number."""
    ops: tuple[tuple[str, int], ...]
    """(op, one-digit operand) per step, op in "+-"."""

    @property
    def level(self) -> int:
        return len(self.ops)

    @property
    def prompt(self) -> str:
        return f"{self.start}" + "".join(f"{op}{b}" for op, b in self.ops) + "="

    @property
    def answer(self) -> int:
        return solve(self)[-1][3]


def apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b


def solve(problem: Problem, mode: str | None = None, at: int = -1) -> list[tuple[int, str, int, int]]:
    """The steps (left, op, right, result) of a trace; `mode` is applied at step `at` (0-based)."""
    steps, value, previous_left = [], problem.start, problem.start
    for i, (op, b) in enumerate(problem.ops):
        left = previous_left if (mode == "copy" and i == at) else value
        do = ("-" if op == "+" else "+") if (mode == "sign" and i == at) else op
        result = apply(do, left, b)
        if i == at and mode == "carry" and do == "+" and left % 10 + b >= 10:
            result -= 10
        if i == at and mode == "borrow" and do == "-" and left % 10 < b:
            result += 10
        steps.append((left, do, b, result))
        previous_left, value = left, result
    return steps


def trace(problem: Problem, mode: str | None = None, at: int = -1) -> tuple[str, int]:
    """(response text, boxed answer) of a trace with `mode` at step `at` (None: the right trace)."""
    steps = solve(problem, None if mode == "transcribe" else mode, at)
    final = steps[-1][3]
    boxed = int(str(final)[::-1]) if mode == "transcribe" else final
    text = " ".join(f"{a}{op}{b}={r}" for a, op, b, r in steps)
    return f"{text} \\boxed{{{boxed}}}", boxed


def error_options(problem: Problem) -> list[tuple[str, int]]:
    """Every (mode, step) whose trace ends in a wrong answer that is a plain non-negative integer."""
    out = []
    for mode in MODES:
        for at in ([-1] if mode == "transcribe" else range(problem.level)):
            if mode == "copy" and at == 0:
                continue
            if mode == "transcribe" and (problem.answer < 10 or len(set(str(problem.answer))) < 2):
                continue
            steps = solve(problem, None if mode == "transcribe" else mode, at)
            _, boxed = trace(problem, mode, at)
            if boxed != problem.answer and boxed >= 0 and all(s[3] >= 0 for s in steps):
                out.append((mode, at))
    return out


def random_problem(rng: random.Random, level: int) -> Problem:
    """A problem of `level` steps whose intermediate results stay in 0-99 and which has some error mode."""
    while True:
        start, ops = rng.randrange(10, 100), []
        value = start
        for _ in range(level):
            op, b = rng.choice("+-"), rng.randrange(1, 10)
            value = apply(op, value, b)
            ops.append((op, b))
        problem = Problem(start, tuple(ops))
        if all(0 <= s[3] <= 99 for s in solve(problem)) and error_options(problem):
            return problem


def wrong_trace(problem: Problem, rng: random.Random, mode: str | None = None) -> tuple[str, int, str]:
    """(text, boxed, mode) of a wrong trace: a random applicable (mode, step), or one of `mode`."""
    options = [o for o in error_options(problem) if mode is None or o[0] == mode]
    if not options:
        raise ValueError(f"{problem.prompt}: error mode {mode!r} does not apply")
    chosen, at = rng.choice(options)
    text, boxed = trace(problem, chosen, at)
    return text, boxed, chosen


def sloppy_trace(problem: Problem, rng: random.Random, error_rate: float) -> tuple[str, int, str | None]:
    """The SFT teacher: the right trace, except with probability `error_rate` one random applicable slip."""
    if rng.random() < error_rate:
        return wrong_trace(problem, rng)
    text, boxed = trace(problem)
    return text, boxed, None


def problem_sets(seed: int, train: int, held_out: int) -> tuple[list[Problem], list[Problem]]:
    """Disjoint training and held-out problems, levels 1-3 in equal shares (level 1 has ~1,500 distinct ones)."""
    rng, seen, problems = random.Random(seed), set(), []
    for attempt in range(50 * (train + held_out)):
        if len(problems) == train + held_out:
            break
        p = random_problem(rng, LEVELS[len(problems) % len(LEVELS)])
        if p.prompt not in seen:
            seen.add(p.prompt)
            problems.append(p)
    else:
        raise ValueError(f"only {len(problems)} distinct problems found for {train} + {held_out}")
    rng.shuffle(problems)
    return problems[held_out:], problems[:held_out]
