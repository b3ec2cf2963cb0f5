"""Reward functions as a contract: every call runs in a verifier worker under the timeout, the memory cap and the
output cap, and must return one finite number. Whatever else a function does (raise, hang, exit, die, allocate
without bound, print without end, return NaN / inf / a string / a list / None / an int too big for a float) is
counted against that function and logged once with its traceback, adds 0 to the sample's reward, and leaves the
sample's other terms and the verifier's verdict as they were. The run stops, naming the function, once a function
fails on more than reward.max_error_frac of its calls; an unimportable function stops it before anything starts."""
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from twofold.engine.run.config import load_config
from twofold.engine.rollout.build import RolloutStats, check_reward_errors, merged
from twofold.engine.verifier import VerifierPool
from twofold.engine.verifier.pool import MAX_OUTPUT_BYTES, RewardFunctionError, resolve_functions
from twofold.engine.verifier.worker import RewardValueError, as_reward

REPO = Path(__file__).resolve().parents[1]
# function -> what its error line says
BROKEN = {"raises": "ZeroDivisionError: division by zero", "hangs": "timed out after 1 s",
          "nan": "returned nan, not a finite number", "infinite": "returned -inf, not a finite number",
          "text": "returned str 'good', not a number", "several": "returned list [1.0, 0.0], not a number",
          "nothing": "returned NoneType None, not a number", "huge": "returned int of 1329 bits",
          "exits": "SystemExit: 3", "dies": "the worker process exited with code 3 during the call",
          "hog": "MemoryError", "chatty": f"printed more than {MAX_OUTPUT_BYTES} bytes in one call"}


@pytest.fixture(scope="module")
def broken_pool():
    functions = [("tests.verifier_functions:boxed_bonus", 0.25)] + [
        (f"tests.verifier_functions:{name}", 1.0) for name in BROKEN]
    with VerifierPool(num_workers=2, timeout=1.0, memory_mb=512, functions=functions) as pool:
        yield pool


def test_every_broken_reward_function_is_counted_and_the_rest_of_the_reward_stands(broken_pool, caplog, capfd):
    with caplog.at_level(logging.WARNING, logger="twofold"):
        batch = broken_pool.reward_batch(["\\boxed{3}", "\\boxed{4}"], ["3", "3"])
    assert batch.correct == [1.0, 0.0]  # the verifier's verdicts, untouched by the failures
    assert batch.values["boxed_bonus"] == [1.0, 1.0]
    assert batch.scores == [1.25, 0.25]  # check + 0.25 * bonus; every broken term adds 0
    for name, says in BROKEN.items():
        assert batch.values[name] == [None, None] and batch.calls[name] == 2, name
        assert len(batch.errors[name]) == 2 and all(says in e for e in batch.errors[name]), (name, batch.errors)
    assert batch.errors["boxed_bonus"] == []
    # one log line per function, with its name and the first traceback
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reward function ")]
    assert sorted(m.split()[2] for m in logged) == sorted(BROKEN)
    raised = next(m for m in logged if m.startswith("reward function raises failed"))
    assert "Traceback" in raised and "return 1 / 0" in raised
    # the endless printer was cut off at the cap: its output did not flood our stderr
    assert len(capfd.readouterr().err) < 4 * MAX_OUTPUT_BYTES
    # failures are never cached: the next batch calls again (and a good function's value is cached)
    again = broken_pool.reward_batch(["\\boxed{3}"], ["3"])
    assert again.calls["raises"] == 1 and again.calls["boxed_bonus"] == 0 and again.scores == [1.25]


@pytest.mark.parametrize("value", [True, 0, 1, -2.5, 3.0])
def test_numbers_are_rewards(value):
    assert as_reward(value) == float(value)


def test_numpy_and_tensor_scalars_are_rewards():
    import numpy as np
    import torch
    assert as_reward(np.float32(0.5)) == 0.5 and as_reward(np.int64(2)) == 2.0 and as_reward(torch.tensor(1.5)) == 1.5
    with pytest.raises(RewardValueError):
        as_reward(torch.tensor([1.0, 2.0]))
    with pytest.raises(RewardValueError):
        as_reward(np.float64("nan"))


def test_rollout_metrics_hold_accuracy_from_the_verifier_and_one_entry_per_function(broken_pool):
    """rollout/accuracy is the verifier's correctness even when the shaped reward is above the threshold for
    every sample; each function logs its mean and its error count."""
    stats = RolloutStats(samples=2, checked=2, correct=2.0, reward=1.5)  # both positive by the shaped reward
    stats.add(broken_pool.reward_batch(["\\boxed{3}", "\\boxed{4}"], ["3", "3"]))
    metrics = stats.metrics()
    assert metrics["rollout/accuracy"] == 0.5 and metrics["rollout/positive_frac"] == 1.0
    assert metrics["reward/boxed_bonus/mean"] == 1.0 and metrics["reward/boxed_bonus/errors"] == 0
    assert metrics["reward/raises/errors"] == 2 and metrics["reward/raises/mean"] == 0.0


def test_a_function_failing_past_max_error_frac_stops_the_run_naming_it():
    step = {"good": {"calls": 10, "errors": 0, "first_error": None},
            "flaky": {"calls": 10, "errors": 1, "first_error": "ZeroDivisionError: division by zero"}}
    check_reward_errors(step, 0.1)  # 1 of 10 is not more than 10 %
    totals = merged(step, {"flaky": {"calls": 2, "errors": 1, "first_error": "KeyError: 'x'"}})
    assert totals["flaky"] == {"calls": 12, "errors": 2, "first_error": "ZeroDivisionError: division by zero"}
    with pytest.raises(RewardFunctionError) as stop:
        check_reward_errors(totals, 0.1)
    message = str(stop.value)
    assert "\n" not in message and "reward function flaky failed on 2 of its 12 calls" in message
    assert "ZeroDivisionError: division by zero" in message and "reward.max_error_frac=0.1" in message
    check_reward_errors(totals, 1.0)  # 1: never stop


def test_unimportable_functions_are_named_before_anything_starts(tmp_path):
    good = tmp_path / "my_rewards.py"
    good.write_text("def length(response, gold):\n    return len(response) / 100\n")
    resolve_functions([f"{good}:length", "tests.verifier_functions:boxed_bonus"])
    with pytest.raises(RewardFunctionError) as missing:
        resolve_functions(["tests.verifier_functions:boxed_bonus", "no_such_module:score", f"{good}:lenght"])
    message = str(missing.value)
    assert "reward.functions[1] no_such_module:score: ModuleNotFoundError: No module named 'no_such_module'" in message
    assert f"reward.functions[2] {good}:lenght: AttributeError" in message and "\n" not in message


def test_a_reward_function_in_a_file_runs_in_the_workers(tmp_path):
    """path/to/file.py:function, relative to the working directory as well as absolute."""
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "mine.py").write_text("def short(response, gold):\n    return float(len(response) < 10)\n")
    config = load_config(None, ["model.preset=tiny-qwen2", "train.mode=online", "objective.name=nft",
                                f"data.path={REPO / 'configs/data/tiny_arith.jsonl'}",
                                "reward.functions=[{name: 'rewards/mine.py:short'}]"])
    assert config.reward.functions[0].name == "rewards/mine.py:short"
    code = ("from twofold.engine.verifier import VerifierPool\n"
            "with VerifierPool(1, functions=[('rewards/mine.py:short', 1.0)]) as pool:\n"
            "    print(pool.reward_batch(['\\\\boxed{1}', 'x' * 20 + '\\\\boxed{2}'], ['1', '1']).scores)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[2.0, 0.0]", out.stderr


def test_the_train_command_names_an_unimportable_function_and_starts_nothing(tmp_path):
    from twofold.engine.run.train import main
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(REPO / "configs/demo_nft.yaml"), "model.path=", "model.preset=tiny-qwen2",
              f"run_dir={tmp_path / 'run'}", "eval.path=", f"data.path={REPO / 'configs/data/tiny_arith.jsonl'}",
              "reward.functions=[{name: 'no_such_module:score'}]"])
    assert str(stop.value.code).startswith("error: reward.functions[0] no_such_module:score: ModuleNotFoundError")
    assert not (tmp_path / "run").exists()  # nothing was started or written
