"""OREAL's token reward model scores each response token with the hidden state that has read that token."""
import pytest
import torch

from twofold.engine.run.schema import ModelConfig
from twofold.engine.train.distributed import init_distributed, shutdown_distributed
from twofold.engine.train.packing import Sequence
from twofold.engine.rollout.token_rm import TokenRewardModel


@pytest.fixture(scope="module")
def rm():
    env = init_distributed()
    model = TokenRewardModel(ModelConfig(preset="tiny-qwen2", dtype="float32", activation_checkpointing=False,
                                         attn_implementation="sdpa"), env, lr=1e-3, seed=0, budget=256,
                             pad_token_id=0)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking head: the zero init would score every token 0
        torch.nn.init.normal_(model.model.score_head.proj.weight)
    yield model
    shutdown_distributed()


def seq(tokens, prompt_len=3):
    return Sequence(list(tokens), prompt_len, fields={"rewards": 1.0})


def test_a_token_changes_its_own_score_and_not_the_earlier_ones(rm):
    base = [5, 6, 7, 20, 21, 22, 23, 3]
    changed = base[:5] + [40] + base[6:]  # response token 2 (index 5) differs
    a, b = rm.scores([seq(base), seq(changed)])
    assert len(a) == len(base) - 3
    assert a[:2] == pytest.approx(b[:2], rel=1e-5, abs=1e-5)  # causal: earlier tokens cannot see the change
    assert abs(a[2] - b[2]) > 1e-4  # the changed token's own score has read it (it was one token early before)


def test_packed_scores_equal_scores_alone_and_the_last_token_keeps_the_prefix_score(rm):
    first, second = seq([5, 6, 7, 20, 21, 3]), seq([8, 9, 30, 31, 32, 33, 3], prompt_len=2)
    together = rm.scores([first, second])  # one packed micro-batch (budget 256)
    alone = [rm.scores([first])[0], rm.scores([second])[0]]
    for x, y in zip(together, alone):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-5)
    # the final token (EOS) is never an input: its score is the one of the prefix before it
    rm.model.score_own_token = False
    early = rm.scores([first])[0]
    rm.model.score_own_token = True
    assert alone[0][-1] == pytest.approx(early[-1], rel=1e-5, abs=1e-5)
    assert alone[0][:-1] == pytest.approx(early[1:], rel=1e-5, abs=1e-5)
