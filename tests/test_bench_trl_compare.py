"""bench.trl_compare's table and arguments on fixed numbers (its smallest real run, an SFT start and two runs with
vLLM and TRL, takes minutes: `python -m bench.trl_compare --quick` is the smoke run, not a test)."""
import pytest

from bench.trl_compare import METRICS, parse_args, startup_line, summarise, table_lines


def run(side, pair, step, train, rss, startup):
    return {"side": side, "pair": pair, "step_s": step, "generate_s": [s / 2 for s in step], "train_s": train,
            "peak_rss_mib": rss, "startup_s": startup, "reward_mean": 0.5}


RUNS = [run("twofold", 0, [1.0, 2.0, 9.0], [0.4, 0.4, 0.5], 800.0, 30.0),  # medians: step 2.0, train 0.4
        run("trl", 0, [4.0, 4.0, 5.0], [1.0, 1.0, 1.0], 600.0, 10.0),
        run("trl", 1, [2.0, 2.0, 2.0], [0.5, 0.5, 0.5], 640.0, 12.0),
        run("twofold", 1, [1.5, 1.5, 1.5], [0.5, 0.6, 0.6], 820.0, 24.0)]


def test_ratios_are_taken_pair_by_pair_from_each_runs_median_and_judged_against_the_targets():
    summary = summarise(RUNS)
    assert list(summary) == [key for key, _, _ in METRICS]
    step = summary["step_s"]
    assert step["twofold"] == {"median": 1.75, "min": 1.5, "max": 2.0}
    assert step["ratios"] == [2.0 / 4.0, 1.5 / 2.0]  # pair 0, pair 1 (not the medians of the sides)
    assert step["ratio"]["median"] == pytest.approx(0.625) and step["holds"] is False  # target 0.5
    train = summary["train_s"]
    assert train["ratios"] == [0.4 / 1.0, 0.6 / 0.5] and train["holds"] is True and train["holds_every_pair"] is False
    assert summary["peak_rss_mib"]["ratios"] == [800 / 600, 820 / 640] and summary["peak_rss_mib"]["holds"] is False
    assert summary["startup_s"]["ratios"] == [3.0, 2.0] and summary["generate_s"]["target"] is None
    lines = table_lines(summary)
    assert lines[0].startswith("| metric |") and len(lines) == 2 + len(METRICS)
    assert "| whole step, s | 1.75 [1.50-2.00] | 3.00 [2.00-4.00] | 0.62 [0.50-0.75]x | <= 0.5x | no |" in lines
    assert any(line.startswith("| train phase per step, s |") and line.endswith("| median only |") for line in lines)
    assert "| peak RSS, MiB | 810 [800-820] | 620 [600-640] |" in "\n".join(lines)


def test_a_pair_without_its_trl_run_is_an_error():
    with pytest.raises(ValueError, match="every pair needs one twofold and one TRL run"):
        summarise(RUNS[:1] + RUNS[2:])


def test_arguments():
    args = parse_args([])
    assert (args.pairs, args.steps, args.sft_steps, args.sft, args.out) == (3, 30, 1200, None, None)
    quick = parse_args(["--quick", "--out", "x.json"])
    assert (quick.pairs, quick.steps, quick.sft_steps, quick.out) == (1, 5, 100, "x.json")
    assert parse_args(["--pairs", "2", "--steps", "10", "--sft", "runs/demo/sft/hf"]).sft == "runs/demo/sft/hf"
    with pytest.raises(SystemExit):
        parse_args(["--steps", "1"])


def test_the_startup_line_reads_the_engines_phases():
    run = {"pair": 0, "startup": {"startup/process_s": 7.5, "startup/process_rss_mib": 417.2,
                                  "startup/sampler_s": 11.75, "startup/canary_s": 0.09, "startup/total_s": 19.34}}
    assert startup_line(run) == ("twofold start-up, pair 1 (phase time -> resident set after it): process 7.50 s "
                                 "-> 417 MiB, sampler 11.75 s, canary 0.09 s")
