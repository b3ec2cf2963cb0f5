"""Offline dataset: JSONL rows -> tokenized `Sequence`s, and a resumable stream of global mini-batches.

Row formats: {"prompt": str, "response": str, <name>: number, ...}, or a preference pair
{"prompt": str, "chosen": str, "rejected": str, ...}, which becomes two sequences with the fields pair_id (the row
id) and chosen (1/0). Numbers become per-sequence fields that the objective reads by its own argument names
("rewards", "advantages", "group_ids", ...). The row id is the 1-based line number.
Bad rows: a malformed row stops the run with its id (data.on_bad_row=error) or is logged and skipped (skip);
an empty response or a sequence over the micro-batch budget is always logged and skipped.

Order: epoch e visits the sequences in a permutation seeded by (seed, e). The position is the number of sequences
consumed since the start, so resuming (at any world size) continues with exactly the next sequence, across epoch
boundaries too. The dataset's fingerprint is saved with the position: resuming on a different dataset fails loudly
instead of silently skipping rows.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from engine.packing import Sequence, check_sequence

log = logging.getLogger("twofold.data")


def load_sequences(path: str | Path, tokenizer, budget: int, on_bad_row: str = "error") -> list[Sequence]:
    """Tokenize every usable row: prompt tokens (with the tokenizer's special tokens) + response + EOS."""
    sequences, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for row_id, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                prompt, responses = parse_row(line, row_id)
            except ValueError as err:
                if on_bad_row == "error":
                    raise ValueError(f"{path} row {row_id}: {err} (set data.on_bad_row=skip to skip such rows)")
                log.warning("skipping %s row %d: %s", path, row_id, err)
                skipped += 1
                continue
            row = [tokenize(tokenizer, prompt, response, row_id, fields) for response, fields in responses]
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


TEXT_KEYS = ("prompt", "response", "chosen", "rejected")


def parse_row(line: str, row_id: int) -> tuple[str, list[tuple[str, dict[str, float]]]]:
    """(prompt, [(response, fields), ...]): one response, or the chosen and rejected sides of a pair."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    sides = ("chosen", "rejected") if "chosen" in row and "response" not in row else ("response",)
    for key in ("prompt", *sides):
        if not isinstance(row.get(key), str):
            raise ValueError(f"field {key!r} must be a string, got {row.get(key)!r}")
    fields = {}
    for key, value in row.items():
        if key in TEXT_KEYS:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"field {key!r} must be a number, got {value!r}")
        fields[key] = value
    if sides == ("response",):
        return row["prompt"], [(row["response"], fields)]
    return row["prompt"], [(row[side], {**fields, "pair_id": row_id, "chosen": int(side == "chosen")})
                           for side in sides]


def tokenize(tokenizer, prompt: str, response: str, row_id, fields: dict | None = None) -> Sequence:
    prompt_ids = tokenizer(prompt).input_ids
    response_ids = tokenizer(response, add_special_tokens=False).input_ids if response else []
    if response_ids:
        response_ids.append(tokenizer.eos_token_id)
    return Sequence(tokens=prompt_ids + response_ids, prompt_len=len(prompt_ids), row_id=row_id,
                    fields=dict(fields or {}))


def fingerprint(sequences: list[Sequence]) -> str:
    digest = hashlib.sha256()
    for seq in sequences:
        digest.update(repr((seq.row_id, seq.tokens, seq.prompt_len)).encode())
    return digest.hexdigest()[:16]


class BatchStream:
    """Global mini-batches of `batch_size` rows (a pair row gives two sequences) in a seeded, resumable order."""

    def __init__(self, sequences: list[Sequence], batch_size: int, shuffle: bool, seed: int):
        self.rows: list[list[Sequence]] = []
        for seq in sequences:  # the sequences of one row are consecutive and share its row id
            if self.rows and self.rows[-1][0].row_id == seq.row_id:
                self.rows[-1].append(seq)
            else:
                self.rows.append([seq])
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.consumed = 0
        self.fingerprint = fingerprint(sequences)

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.rows)))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=generator).tolist()

    def next_batch(self) -> list[Sequence]:
        n = len(self.rows)
        batch, orders = [], {}
        for position in range(self.consumed, self.consumed + self.batch_size):
            epoch = position // n
            order = orders.setdefault(epoch, self._order(epoch))
            batch.extend(self.rows[order[position % n]])
        self.consumed += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(f"the dataset differs from the one in the checkpoint (fingerprint {self.fingerprint} vs "
                             f"{state['fingerprint']}): resuming would silently shift the data order")
        self.consumed = state["consumed"]
