"""The objective registry (`twofold.objectives.spec`): the one list of objectives, read by the engine, the config,
the tests and docs/objectives.md; nothing in twofold/engine names an objective. An objective declared here, in the
test, trains online through the engine (tests/test_online.py::test_a_spec_registered_by_a_test_trains_online)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from twofold.engine.run.config import config_reference, load_config
from twofold.objectives import OBJECTIVES, SPECS, ObjectiveSpec, names, register, spec
from twofold.objectives.aggregate import token_weights
from twofold.objectives.layout import apply_token_local, flatten, per_seq
from twofold.objectives.token_local import linear_token

REPO = Path(__file__).resolve().parents[1]


def reinforce_loss(logp, advantages, mask, *, seq_index=None, num_tokens=None, validate: bool = True):
    """A toy objective for the tests: token-mean REINFORCE, -A_i l_t per counted token (one token-local call)."""
    flat, x = flatten(logp, mask, seq_index, advantages.shape[0], validate)
    adv = per_seq("advantages", advantages, flat, validate, logp.dtype)
    w = token_weights(flat, "token_mean", logp.dtype, num_tokens=num_tokens)
    loss, _ = apply_token_local(x["logp"], linear_token, weight=w, coef=-flat.gather(adv))
    return loss, {"tokens": flat.mask.sum()}


TOY = ObjectiveSpec(name="toy_reinforce", loss=reinforce_loss, modes=("online",), token_local=True,
                    sequences="advantages", advantage="rloo")


@pytest.fixture
def toy():
    """TOY registered for one test, then removed again (SPECS is the process's one list)."""
    register(TOY)
    try:
        yield TOY
    finally:
        del SPECS[TOY.name]


def test_the_docs_objective_table_is_the_registry():
    text = (REPO / "docs" / "objectives.md").read_text()
    assert spec.table() in text, "docs/objectives.md's registry table is stale: paste twofold.objectives.spec.table()"


def test_every_registered_objective_has_its_loss_and_a_mode():
    assert list(OBJECTIVES) == list(SPECS) and set(names("online")) | set(names("offline")) == set(SPECS)
    for name, s in SPECS.items():
        assert OBJECTIVES[name] is s.loss and s.name == name


def _objective_names_in_branches_or_tables(path: Path) -> list[str]:
    """String constants equal to an objective name inside a comparison (`x == "grpo"`, `x in ("nft", ...)`) or in
    a module-level container (a name table)."""
    tree, found = ast.parse(path.read_text()), []
    spots = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    spots += [n.value for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None
              and isinstance(n.value, (ast.Tuple, ast.List, ast.Set, ast.Dict))]
    for spot in spots:
        found += [f"{path.name}:{c.lineno} {c.value!r}" for c in ast.walk(spot)
                  if isinstance(c, ast.Constant) and c.value in SPECS]
    return found


def test_the_engine_names_no_objective():
    found = [hit for path in sorted((REPO / "twofold" / "engine").rglob("*.py"))
             for hit in _objective_names_in_branches_or_tables(path)]
    assert found == []


def test_the_check_sees_a_branch_and_a_table(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('TABLE = ("nft", "x")\n\ndef f(o):\n    return o == "grpo" or o in ("jepo",)\n')
    assert len(_objective_names_in_branches_or_tables(bad)) == 3


@pytest.mark.parametrize("change,key", [
    (dict(modes=("rollouts",)), "modes"),
    (dict(sequences="whatever"), "sequences"),
    (dict(advantage=None), "advantage"),
    (dict(group_filter="mixed_only"), "group_filter"),
    (dict(packing_unit="pair"), "packing_unit"),
    (dict(needs=("reference",)), "needs"),
    (dict(min_group_size=0), "min_group_size"),
    (dict(overlong_penalty=True), "reads"),  # the penalty reads rollout.overlong_buffer: reads must say so
    (dict(reads=("rollout.token_rm_lr", "rollout.token_rm")), "reads"),  # without needs=("token_rm",)
])
def test_a_bad_spec_is_refused_naming_the_field(change, key):
    fields = dict(name="bad", loss=reinforce_loss, modes=("online",), token_local=True, sequences="advantages",
                  advantage="rloo") | change
    with pytest.raises(ValueError, match=f"ObjectiveSpec 'bad': {key} must be"):
        ObjectiveSpec(**fields)


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="'grpo' is already registered"):
        register(SPECS["grpo"])


def test_a_registered_spec_is_in_the_config_help_and_validation(toy, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    assert "toy_reinforce (online)" in config_reference()
    config = load_config(None, ["model.preset=tiny-qwen2", f"data.path={data}", "train.mode=online",
                                "objective.name=toy_reinforce"])
    assert config.objective.name == "toy_reinforce"
    with pytest.raises(ValueError, match="does not run with train.mode=offline; offline objectives: sft"):
        load_config(None, ["model.preset=tiny-qwen2", f"data.path={data}", "objective.name=toy_reinforce"])
    with pytest.raises(ValueError, match="not a hyperparameter of 'toy_reinforce'"):
        load_config(None, ["model.preset=tiny-qwen2", f"data.path={data}", "train.mode=online",
                           "objective.name=toy_reinforce", "objective.kwargs={beta: 0.1}"])


def test_the_toy_loss_is_minus_the_advantage_weighted_token_mean():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, True, False, True])
    seq_index = torch.tensor([0, 0, 1, 1])
    loss, _ = reinforce_loss(logp, torch.tensor([1.0, -2.0], dtype=torch.float64), mask, seq_index=seq_index)
    assert float(loss.detach()) == pytest.approx(-(1 * (-1 - 2) + (-2) * (-3)) / 3)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([-1 / 3, -1 / 3, 0.0, 2 / 3])


def test_keys_only_other_objectives_read_are_named_in_one_warning_from_their_specs(toy, tmp_path, caplog):
    """The warning comes from the specs' `reads`: a registered objective that declares none (the toy) is told
    about JEPO's, OREAL's and DAPO's keys, each with its readers; an objective that reads the key is not."""
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    base = ["model.preset=tiny-qwen2", f"data.path={data}", "train.mode=online"]
    with caplog.at_level("WARNING", logger="twofold"):
        load_config(None, [*base, "objective.name=toy_reinforce", "rollout.format_penalty=5",
                           "rollout.token_rm_lr=1e-5", "rollout.overlong_buffer=16",
                           "rollout.token_rm=true"])  # the default value: not named
        load_config(None, [*base, "objective.name=jepo", "rollout.format_penalty=5"])
        load_config(None, [*base, "objective.name=oreal", "rollout.token_rm_lr=1e-5", "rollout.format_penalty=5"])
    readers = {key: [n for n, s in SPECS.items() if key in s.reads] for key in
               ("rollout.format_penalty", "rollout.token_rm_lr", "rollout.overlong_buffer")}
    assert readers == {"rollout.format_penalty": ["jepo"], "rollout.token_rm_lr": ["oreal"],
                       "rollout.overlong_buffer": ["dapo"]}
    assert caplog.messages == [
        "config rollout.overlong_buffer (read by dapo); rollout.token_rm_lr (read by oreal); rollout.format_penalty "
        "(read by jepo): objective.name=toy_reinforce does not read them, so they have no effect",
        "config rollout.format_penalty (read by jepo): objective.name=oreal does not read it, so it has no effect"]
