"""bench.algorithms end to end at its smallest scale (--tiny): SFT start, online arms with the real in-process
vLLM sampler and verifier, the offline stage 2 with evaluation of exported checkpoints, the table and the files."""
import json

from bench import algorithms

ARMS = ["nft_sqrt", "grpo", "oreal", "redi"]  # both table groups, the noise-floor pair, the token RM


def test_tiny_bench_writes_the_table_curves_and_plots(tmp_path):
    out = tmp_path / "results"
    result = algorithms.main(["--tiny", "--arms", ",".join(ARMS), "--seeds", "2", "--run-dir",
                              str(tmp_path / "runs"), "--out", str(out)])
    scale = algorithms.SCALES["tiny"]
    stem = f"algorithms-tiny-{result['date']}"
    saved = json.loads((out / f"{stem}.json").read_text())
    assert saved["seeds"] == 2 and saved["machine"] and saved["wall_s"] > 0
    for arm in ARMS:
        assert (out / stem / f"{arm}.png").stat().st_size > 0
        steps = sorted(int(s) for s in saved["curves"][arm])
        every, last = ((scale.eval_every, scale.rl_steps) if arm in algorithms.ONLINE
                       else (scale.offline_every, scale.offline_steps))
        assert steps == list(range(0, last + 1, every))
        assert all(len(v) == 2 and all(0 <= x <= 1 for x in v) for v in saved["curves"][arm].values())
    # every arm starts from the same SFT model, scored the same way
    assert len({saved["curves"][arm]["0"][0] for arm in ARMS}) == 1
    assert set(saved["noise_floor"]) == {"0", "1"}
    assert saved["noise_floor"]["0"] == 0  # seeds share the start: no gap before training
    # per seed and rollout step (an untrained model may find no informative group, hence no token-RM update)
    assert len(saved["token_rm"]) == 2 and all("step" in m for h in saved["token_rm"] for m in h)
    table = (out / f"{stem}.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and "±" in line]
    assert [r.split(" | ")[0][2:] for r in rows] == [algorithms.LABELS[a] for a in ARMS]
    online = [r for r in rows if r.split(" | ")[0][2:] in {algorithms.LABELS[a] for a in ARMS[:3]}]
    assert all(r.count("±") == scale.rl_steps // scale.eval_every + 1 for r in online)
    assert rows[-1].count("±") == scale.offline_steps // scale.offline_every + 1
    assert any(line.startswith("| noise floor") for line in table)
