"""Datasets: JSONL or Parquet rows -> tokenized `Sequence`s, and a resumable stream of global mini-batches.

Row formats (field names configurable, `Fields`): {"prompt": str, "response": str, <name>: number, ...}, or a preference pair
{"prompt": str, "chosen": str, "rejected": str, ...}, which becomes two sequences with the fields pair_id (the row
id) and chosen (1/0). Numbers become per-sequence fields that the objective reads by its own argument names
("rewards", "advantages", "group_ids", ...). The row id is the 1-based line number.
Bad rows: a malformed row stops the run with its id (data.on_bad_row=error) or is logged and skipped (skip);
an empty response or a sequence over the micro-batch budget is always logged and skipped.

Order: epoch e visits the rows in a permutation seeded by (seed, e); the epochs' permutations, one after another,
are the stream. A mini-batch takes the next rows of the stream, passing over a row it already holds (near an epoch
boundary the next permutation may bring back a row of the previous one's tail), so every mini-batch holds distinct
rows. The position is the number of stream slots consumed since the start, so resuming (at any world size)
continues with exactly the next row, across epoch boundaries too. The dataset's fingerprint is saved with the
position: resuming on a different dataset fails loudly instead of silently skipping rows.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from twofold.engine.packing import Sequence, check_sequence

log = logging.getLogger("twofold.data")


@dataclass(frozen=True)
class Fields:
    """Column names of a dataset and the text put around each prompt (`data.*_field`, `data.prompt_template`)."""

    prompt: str = "prompt"
    response: str = "response"
    chosen: str = "chosen"
    rejected: str = "rejected"
    answer: str = "answer"
    template: str = "{prompt}"

    @classmethod
    def from_config(cls, data) -> "Fields":
        return cls(data.prompt_field, data.response_field, data.chosen_field, data.rejected_field,
                   data.answer_field, data.prompt_template)

    @property
    def text(self) -> tuple[str, ...]:
        return (self.prompt, self.response, self.chosen, self.rejected, self.answer)


DEFAULT_FIELDS = Fields()


def read_rows(path: str | Path, file_format: str = "auto") -> Iterator[tuple[int, dict | str]]:
    """(row id, row) for every row; row id is the 1-based line (JSONL) or row number (Parquet). A JSONL line that
    is not a JSON object comes back as the error message (a str) so that the caller decides to stop or skip."""
    path = Path(path)
    if file_format == "parquet" or (file_format == "auto" and path.suffix == ".parquet"):
        yield from _parquet_rows(path)
        return
    with open(path, "rb") as f:  # decoded line by line: a bad byte is that row's error, not the file's
        for row_id, line in enumerate(f, start=1):
            if line.strip():
                yield row_id, _json_row(line)


def _json_row(raw: bytes) -> dict | str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg} at column {err.colno})"
    return row if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert it to JSONL")
    row_id = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            row_id += 1
            yield row_id, row


def load_sequences(path: str | Path, tokenizer, budget: int, on_bad_row: str = "error",
                   fields: Fields = DEFAULT_FIELDS, file_format: str = "auto") -> list[Sequence]:
    """Tokenize every usable row: prompt tokens (with the tokenizer's special tokens) + response + EOS."""
    sequences, skipped = [], 0
    for row_id, row in read_rows(path, file_format):
        try:
            prompt, responses = parse_row(row, fields, row_id)
        except ValueError as err:
            if on_bad_row == "error":
                raise ValueError(f"{path} row {row_id}: {err} (set data.on_bad_row=skip to skip such rows)")
            log.warning("skipping %s row %d: %s", path, row_id, err)
            skipped += 1
            continue
        row = [tokenize(tokenizer, fields.template.format(prompt=prompt), response, row_id, values)
               for response, values in responses]
        problem = next((p for q in row if (p := check_sequence(q, budget))), None)
        if problem is None and sequences and set(row[0].fields) != set(sequences[0].fields):
            problem = f"numeric fields {sorted(row[0].fields)} differ from row {sequences[0].row_id}'s"
        if problem:
            log.warning("skipping %s row %d: %s", path, row_id, problem)
            skipped += 1
            continue
        sequences.extend(row)
    if not sequences:
        raise ValueError(f"{path}: no usable rows ({skipped} skipped)")
    log.info("loaded %d sequences from %s (%d rows skipped)", len(sequences), path, skipped)
    return sequences


def parse_row(row: dict | str, fields: Fields = DEFAULT_FIELDS, row_id: int = 0
              ) -> tuple[str, list[tuple[str, dict[str, float]]]]:
    """(prompt, [(response, fields), ...]): one response, or the chosen and rejected sides of a pair."""
    if isinstance(row, str):
        raise ValueError(row)
    pair = fields.chosen in row and fields.response not in row
    sides = (fields.chosen, fields.rejected) if pair else (fields.response,)
    for key in (fields.prompt, *sides):
        require_text(row, key)
    values = {}
    for key, value in row.items():
        if key in fields.text:
            continue
        values[key] = require_number(row, key)
    prompt = row[fields.prompt]
    if not pair:
        return prompt, [(row[fields.response], values)]
    return prompt, [(row[side], {**values, "pair_id": row_id, "chosen": int(side == fields.chosen)})
                    for side in sides]


def require_number(row: dict, key: str) -> float | int:
    """A finite number (JSON's NaN / Infinity tokens, and Parquet's NaN, would poison the loss steps later)."""
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"field {key!r} must be a number, got {value!r}")
    if isinstance(value, int) and not -2**63 <= value < 2**63:
        raise ValueError(f"field {key!r} is out of range for a 64-bit integer: {value}")
    if not math.isfinite(value):
        raise ValueError(f"field {key!r} must be a finite number, got {value!r}")
    return value


def require_text(row: dict, key: str) -> str:
    if key not in row:
        raise ValueError(f"missing field {key!r} (row has {sorted(row)})")
    if not isinstance(row[key], str):
        raise ValueError(f"field {key!r} must be a string, got {row[key]!r}")
    return row[key]


def tokenize(tokenizer, prompt: str, response: str, row_id, fields: dict | None = None) -> Sequence:
    prompt_ids = tokenizer(prompt).input_ids
    response_ids = tokenizer(response, add_special_tokens=False).input_ids if response else []
    if response_ids:
        response_ids.append(tokenizer.eos_token_id)
    return Sequence(tokens=prompt_ids + response_ids, prompt_len=len(prompt_ids), row_id=row_id,
                    fields=dict(fields or {}))


def fingerprint(items: list) -> str:
    """Hash of the rows' content: `Sequence`s (tokens) or prompt problems (prompt ids and gold answer)."""
    digest = hashlib.sha256()
    for item in items:
        if isinstance(item, Sequence):
            key = (item.row_id, item.tokens, item.prompt_len)
        else:
            key = (item.row_id, list(item.prompt_ids), item.answer)
        digest.update(repr(key).encode())
    return digest.hexdigest()[:16]


class BatchStream:
    """Global mini-batches of `batch_size` rows (a pair row gives two sequences) in a seeded, resumable order.
    Items are `Sequence`s or any rows with a `row_id` (the online loop streams prompt problems)."""

    def __init__(self, sequences: list, batch_size: int, shuffle: bool, seed: int):
        self.rows: list[list[Sequence]] = []
        for seq in sequences:  # the sequences of one row are consecutive and share its row id
            if self.rows and self.rows[-1][0].row_id == seq.row_id:
                self.rows[-1].append(seq)
            else:
                self.rows.append([seq])
        if not 1 <= batch_size <= len(self.rows):
            raise ValueError(f"a mini-batch of {batch_size} distinct rows needs at least that many rows; the dataset "
                             f"has {len(self.rows)}")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.consumed = 0
        self._orders: dict[int, list[int]] = {}
        self.fingerprint = fingerprint(sequences)

    def _order(self, epoch: int) -> list[int]:
        """Epoch `epoch`'s permutation of the rows, kept while the stream is in it (a batch spans two at most)."""
        if epoch not in self._orders:
            if not self.shuffle:
                order = list(range(len(self.rows)))
            else:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(len(self.rows), generator=generator).tolist()
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1} | {epoch: order}
        return self._orders[epoch]

    def next_batch(self) -> list[Sequence]:
        n = len(self.rows)
        picked = {}  # row index -> its sequences, in stream order
        while len(picked) < self.batch_size:  # a batch spans at most two epochs, as batch_size <= n
            epoch, slot = divmod(self.consumed, n)
            row = self._order(epoch)[slot]
            picked.setdefault(row, self.rows[row])  # a row the batch already holds is passed over
            self.consumed += 1
        return [seq for seqs in picked.values() for seq in seqs]

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(f"the dataset differs from the one in the checkpoint (fingerprint {self.fingerprint} vs "
                             f"{state['fingerprint']}): resuming would silently shift the data order")
        self.consumed = state["consumed"]
