"""What the engine needs to know about an objective, declared next to its loss: `ObjectiveSpec`, and the one list
of them, `SPECS` (name -> spec), filled by `register`.

The engine reads an objective only through its spec: which modes it trains in, which head runs it, how rollouts
become its sequences, which groups it learns from, what is packed together, which mini-batch statistics it sums
and which extra models or fields it needs. Nothing in `twofold.engine` names an objective; a new one is its loss,
its spec and `register(spec)` (tests/test_objective_spec.py trains one declared inside a test).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Literal

MODES = ("online", "offline")
ADVANTAGES = ("grpo", "drgrpo", "rloo")  # objectives.group_advantages kinds
GROUP_FILTERS = ("dynamic", "mixed", "none")
PACKING_UNITS = ("sequence", "group", "pair")
SEQUENCE_BUILDERS = ("rewards", "advantages", "contrast_pair", "gold_answer")
NEEDS = ("reference", "reference_sums", "token_rm")


@dataclass(frozen=True, kw_only=True)
class ObjectiveSpec:
    name: str
    """The config's objective.name."""
    loss: Callable
    """(loss, metrics) = loss(**inputs): called by parameter name with the micro-batch's tensors (`logp`, `mask`,
    `seq_index`, per-sequence and per-token fields), the mini-batch totals (`num_tokens`, ...), `statistics` and
    objective.kwargs (its keyword arguments with a non-tensor default are the hyperparameters)."""
    modes: tuple[str, ...]
    """Where it trains (train.mode): `online` (rollouts of the policy, verified) and/or `offline` (dataset rows)."""
    token_local: bool
    """True: the loss is one `apply_token_local` call on the micro-batch's log-probs, so train.head=fused forms loss
    and gradient in one pass (6NHV). False: two-phase (log-probs forward, dL/dlogp by autograd, one fused pass
    with that gradient: 8NHV). A True that is not met stops the first step with a message; a False that could be
    True only costs the extra pass."""
    sequences: str | None = None
    """Online (required there): how a step's verified groups become training sequences (`engine.rollout.BUILDERS`).
    rewards: every sample with its 0/1 reward and the group's correct rate; advantages: every sample with the
    `advantage` of its shaped reward within its group; contrast_pair: one positive and one negative per group with
    the `advantage` of the group's +-1 rewards; gold_answer: prompt + the sampled chain of thought + the row's gold
    answer (needs the tokenizer and the answer text)."""
    advantage: str | None = None
    """Estimator of `objectives.group_advantages` the builder applies: grpo (mean/std), drgrpo (mean only), rloo
    (leave-one-out); None when the sequences carry no advantages."""
    overlong_penalty: bool = False
    """The shaped reward adds DAPO's length penalty over rollout.overlong_buffer."""
    group_filter: str = "dynamic"
    """Which sampled groups a step keeps. dynamic: groups with both outcomes when rollout.dynamic_sampling is on,
    all of them otherwise; mixed: groups with both outcomes, always (the loss needs a positive and a negative);
    none: every group, dynamic sampling or not (the loss does not learn from rewards)."""
    min_group_size: int = 1
    """Smallest rollout.samples_per_prompt the loss is defined for (a pair, a leave-one-out baseline: 2)."""
    packing_unit: str = "sequence"
    """What a micro-batch never splits: sequence (nothing), group (all samples of a prompt, `group_ids`: the loss
    forms per-group terms in one call), pair (chosen and rejected of a preference pair, `pair_id`)."""
    statistics: Callable | None = None
    """No-grad function of a micro-batch's inputs returning additive tensors that the engine sums over
    micro-batches and ranks and passes to the loss under the same names, so that each micro-batch loss is its
    exact share of the mini-batch's (JEPO's advantage moments); None: the totals suffice."""
    needs: tuple[str, ...] = ()
    """Extra inputs the engine must produce. reference: per-token `ref_logp` of the frozen initial policy (online,
    when the loss's `beta` > 0); reference_sums: per-sequence `ref_logp_sum` of the initial policy, scored once
    before training (offline, data.precompute_ref_logp); token_rm: per-token `token_scores` of a token reward
    model trained alongside (online, rollout.token_rm)."""
    reads: tuple[str, ...] = ()
    """Config keys (`section.key`) that only the objectives declaring them read, e.g. JEPO's
    rollout.format_penalty. A run of another objective that sets one (to other than its default) names it in one
    warning at config load, with the objectives that read it. Keys every objective's path reads are not listed."""

    def __post_init__(self):
        params = inspect.signature(self.loss).parameters
        checks = [
            (bool(self.modes) and set(self.modes) <= set(MODES), "modes", f"a non-empty subset of {MODES}"),
            (self.sequences in SEQUENCE_BUILDERS if "online" in self.modes else self.sequences is None, "sequences",
             f"one of {SEQUENCE_BUILDERS} for an online objective, None for an offline-only one"),
            (self.advantage is None or self.advantage in ADVANTAGES, "advantage", f"None or one of {ADVANTAGES}"),
            (self.advantage is not None or self.sequences not in ("advantages", "contrast_pair"), "advantage",
             f"set for sequences={self.sequences!r}"),
            (self.group_filter in GROUP_FILTERS, "group_filter", f"one of {GROUP_FILTERS}"),
            (self.min_group_size >= 1, "min_group_size", ">= 1"),
            (self.packing_unit in PACKING_UNITS, "packing_unit", f"one of {PACKING_UNITS}"),
            ((self.packing_unit == "pair") == ("chosen_logp" in params), "packing_unit",
             "'pair' exactly when the loss takes chosen_logp"),
            (set(self.needs) <= set(NEEDS), "needs", f"a subset of {NEEDS}"),
            ("reference" not in self.needs or {"ref_logp", "beta"} <= set(params), "needs",
             "'reference' only for a loss that takes ref_logp and beta"),
            (self.overlong_penalty == ("rollout.overlong_buffer" in self.reads), "reads",
             "to hold rollout.overlong_buffer exactly when overlong_penalty is set (the penalty reads it)"),
            (("token_rm" in self.needs) == ({"rollout.token_rm", "rollout.token_rm_lr"} <= set(self.reads)), "reads",
             "to hold rollout.token_rm and rollout.token_rm_lr exactly when needs has token_rm (its model reads them)"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ValueError(f"ObjectiveSpec {self.name!r}: {key} must be {expected}, got {getattr(self, key)!r}")

    @property
    def unit_field(self) -> str | None:
        """The per-sequence field whose equal values share a micro-batch (None: any split)."""
        return {"sequence": None, "group": "group_ids", "pair": "pair_id"}[self.packing_unit]


SPECS: dict[str, ObjectiveSpec] = {}
"""Every registered objective, in registration order: the one list the engine, the config, the tests and the
docs' table read."""


def register(spec: ObjectiveSpec) -> ObjectiveSpec:
    """Add `spec` to `SPECS` (a name already there is an error: pass a new name)."""
    if spec.name in SPECS:
        raise ValueError(f"objective {spec.name!r} is already registered")
    SPECS[spec.name] = spec
    return spec


def get_spec(name: str) -> ObjectiveSpec:
    if name not in SPECS:
        raise ValueError(f"objective.name {name!r} is unknown; objectives: {', '.join(SPECS)}")
    return SPECS[name]


def names(mode: Literal["online", "offline"] | None = None) -> tuple[str, ...]:
    """Registered objectives, all or those that train in `mode`."""
    return tuple(n for n, s in SPECS.items() if mode is None or mode in s.modes)


def table() -> str:
    """The registry as the Markdown table of docs/objectives.md (a test keeps the two equal)."""
    rows = ["| objective | modes | head | sequences (advantage) | groups kept | packed by | needs |",
            "|---|---|---|---|---|---|---|"]
    for s in SPECS.values():
        online = "online" in s.modes
        seqs = f"{s.sequences} ({s.advantage})" if s.advantage and online else s.sequences if online else "-"
        rows.append(f"| `{s.name}` | {', '.join(s.modes)} | {'one pass' if s.token_local else 'two-phase'} | "
                    f"{seqs} | {s.group_filter if online else '-'} | {s.packing_unit} | "
                    f"{', '.join(s.needs) or '-'} |")
    return "\n".join(rows)
