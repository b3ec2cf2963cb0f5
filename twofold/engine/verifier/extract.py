"""Pull the final answer out of a model response.

This runs in the trainer process (outside the workers' time limit), so every scan is a single
linear pass with no backtracking regex, and only the last `tail_chars` characters are searched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BOX_RE = re.compile(r"\\(?:boxed|fbox)")
_BRACE_RE = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped character is skipped whole
_SCAN_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])|\\.|[{}]", re.DOTALL)
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
    """Content of the box that closes last: the outermost of nested boxes (`\\boxed{2^{\\boxed{3}}}` is 2^{3},
    not 3), the last of several. A box that never closes is skipped, so a closed one inside it can still count.

    One forward pass over commands and braces with a stack of open braces: linear in len(text). A closed box
    ends after every box it contains, so the last one to close is the outermost of the last group.
    """
    best, stack, pos = None, [], 0  # stack: content start of each open box brace, -1 for a plain brace
    while (match := _SCAN_RE.search(text, pos)) is not None:
        token, pos = match.group(0), match.end()
        if token == "{":
            stack.append(-1)
        elif token == "}":
            if stack and (start := stack.pop()) >= 0:
                best = text[start:match.start()].strip()
        elif len(token) > 2:  # a box command (an escaped character is two)
            spaced = pos
            while spaced < len(text) and text[spaced] in " \t":
                spaced += 1
            if spaced < len(text) and text[spaced] == "{":
                stack.append(spaced + 1)
                pos = spaced + 1
            elif spaced > pos:  # `\\boxed 5`: the argument is one token
                end = spaced
                while end < len(text) and not text[end].isspace() and text[end] not in "$}":
                    end += 1
                best, pos = text[spaced:end].rstrip(".") or best, end
    return best


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
