"""Mini-batches of distinct rows at every batch size, and metrics files a resumed run leaves exactly as an
uninterrupted one would (rows past the checkpoint dropped, strict JSON, a skip line that says why)."""
import json
import logging

import pytest

from twofold.engine.data.loading import BatchStream
from twofold.engine.train.packing import Sequence
from twofold.engine.run.tracking import drop_rows_after, json_row, log_skip, read_metrics


def _rows(n: int, pairs: bool = False) -> list[Sequence]:
    """n rows; with `pairs`, each row gives two sequences (a preference pair), as load_sequences makes them."""
    return [Sequence(tokens=[1, 2, 3], prompt_len=1, row_id=r, fields={"chosen": c})
            for r in range(1, n + 1) for c in ((1, 0) if pairs else (1,))]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("rows", [7, 13, 243])
def test_every_mini_batch_holds_distinct_rows_at_every_batch_size(rows, shuffle):
    for batch_size in range(1, rows + 1):
        stream = BatchStream(_rows(rows), batch_size, shuffle, seed=3)
        for _ in range(3 * rows // batch_size + 2):  # several epoch boundaries
            ids = [s.row_id for s in stream.next_batch()]
            assert len(ids) == batch_size and len(set(ids)) == batch_size, (rows, batch_size, ids)


def test_pair_rows_stay_whole_and_distinct_across_epochs():
    stream = BatchStream(_rows(243, pairs=True), 64, shuffle=True, seed=0)
    for _ in range(12):
        batch = stream.next_batch()
        ids = [s.row_id for s in batch]
        assert len(batch) == 128 and len(set(ids)) == 64
        assert all(sorted(s.fields["chosen"] for s in batch if s.row_id == r) == [0, 1] for r in set(ids))


def test_a_resumed_stream_continues_with_the_same_batches_across_epochs():
    straight = BatchStream(_rows(13), 5, True, seed=1)
    expected = [[s.row_id for s in straight.next_batch()] for _ in range(9)]
    first = BatchStream(_rows(13), 5, True, seed=1)
    for _ in range(4):
        first.next_batch()
    resumed = BatchStream(_rows(13), 5, True, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert [[s.row_id for s in resumed.next_batch()] for _ in range(5)] == expected[4:]


def test_a_batch_larger_than_the_dataset_is_an_error():
    with pytest.raises(ValueError, match="a mini-batch of 8 distinct rows needs at least that many rows; the "
                                         "dataset has 5"):
        BatchStream(_rows(5), 8, True, seed=0)


def test_rows_past_the_checkpoint_are_dropped_once_and_a_torn_line_with_them(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": float(s)}) for s in (1, 2, 3, 4, 3, 4, 5)]  # a crash, then a resume
    path.write_text("\n".join(rows) + '\n{"step": 6, "lo')  # and a kill in the middle of a write
    assert drop_rows_after(path, 2) == 6
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert drop_rows_after(path, 2) == 0
    assert drop_rows_after(tmp_path / "missing.jsonl", 0) == 0


def test_metrics_rows_are_strict_json():
    line = json_row({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-5})
    assert json.loads(line, parse_constant=lambda token: pytest.fail(f"non-JSON token {token}")) == {
        "step": 1, "loss": None, "grad_norm": None, "lr": 1e-5}


@pytest.mark.parametrize("metrics, level, words", [
    ({"skipped": 1.0, "loss": 0.0, "grad_norm": 0.0, "tokens": 0.0}, logging.INFO, "no informative group"),
    ({"skipped": 1.0, "loss": 0.0, "grad_norm": 0.0, "tokens": 0.0, "actor_frozen": 1.0}, logging.INFO,
     "actor frozen"),
    ({"skipped": 1.0, "loss": float("nan"), "grad_norm": 3.0, "tokens": 40.0}, logging.WARNING,
     "non-finite loss nan or gradient norm 3"),
])
def test_the_skip_line_says_why_nothing_was_trained(caplog, metrics, level, words):
    with caplog.at_level(logging.INFO, logger="twofold"):
        log_skip(7, metrics)
    (record,) = caplog.records
    assert record.levelno == level and f"step 7" in record.getMessage() and words in record.getMessage()


def test_every_metrics_row_is_fsynced_before_the_next_step(tmp_path, monkeypatch):
    """A row reaches the disk (not only the page cache) when it is logged, and a rewrite of the file is on disk
    before it replaces the old one: power loss cannot leave a checkpoint ahead of its metrics, or an empty file."""
    import os

    from twofold.engine import tracking
    from twofold.engine.run.config import load_config
    synced = []
    real = os.fsync
    monkeypatch.setattr(tracking.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                          real(fd)))
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    config = load_config(None, ["model.preset=tiny-qwen2", f"data.path={tmp_path / 'd.jsonl'}",
                                f"run_dir={tmp_path}", "log.progress_bar=false"])
    tracker = tracking.Tracker(config, True, 0)
    for step in (1, 2):
        tracker.log({"step": step, "loss": 1.0, "grad_norm": 1.0, "tokens_per_s": 1.0})
        assert synced[-1] == str(tmp_path / "metrics.jsonl") and len(synced) == step
    tracker.log_eval(2, {"eval/pass1_greedy": 0.5})
    assert synced[-1] == str(tmp_path / "eval.jsonl")
    tracker.close(plot=False)
    tracking.drop_rows_after(tmp_path / "metrics.jsonl", 1)
    assert synced[-1] == str(tmp_path / ".metrics.jsonl.tmp")
