"""twofold's math answer verifier as a reward for any RL trainer, without torch or vLLM (`pip install
'twofold[verifier]'`): sympy in killable worker processes, safe from threads, asyncio and forked DataLoader workers.

    from twofold.verifier import math_reward
    trainer = trl.GRPOTrainer(..., reward_funcs=[math_reward])   # the gold answer in a "solution"/"answer" column

    # verl: reward.custom_reward_function.path=pkg://twofold.verifier reward.custom_reward_function.name=compute_score

    from twofold.verifier import verify, is_equivalent
    verify(["... so \\boxed{\\frac12}"], ["0.5"])                   # [1.0]

Every reward call goes to one shared worker pool per process (per configuration), started on first use: each
check is killed after `timeout` seconds (scoring 0) and the call returns within `budget` seconds when one is given.
The pool shuts down at exit. What the verifier accepts (and refuses) is in docs/verifier.md.
"""
from __future__ import annotations

from twofold.engine.verifier.equivalence import is_equivalent
from twofold.engine.verifier.extract import DEFAULT_EXTRACT, ExtractConfig, extract_answer, last_boxed
from twofold.engine.verifier.pool import CHECKS
from twofold.engine.verifier.service import VerifierService, shared_service, shutdown

__all__ = ["ExtractConfig", "MathReward", "VerifierService", "compute_score", "extract_answer", "is_equivalent",
           "math_reward", "shutdown", "stats", "verify", "verify_async"]

GOLD_COLUMNS = ("solution", "answer", "ground_truth", "gold")
"""Dataset columns MathReward reads the gold answer from, first present wins (unless `column` is given)."""


def _service(workers: int = 2, timeout: float = 5.0, memory_mb: int = 1024, check: str = "twofold",
             numeric_tolerance: float = 0.0, extract: ExtractConfig = DEFAULT_EXTRACT) -> VerifierService:
    if check not in CHECKS and ":" not in check:
        raise ValueError(f"check must be one of {sorted(CHECKS)} or 'module:function', got {check!r}")
    kwargs = {"numeric_tolerance": numeric_tolerance} if numeric_tolerance else None
    return shared_service(num_workers=workers, timeout=timeout, memory_mb=memory_mb, check=CHECKS.get(check, check),
                          check_kwargs=kwargs, extract=extract)


def verify(responses: list[str], golds: list[str], *, budget: float | None = None, **options) -> list[float]:
    """1.0 / 0.0 per response: whether its final answer (the last \\boxed{}, else "The answer is ...") equals its gold
    answer (a gold answer with a box, a worked solution, counts by its last box). Options: workers (2), timeout (5 s per check), memory_mb (1024 per worker), check ("twofold",
    "math_verify" or "module:function"), numeric_tolerance (0: decimals are exact), extract (ExtractConfig)."""
    return _service(**options).verify(responses, _golds(golds), budget)


async def verify_async(responses: list[str], golds: list[str], *, budget: float | None = None,
                       **options) -> list[float]:
    """`verify` for asyncio code (the event loop keeps running)."""
    return await _service(**options).verify_async(responses, _golds(golds), budget)


def _golds(golds: list[str]) -> list[str]:
    """A gold answer that is a worked solution (MATH's `solution` column) is its last box."""
    return [last_boxed(g) or g for g in map(str, golds)]


def stats(**options) -> dict:
    """Counters of the pool these options select (as `verify` takes them): checks, timeouts, restarts, errors,
    cache hits, responses without an answer, and `late` (scores returned as 0 because a call's budget ran out)."""
    return _service(**options).stats()


def _text(completion) -> str:
    """A completion as text: a string, or a conversation (TRL's conversational format) whose last message counts;
    its content may be a string or a list of parts ({"type": "text", "text": ...})."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, str):
            return content
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


class MathReward:
    """A TRL reward function: `reward(prompts, completions, **dataset_columns) -> list[float]`, 1.0 for a correct
    final answer and `negative` (0.0) otherwise. The gold answer comes from `column`, or from the first of
    GOLD_COLUMNS in the batch. `budget` (seconds) bounds each call; other options as for `verify`."""

    def __init__(self, column: str | None = None, *, negative: float = 0.0, budget: float | None = None,
                 name: str = "math_reward", **options):
        self.column, self.negative, self.budget, self.options = column, float(negative), budget, options
        self.__name__ = name  # TRL logs each reward function under its __name__
        _service(**options)  # a bad option fails here, not at the first step

    def __call__(self, prompts=None, completions=None, **kwargs) -> list[float]:
        if completions is None:
            raise TypeError("MathReward needs completions=[...] (TRL passes prompts, completions, dataset columns)")
        golds = kwargs.get(self._column(kwargs))
        if golds is None or len(golds) != len(completions):
            raise ValueError(f"column {self._column(kwargs)!r} has {None if golds is None else len(golds)} gold "
                             f"answers for {len(completions)} completions")
        scores = verify([_text(c) for c in completions], [str(g) for g in golds], budget=self.budget,
                        **self.options)
        return [1.0 if s == 1.0 else self.negative for s in scores]

    def _column(self, kwargs: dict) -> str:
        if self.column is not None:
            if self.column not in kwargs:
                raise KeyError(f"MathReward(column={self.column!r}): no such dataset column; the batch has "
                               f"{sorted(kwargs)}")
            return self.column
        found = next((c for c in GOLD_COLUMNS if c in kwargs), None)
        if found is None:
            raise KeyError(f"MathReward found no gold-answer column among {sorted(kwargs)}: name it "
                           f"{' / '.join(GOLD_COLUMNS)}, or pass MathReward(column=...)")
        return found


math_reward = MathReward()
"""The default TRL reward: the gold answer in a "solution", "answer", "ground_truth" or "gold" column."""


def compute_score(data_source=None, solution_str: str = "", ground_truth: str = "", extra_info=None,
                  **kwargs) -> float:
    """verl's reward-function signature (reward.custom_reward_function.path=pkg://twofold.verifier,
    name=compute_score): 1.0 when `solution_str`'s final answer equals `ground_truth` (or one of them, for a list),
    else 0.0, for any `data_source`. verl calls it from executor threads at once: they share one worker pool. Options of `verify`
    can be given through verl's `reward.custom_reward_function.reward_kwargs` (they arrive here as kwargs)."""
    budget = kwargs.pop("budget", None)
    options = {k: v for k, v in kwargs.items() if k in _OPTIONS}
    golds = [ground_truth] if isinstance(ground_truth, str) or not hasattr(ground_truth, "__iter__") \
        else list(ground_truth)  # several acceptable answers: any of them
    return max(verify([solution_str] * len(golds), [str(g) for g in golds], budget=budget, **options), default=0.0)


_OPTIONS = ("workers", "timeout", "memory_mb", "check", "numeric_tolerance", "extract")
