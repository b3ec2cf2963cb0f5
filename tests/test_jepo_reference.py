"""JEPO on data that cannot be verified, without a sampler: data.answers (which rows are verified, which are kept as
reference rows), the answer delimiter that cuts a sampled chain of thought, and the held-out likelihood's arithmetic
against a float64 re-computation. The online runs and the twofold-eval command: tests/test_online.py."""
import json

import pytest
import torch

from twofold.engine.run.config import answers_mode, likelihood_eval, load_config
from twofold.engine.data.loading import Fields
from twofold.engine.run.eval import hf_scorer
from twofold.engine.train.packing import Sequence
from twofold.engine.rollout.build import RolloutStats, answer_parts, verify_groups
from twofold.engine.rollout.sampler import Sample
from twofold.engine.data.tasks import Problem, load_problems
from twofold.engine.train.tiny import build_char_tokenizer, build_preset_model
from twofold.engine.verifier import VerifierPool

PROOFS = [{"prompt": f"Prove {a}+0={a}:", "answer": f"adding zero leaves {a} unchanged"} for a in range(3)]
NUMBERS = [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(2)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_answers_modes_keep_skip_or_verify_the_rows_a_verifier_cannot_parse(tmp_path):
    path, tok = _write(tmp_path / "semi.jsonl", PROOFS + NUMBERS), build_char_tokenizer()
    with pytest.raises(ValueError, match=r"no usable prompts \(skipped: \{'unparseable gold answer': 3\}\)"):
        load_problems(_write(tmp_path / "proofs.jsonl", PROOFS), tok, Fields(), 64)
    verifiable = load_problems(path, tok, Fields(), 64)
    assert [p.answer for p in verifiable.problems] == ["1", "2"] and verifiable.skipped == {
        "unparseable gold answer": 3}
    mixed = load_problems(path, tok, Fields(), 64, answers="mixed")
    assert [p.verifiable for p in mixed.problems] == [False] * 3 + [True] * 2
    assert mixed.reference_rows == 3 and mixed.skipped == {}

    def no_check(golds):
        raise AssertionError("reference answers are not parsed")
    reference = load_problems(path, tok, Fields(), 64, check_golds=no_check, answers="reference")
    assert not any(p.verifiable for p in reference.problems) and reference.reference_rows == 5


def test_data_answers_resolves_with_the_objective_and_the_delimiter_is_checked(tmp_path):
    data = _write(tmp_path / "p.jsonl", PROOFS)
    base = ["model.preset=tiny-qwen2", f"data.path={data}", "train.mode=online"]
    jepo, nft = (load_config(None, base + [f"objective.name={o}"]) for o in ("jepo", "nft"))
    assert (answers_mode(jepo), likelihood_eval(jepo)) == ("mixed", True)
    assert (answers_mode(nft), likelihood_eval(nft)) == ("verifiable", False)
    assert likelihood_eval(load_config(None, base + ["objective.name=nft", "eval.likelihood=true"]))
    assert jepo.rollout.answer_start == "\\boxed{" and jepo.rollout.answer_end == "}"
    with pytest.raises(ValueError, match="rollout.answer_start must be a non-empty delimiter"):
        load_config(None, base + ["objective.name=jepo", "rollout.answer_start="])


def _sample(tok, text):
    return Sample(0, tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id], text, "stop")


@pytest.mark.parametrize("start, end", [("\\boxed{", "}"), ("Answer:", ""), ("<answer>", "</answer>")])
def test_the_chain_of_thought_is_cut_at_the_configured_delimiter(start, end):
    tok = build_char_tokenizer()
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    text = f"so {start}7{end} or rather {start}9{end}"
    cot, answer, ok = answer_parts(_sample(tok, text), "a proof", tok, start, end)
    assert ok and decode(cot) == f"so {start}7{end} or rather {start}"  # the last delimiter
    assert decode(answer) == f"a proof{end}" and answer[-1] == tok.eos_token_id
    cot, answer, ok = answer_parts(_sample(tok, "no delimiter here"), "a proof", tok, start, end)
    assert not ok and decode(cot) == "no delimiter here" and decode(answer) == f"{start}a proof{end}"
    if end:  # an answer that was opened but never closed fails the format check too
        assert not answer_parts(_sample(tok, f"so {start}7"), "p", tok, start, end)[2]


def test_reference_rows_are_not_verified_and_leave_the_accuracy():
    tok = build_char_tokenizer()
    problems = [Problem(0, (5, 6), "proof text", verifiable=False), Problem(1, (5, 7), "3")]
    groups = [[_sample(tok, "\\boxed{3}")] * 2, [_sample(tok, "\\boxed{3}"), _sample(tok, "\\boxed{4}")]]
    stats = RolloutStats()
    with VerifierPool(num_workers=1) as pool:
        scores = verify_groups(pool, problems, groups, 5.0, stats)
    assert scores == [[0.0, 0.0], [1.0, 0.0]]
    from twofold.engine.rollout.build import Group, RolloutCollector
    RolloutCollector.count([Group(p, g, s) for p, g, s in zip(problems, groups, scores)], stats)
    metrics = stats.metrics()
    assert metrics["rollout/accuracy"] == 0.5 and metrics["rollout/verified_frac"] == 0.5


def test_the_hf_scorer_gives_the_response_tokens_log_probs():
    """Against a float64 forward of the same weights, token by token."""
    model = build_preset_model("tiny-qwen2").float().eval()
    seq = Sequence([5, 9, 17, 23, 41, 3], 2, row_id=0)
    (got,) = hf_scorer(model)([seq])
    with torch.no_grad():
        logits = model.double()(input_ids=torch.tensor([seq.tokens])).logits[0].double()
    want = [float(torch.log_softmax(logits[t - 1], -1)[seq.tokens[t]]) for t in range(2, 6)]
    assert got == pytest.approx(want, abs=1e-5) and len(got) == 4
