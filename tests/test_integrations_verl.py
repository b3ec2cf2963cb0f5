"""verl: twofold's losses registered through verl's own registries and called the way verl's actor calls them;
twofold's math reward loaded by verl's `load_reward_manager` and scored through its reward loop.

verl (pinned, with the packages its core_algos imports) is installed with `pip install --no-deps --target` into a
temporary folder, so the test environment is untouched; a fresh interpreter imports it on CPU, registers twofold's
losses, and compares "twofold_grpo" with verl's "vanilla" PPO loss for every loss_agg_mode, and "twofold_nft"
(after the "twofold_nft" advantage estimator) with twofold.nft_loss on the same groups.
"""
import pytest

from tests.pip_target import pip_target, run_python

# verl 0.9.1 and what `verl.trainer.ppo.core_algos` imports that the project environment lacks (all with --no-deps:
# verl's own requirements would replace transformers)
VERL = ["verl==0.9.1", "ray==2.60.0", "omegaconf==2.4.0", "antlr4-python3-runtime==4.9.3", "tensordict==0.10.0",
        "hydra-core==1.3.8", "codetiming==1.4.0", "msgpack==1.2.4", "pyvers==0.2.3", "orjson==3.13.0"]

CHECK = r'''
import inspect
import numpy as np
import torch
from omegaconf import OmegaConf
from verl.trainer.ppo import core_algos

import twofold
import twofold.integrations.verl as tv

from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY
# `import verl` loaded twofold's "verl.plugins" entry point, which registered the losses before any call here
assert {"twofold_grpo", "twofold_nft", "twofold_rft"} <= set(POLICY_LOSS_REGISTRY), sorted(POLICY_LOSS_REGISTRY)
assert "twofold_nft" in ADV_ESTIMATOR_REGISTRY
assert tv.register() == {"policy_loss": ["twofold_grpo", "twofold_nft", "twofold_rft"],
                         "adv_estimator": ["twofold_nft"]}
tv.register()  # registering twice is harmless
vanilla = core_algos.get_policy_loss_fn("vanilla")
for name in ("twofold_grpo", "twofold_nft", "twofold_rft"):
    ours = core_algos.get_policy_loss_fn(name)
    assert list(inspect.signature(ours).parameters) == list(inspect.signature(vanilla).parameters), name

g = torch.Generator().manual_seed(0)
b, t = 8, 9
lengths = torch.tensor([9, 4, 1, 7, 9, 0, 3, 6])  # row 5 has no tokens: verl's seq-mean modes skip it
mask = torch.arange(t)[None] < lengths[:, None]
old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
log_prob = (old + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)).requires_grad_()
advantages = torch.randn(b, t, generator=g, dtype=torch.float64) * mask  # per token, as verl holds them
modes = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
infos = [{}, {"dp_size": 2, "batch_num_tokens": 80, "global_batch_size": 14, "loss_scale_factor": 16}]
ours_fn = core_algos.get_policy_loss_fn("twofold_grpo")
for mode in modes:
    for info in infos:
        config = OmegaConf.create(dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                                       global_batch_info=info))
        theirs, their_metrics = vanilla(old, log_prob, advantages, mask, mode, config, None)
        ours, our_metrics = ours_fn(old_log_prob=old, log_prob=log_prob, advantages=advantages,
                                    response_mask=mask, loss_agg_mode=mode, config=config, rollout_is_weights=None)
        grad_theirs, = torch.autograd.grad(theirs, log_prob)
        grad_ours, = torch.autograd.grad(ours, log_prob)
        assert abs((ours - theirs).item()) <= 1e-7 * max(1.0, abs(theirs.item())), (mode, info)
        # verl's seq-mean-token-mean divides by (length + 1e-8); everything else is exact
        torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-7, atol=1e-12)
        assert abs(our_metrics["actor/pg_clipfrac"] - their_metrics["actor/pg_clipfrac"]) < 1e-6  # verl: / (n + 1e-8)
# verl's rollout correction: truncated IS weights on the policy-gradient term (some 0: IcePop-style masking)
weights = torch.rand(b, t, generator=g, dtype=torch.float64).mul(2.5).clamp(max=2.0) * (torch.rand(b, t, generator=g) > 0.2)
for mode in modes:
    theirs, _ = vanilla(old, log_prob, advantages, mask, mode, config, weights)
    ours, _ = ours_fn(old, log_prob, advantages, mask, mode, config, weights)
    assert abs((ours - theirs).item()) <= 1e-7 * max(1.0, abs(theirs.item())), mode
    torch.testing.assert_close(torch.autograd.grad(ours, log_prob)[0], torch.autograd.grad(theirs, log_prob)[0],
                               rtol=1e-7, atol=1e-12)

# NFT: verl's actor sees only advantages, so the estimator writes +-r_hat and the loss reads both back
uid = np.array(["a", "a", "a", "a", "b", "b", "c", "c"], dtype=object)
correct = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
token_rewards = torch.zeros(b, t, dtype=torch.float64)
token_rewards[torch.arange(b), (lengths - 1).clamp(min=0)] = correct  # outcome reward on the last token
nft_mask = mask.clone()
nft_mask[5, :2] = True  # every response has a token here
estimator = core_algos.get_adv_estimator_fn("twofold_nft")
adv, returns = estimator(token_level_rewards=token_rewards, response_mask=nft_mask, index=uid, config=None)
assert adv.shape == (b, t) and torch.equal(adv, returns) and bool((adv[~nft_mask] == 0).all())
loss, metrics = core_algos.get_policy_loss_fn("twofold_nft")(old, log_prob, adv, nft_mask, "token-mean", config, None)
groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
expected, _ = twofold.nft_loss(log_prob, old, correct, groups, nft_mask, agg="token_mean", num_tokens=40.0)
assert abs((loss - expected).item()) <= 1e-12
torch.testing.assert_close(torch.autograd.grad(loss, log_prob)[0], torch.autograd.grad(expected, log_prob)[0])
assert "actor/twofold_r_hat" in metrics
loss, _ = core_algos.get_policy_loss_fn("twofold_rft")(old, log_prob, adv, nft_mask, "token-mean", config, None)
expected, _ = twofold.rft_loss(log_prob, correct, nft_mask, old_logp=old, agg="token_mean", num_tokens=40.0)
assert abs((loss - expected).item()) <= 1e-12
print(core_algos.__file__)
print(twofold.__file__)
'''


@pytest.fixture(scope="module")
def verl_site(tmp_path_factory, twofold_wheel):
    """verl and twofold's wheel installed side by side, as a user's environment would have them."""
    return pip_target(tmp_path_factory.mktemp("site-packages"), *VERL, str(twofold_wheel))


@pytest.mark.slow
def test_twofold_losses_register_in_verl_and_match_its_vanilla_loss(verl_site, tmp_path):
    run = run_python(CHECK, [verl_site], cwd=tmp_path)  # only what was installed; not the clone
    assert run.returncode == 0, run.stdout + run.stderr
    verl_file, twofold_file = run.stdout.split()  # both imported from the folder installed here
    assert verl_file.startswith(str(verl_site / "verl")) and twofold_file.startswith(str(verl_site / "twofold"))


REWARD_CHECK = r'''
import asyncio, json, sys
import numpy as np
import torch
from omegaconf import OmegaConf
from verl import DataProto
from verl.trainer.ppo.reward import load_reward_manager
from twofold.engine.train.tiny import build_char_tokenizer

overrides = json.loads(sys.argv[1])  # the docs' lines, plus reward_kwargs that make "HANG" hang for 1 s at most
config = OmegaConf.create({"reward": {"custom_reward_function": {"path": None, "name": None, "reward_kwargs": {}},
                                      "reward_manager": {"source": "register", "name": "naive"}}})
config = OmegaConf.merge(config, OmegaConf.from_dotlist(overrides))
tokenizer = build_char_tokenizer()
manager = load_reward_manager(config, tokenizer)
responses = ["so \\boxed{18}.", "\\boxed{17}", "The answer is \\boxed{\\sqrt[3]{-8}}", "\\boxed{HANG}",
             "\\boxed{\\frac{1}{2}}", "no idea"]
golds = ["18", "18", "-2", "1", "0.5", "3"]
ids = [tokenizer.encode(r, add_special_tokens=False) for r in responses]
width = max(map(len, ids))
response_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids])
prompts = torch.full((len(ids), 2), 5)
mask = torch.cat([torch.ones(len(ids), 2, dtype=torch.long),
                  torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])], 1)
data = DataProto.from_dict(tensors={"prompts": prompts, "responses": response_ids, "attention_mask": mask},
                           non_tensors={"data_source": np.array(["math"] * len(ids), dtype=object),
                                        "reward_model": np.array([{"ground_truth": g} for g in golds], dtype=object)})

async def score_all():  # verl's reward loop: every sample at once, each compute_score in an executor thread
    return await asyncio.gather(*(manager.run_single(data[i:i + 1]) for i in range(len(ids))))

results = manager.loop.run_until_complete(score_all())
print(json.dumps([r["reward_score"] for r in results]))
import twofold.verifier
print(twofold.verifier._service(check="marked:hang_marked_check", timeout=1.0).stats()["timeouts"])
print(twofold.verifier.__file__)
'''
HANG_CHECK = '''def hang_marked_check(answer, gold):
    if answer == "HANG":
        while True:
            pass
    from twofold.verifier import is_equivalent
    return is_equivalent(answer, gold)
'''


@pytest.mark.slow
def test_verls_reward_loading_scores_with_twofolds_compute_score_as_the_docs_configure_it(verl_site, tmp_path):
    import json
    import re
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "verifier.md").read_text()
    bash = re.findall(r"```bash\n(.*?)```", doc, flags=re.S)[0]
    overrides = re.findall(r"(reward\.custom_reward_function\.\S+=\S+)", bash)
    assert overrides == ["reward.custom_reward_function.path=pkg://twofold.verifier",
                         "reward.custom_reward_function.name=compute_score"]
    (tmp_path / "marked.py").write_text(HANG_CHECK)  # the workers import it from the working directory
    overrides += ["reward.custom_reward_function.reward_kwargs.check=marked:hang_marked_check",
                  "reward.custom_reward_function.reward_kwargs.timeout=1.0"]
    run = run_python(REWARD_CHECK.replace("sys.argv[1]", repr(json.dumps(overrides))), [verl_site], cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    scores, timeouts, module = run.stdout.strip().splitlines()[-3:]
    assert json.loads(scores) == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert timeouts == "1"  # the hung check was killed at its 1 s timeout and scored 0; the others went on
    assert module.startswith(str(verl_site / "twofold"))
