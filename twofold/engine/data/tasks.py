"""Prompts with gold answers (online training and evaluation), and the synthetic arithmetic task of the CPU demo.

A prompt row holds the prompt (text or chat messages, `data.prompt_field`; a TRL `messages` row: its turns before
the last assistant one) and its gold answer (`data.answer_field`, a dotted path such as verl's
`reward_model.ground_truth`, which is also used when the default `answer` is absent; a number is taken as its
decimal text; a `\\boxed{...}` gold is unwrapped). Rows whose gold answer the verifier cannot parse
would score every sample 0, so they are skipped and counted (`ProblemSet.skipped`), as are gold answers that take
longer than the verifier's timeout to parse (they are parsed in its worker processes, never in the trainer) and
prompts too long for the sampler. With `answers="reference"` (data.answers) no answer is checked and every row is
a reference row (`Problem.verifiable` false: not verified, only its likelihood is used); with "mixed" the rows the
verifier cannot parse are kept as reference rows instead of skipped (`ProblemSet.reference_rows` counts them).
A row without the prompt or answer field is an error naming the field and row.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from twofold.engine.data.loading import (DEFAULT_FIELDS, Fields, describe, find_field, get_field, prompt_ids,
                                         read_rows, row_prompt)
from twofold.engine.verifier.extract import last_boxed
from twofold.engine.verifier.pool import VerifierPool

log = logging.getLogger("twofold.tasks")


@dataclass(frozen=True)
class Problem:
    row_id: int
    prompt_ids: tuple[int, ...]
    """The formatted prompt (data.prompt_template), tokenized: exactly what the sampler and the trainer see."""
    answer: str
    verifiable: bool = True
    """The verifier scores samples against `answer`; false: a reference answer, used only through its
    likelihood (data.answers reference or mixed)."""


@dataclass
class ProblemSet:
    problems: list[Problem]
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason -> rows skipped (unparseable gold answer, prompt too long)."""
    reference_rows: int = 0
    """Rows kept as reference rows (not verifiable)."""


def gold_text(row: dict, key: str) -> str:
    value = find_field(row, key, DEFAULT_FIELDS.answer)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"field {key!r} must be a string or a number, got {value!r}")
    text = str(value).strip()
    return last_boxed(text) or text


def check_golds_in_workers(golds: list[str]) -> list[str | None]:
    """Gold answers checked by a short-lived verifier pool (callers with a pool pass its `check_golds`)."""
    with VerifierPool(num_workers=1) as pool:
        return pool.check_golds(golds)


def prompt_row_hint(row, fields: Fields) -> str:
    """The fix for a row that is no prompt with a gold answer: another layout, or a field under another name."""
    if not isinstance(row, dict):
        return ""
    if get_field(row, fields.chosen, None) is not None and get_field(row, fields.rejected, None) is not None:
        return (f". This row is a preference pair ({fields.chosen}/{fields.rejected}): online objectives read prompts "
                "with gold answers; train pairs offline (train.mode=offline, objective.name=redi, dpo or simpo)")
    for key, field_name in (("data.answer_field", fields.answer), ("data.prompt_field", fields.prompt)):
        try:
            find_field(row, field_name, getattr(DEFAULT_FIELDS, key.removeprefix("data.").removesuffix("_field")))
        except ValueError:
            return f". Set {key} to the field of the row that holds it (fields: {', '.join(sorted(row))})"
    return ""


def load_problems(path, tokenizer, fields: Fields, max_prompt_tokens: int, file_format: str = "auto",
                  limit: int = 0,
                  check_golds: Callable[[list[str]], list[str | None]] | None = check_golds_in_workers,
                  split: str = "train", answers: str = "verifiable") -> ProblemSet:
    """Tokenized problems of a prompt source; bad gold answers and overlong prompts are skipped and counted.
    `check_golds` says why each gold answer is unusable (None: usable), e.g. `VerifierPool.check_golds`; None
    keeps every gold answer (another check, or rewards from reward functions alone, may well use them).
    answers: "verifiable", "reference" or "mixed" (data.answers, resolved)."""
    if answers not in ("verifiable", "reference", "mixed"):
        raise ValueError(f"answers must be verifiable, reference or mixed, got {answers!r}")
    out, rows, name = ProblemSet([]), [], describe(path)
    for row_id, row in read_rows(path, file_format, split):
        try:
            if isinstance(row, str):
                raise ValueError(row)
            prompt, answer = row_prompt(row, fields), gold_text(row, fields.answer)
            ids = tuple(prompt_ids(tokenizer, prompt, fields.template))
        except ValueError as err:
            raise ValueError(f"{name} row {row_id}: {err}{prompt_row_hint(row, fields)}") from None
        rows.append((row_id, ids, answer))
    golds = [answer for _, _, answer in rows]
    checked = check_golds is not None and answers != "reference"
    reasons = check_golds(golds) if checked else [None] * len(golds)
    for (row_id, ids, answer), reason in zip(rows, reasons):
        verifiable = answers != "reference" and not (answers == "mixed" and reason)
        if not verifiable:
            reason = None
        if reason is None and not 0 < len(ids) < max_prompt_tokens:
            reason = "prompt too long for sampler.max_model_len"
        if reason:
            log.warning("skipping %s row %d: %s (%r)", name, row_id, reason, answer[:200])
            out.skipped[reason] = out.skipped.get(reason, 0) + 1
            continue
        out.problems.append(Problem(row_id, ids, answer, verifiable))
        out.reference_rows += not verifiable
        if limit and len(out.problems) >= limit:
            break
    if not out.problems:
        raise ValueError(f"{name}: no usable prompts (skipped: {out.skipped})")
    log.info("loaded %d prompts from %s (%d reference rows, not verified; skipped: %s)", len(out.problems), name,
             out.reference_rows, out.skipped or "none")
    return out


# ---- the demo's synthetic task -------------------------------------------------------------------------------

def addition_problem(rng: random.Random) -> tuple[int, int]:
    """A two-digit number plus a one-digit number; 45% of them carry into the tens."""
    return rng.randrange(10, 100), rng.randrange(1, 10)


def addition_prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def sloppy_answer(a: int, b: int, rng: random.Random, forget_carry: float) -> int:
    """The demo's teacher: right, except that it forgets the carry with probability `forget_carry`."""
    carries = a % 10 + b >= 10
    return a + b - 10 if carries and rng.random() < forget_carry else a + b


def write_addition_data(directory: str | Path, *, sft_rows: int, rl_prompts: int, eval_prompts: int,
                        forget_carry: float, seed: int = 0) -> dict[str, Path]:
    """JSONL files of the demo: sft.jsonl (prompt/response by the sloppy teacher), prompts.jsonl and
    eval.jsonl (prompt/answer); the held-out problems appear in neither training file."""
    rng = random.Random(seed)
    everything = [(a, b) for a in range(10, 100) for b in range(1, 10)]
    rng.shuffle(everything)
    held_out, train = everything[:eval_prompts], everything[eval_prompts:]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sft = []
    for _ in range(sft_rows):
        a, b = rng.choice(train)
        sft.append({"prompt": addition_prompt(a, b), "response": f"\\boxed{{{sloppy_answer(a, b, rng, forget_carry)}}}"})
    files = {"sft": sft,
             "prompts": [{"prompt": addition_prompt(a, b), "answer": str(a + b)} for a, b in
                         (rng.choice(train) for _ in range(rl_prompts))],
             "eval": [{"prompt": addition_prompt(a, b), "answer": str(a + b)} for a, b in held_out]}
    paths = {}
    for name, rows in files.items():
        paths[name] = directory / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
