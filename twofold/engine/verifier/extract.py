"""Pull the final answer out of a model response.

This runs in the trainer process (outside the workers' time limit), so every scan is a single
linear pass with no backtracking regex, and only the last `tail_chars` characters are searched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BOX_RE = re.compile(r"\\(?:boxed|fbox)")
_BRACE_RE = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped character is skipped whole
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# A signed decimal (thousands commas allowed) or simple fraction; unambiguous, so linear time.
_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


@dataclass(frozen=True)
class ExtractConfig:
    """How `extract_answer` finds the final answer."""

    phrases: tuple[str, ...] = ("The final answer is", "The answer is", "Final answer:", "Answer:")
    """Fallback markers (case-insensitive) used when there is no boxed answer; the last one wins."""
    last_number: bool = False
    """Fall back to the last number in the text (off by default: it rewards lucky guesses)."""
    after_think: bool = True
    """Look only after the last `</think>`; a response with `<think>` and no `</think>` has no answer."""
    tail_chars: int = 100_000
    """Search only this many final characters: answers sit at the end, and it bounds hostile 1 MB inputs."""


DEFAULT_EXTRACT = ExtractConfig()


def extract_answer(text: str, config: ExtractConfig = DEFAULT_EXTRACT) -> str | None:
    """The last complete `\\boxed{...}`/`\\fbox{...}`, else a fallback phrase, else (if configured) the last number."""
    if not isinstance(text, str):
        return None
    if config.after_think:
        if THINK_CLOSE in text:
            text = text[text.rfind(THINK_CLOSE) + len(THINK_CLOSE):]
        elif THINK_OPEN in text:
            return None
    text = text[-config.tail_chars:]
    for find in (last_boxed, lambda t: after_phrase(t, config.phrases)):
        found = find(text)
        if found:
            return found
    if config.last_number:
        return last_number(text)
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last boxed command whose braces close.

    An unclosed candidate at position p cannot contain a closed one, and any earlier
    candidate that is still open at p never closes either, so each earlier scan may stop
    at p: the whole search is linear in len(text).
    """
    limit = len(text)
    for match in reversed(list(_BOX_RE.finditer(text))):
        content = _box_content(text, match.end(), limit)
        if content is not None:
            return content.strip()
        limit = match.start()
    return None


def _box_content(text: str, j: int, limit: int) -> str | None:
    """Argument of the box command ending at `j`, or None when it does not close before `limit`."""
    spaced = j
    while spaced < limit and text[spaced] in " \t":
        spaced += 1
    if spaced < limit and text[spaced] == "{":
        close = _matching_brace(text, spaced, limit)
        return None if close < 0 else text[spaced + 1:close]
    if spaced == j:
        return None  # `\boxedfoo` is another command, not a box
    # `\boxed 5`: the argument is one whitespace-delimited token.
    end = spaced
    while end < limit and not text[end].isspace() and text[end] != "$":
        end += 1
    return text[spaced:end].rstrip(".") or None


def _matching_brace(text: str, open_at: int, limit: int) -> int:
    """Index of the brace closing `text[open_at]`, or -1; escaped braces `\\{` `\\}` do not count."""
    depth = 0
    for match in _BRACE_RE.finditer(text, open_at, limit):
        token = match.group(0)
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return match.start()
    return -1


def after_phrase(text: str, phrases: tuple[str, ...]) -> str | None:
    """Text after the last fallback phrase, up to the end of its line."""
    lowered = text.lower()
    best, best_at = None, -1
    for phrase in phrases:
        at = lowered.rfind(phrase.lower())
        if at > best_at:
            best, best_at = phrase, at
    if best is None:
        return None
    line = text[best_at + len(best):].split("\n", 1)[0]
    answer = line.strip().lstrip(":").strip().rstrip(".").strip().strip("$").strip()
    return answer or None


def last_number(text: str) -> str | None:
    found = None
    for match in _NUMBER_RE.finditer(text):
        found = match.group(0)
    return found
