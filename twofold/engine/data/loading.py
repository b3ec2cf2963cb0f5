"""Datasets: rows from files, `datasets` directories or the Hub -> tokenized `Sequence`s, and a resumable stream
of global mini-batches.

Sources (`data.path`): a JSONL or Parquet file, a list of them (read in order), a directory written by
`datasets.Dataset.save_to_disk`, or a Hub dataset name (`datasets.load_dataset`, which uses its local cache and
works offline once cached; `data.split` picks the split). The row id is the 1-based row number over all sources.

Row layouts, read as they are (field names configurable, `Fields`; a name may be a dotted path into nested
fields, e.g. verl's `reward_model.ground_truth`):
    {"prompt": str | messages, "response": str, <name>: number, ...}     prompt/response (TRL: "completion")
    {"messages": [{"role": ..., "content": ...}, ..., {"role": "assistant", ...}]}   TRL conversational
    {"prompt": ..., "chosen": str | messages, "rejected": str | messages, ...}      a preference pair
    {"prompt": messages, "reward_model": {"ground_truth": ...}, "data_source": ..., ...}   verl (online)
A prompt given as chat messages is rendered with the tokenizer's chat template (with the generation prompt); a
string prompt goes through `data.prompt_template`, whose special value "chat" renders it as one user message
with the chat template: one knob decides how prompts become text. A pair becomes two sequences with the fields
pair_id (the row id) and chosen (1/0). Numbers become per-sequence fields that the objective reads by its own
argument names ("rewards", "advantages", "group_ids", ...); other non-text values (verl's data_source,
extra_info, ...) are metadata and are ignored.
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

from twofold.engine.train.packing import Sequence, check_sequence

log = logging.getLogger("twofold.data")

CHAT = "chat"
"""`data.prompt_template` value: render string prompts as a user message with the tokenizer's chat template."""
PLACEHOLDER = "{prompt}"
"""Where a string prompt goes in `data.prompt_template`. Plain text replacement, not `str.format`: every other
character of the template, LaTeX braces such as `\\boxed{}` included, is literal."""
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
DATASETS_MARKERS = ("dataset_dict.json", "state.json")
"""Files `datasets.Dataset(Dict).save_to_disk` writes at the top of its directory."""
MISSING = object()


@dataclass(frozen=True)
class Fields:
    """Column names of a dataset and how prompts become text (`data.*_field`, `data.prompt_template`).
    Where a name is left at its default, the field of the TRL / verl layouts is used when the row lacks it
    (`ALIASES`)."""

    prompt: str = "prompt"
    response: str = "response"
    chosen: str = "chosen"
    rejected: str = "rejected"
    answer: str = "answer"
    template: str = PLACEHOLDER
    messages: str = "messages"

    @classmethod
    def from_config(cls, data) -> "Fields":
        return cls(data.prompt_field, data.response_field, data.chosen_field, data.rejected_field,
                   data.answer_field, data.prompt_template)

    @property
    def text(self) -> tuple[str, ...]:
        return (self.prompt, self.response, self.chosen, self.rejected, self.answer, self.messages)


DEFAULT_FIELDS = Fields()
ALIASES = {"response": ("completion",), "answer": ("reward_model.ground_truth",)}
"""Default field name -> the names TRL (completion) and verl (reward_model.ground_truth) give the same thing."""


# ---- sources -------------------------------------------------------------------------------------------------------

def is_local_path(path: str) -> bool:
    """Whether `path` names something on disk (or should: a file suffix, a path-like start, or an `owner/name`
    whose `owner` is a directory here, such as a mistyped `assets/my-model`), not a Hub name."""
    return Path(path).exists() or path.endswith(FILE_SUFFIXES) or path.startswith((".", "/", "~")) \
        or path.count("/") > 1 or (path.count("/") == 1 and Path(path).parent.is_dir())


def check_source(key: str, path: str | list[str]) -> None:
    """Config-time check of `data.path` / `eval.path`: local sources must exist (Hub names are resolved at load)."""
    for item in path if isinstance(path, list) else [path]:
        if not isinstance(item, str) or not item:
            raise ValueError(f"{key} entries must be non-empty paths, got {item!r}")
        if is_local_path(item) and not Path(item).exists():
            raise ValueError(f"{key} {item!r} does not exist")
        if Path(item).is_dir() and not any((Path(item) / f).is_file() for f in DATASETS_MARKERS):
            raise ValueError(f"{key} {item!r} is a directory, not a JSONL or Parquet file nor a directory written by "
                             "datasets' save_to_disk")
        if isinstance(path, list) and not Path(item).is_file():
            raise ValueError(f"{key}: a list of sources must hold files; {item!r} is not a file")


def describe(path: str | list[str] | Path) -> str:
    return ", ".join(map(str, path)) if isinstance(path, list) else str(path)


def read_rows(path: str | Path | list, file_format: str = "auto", split: str = "train"
              ) -> Iterator[tuple[int, dict | str]]:
    """(row id, row) for every row of every source; the row id is the 1-based row (JSONL: line) number over all of
    them. A JSONL
    line that is not a JSON object comes back as the error message (a str) so that the caller decides to stop or
    skip."""
    row_id = 0
    for source in path if isinstance(path, list) else [path]:
        for row in _source_rows(str(source), file_format, split):
            row_id += 1
            if row is not None:
                yield row_id, row


def _source_rows(path: str, file_format: str, split: str) -> Iterator[dict | str]:
    local = Path(path)
    if local.is_dir():
        yield from _dataset_rows(_load_from_disk(local, split))
    elif file_format == "parquet" or (file_format == "auto" and local.suffix == ".parquet"):
        yield from _parquet_rows(local)
    elif local.is_file() or is_local_path(path):
        with open(local, "rb") as f:  # decoded line by line: a bad byte is that row's error, not the file's
            for line in f:
                yield _json_row(line) if line.strip() else None  # a blank line keeps the line numbering
    else:
        yield from _dataset_rows(_load_hub_dataset(path, split))


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


def _parquet_rows(path: Path) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install 'twofold[data]'), or convert it to "
                         "JSONL") from None
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        yield from batch.to_pylist()


def _datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{what} needs the datasets package: pip install 'twofold[data]'") from None
    return datasets


def _pick_split(found, name: str, split: str):
    splits = getattr(found, "keys", None)
    if splits is None:  # a single Dataset
        return found
    if split not in found:
        raise ValueError(f"{name} has no split {split!r} (data.split); splits: {', '.join(found.keys())}")
    return found[split]


def _load_from_disk(path: Path, split: str):
    datasets = _datasets(f"data.path {path} (a directory)")
    try:
        found = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise ValueError(f"{path} is a directory but not one written by datasets' save_to_disk ({err}); give a "
                         "JSONL/Parquet file or a list of them") from None
    return _pick_split(found, str(path), split)


def _load_hub_dataset(name: str, split: str):
    datasets = _datasets(f"data.path {name!r} (a Hub dataset name)")
    try:
        return datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ConnectionError, OSError) as err:
        raise ValueError(f"data.path {name!r} is neither a local file or directory nor a Hub dataset that can be "
                         f"loaded ({type(err).__name__}: {err}). Offline, load it once where there is network (it is then cached), or "
                         f"fetch the files with `hf download --repo-type dataset {name}` (older huggingface_hub: "
                         f"`huggingface-cli download --repo-type dataset {name}`) and give their paths") from None


def _dataset_rows(dataset) -> Iterator[dict]:
    for batch in dataset.iter(batch_size=4096):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield dict(zip(columns, values))


# ---- fields and prompts --------------------------------------------------------------------------------------------

def get_field(row: dict, name: str, default=MISSING):
    """row[name], or a dotted path into nested mappings (`reward_model.ground_truth`); a key that holds the dot
    itself wins. Missing: `default`, or a ValueError naming the field."""
    if name in row:
        return row[name]
    node = row
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is not MISSING:
                return default
            raise ValueError(f"missing field {name!r} (row has {sorted(row)})")
        node = node[part]
    return node


def find_field(row: dict, name: str, default_name: str):
    """The field `name`, or (when `name` is the default) the same field under its TRL / verl name."""
    for candidate in (name, *(ALIASES.get(default_name, ()) if name == default_name else ())):
        value = get_field(row, candidate, None)
        if value is not None:
            return value
    return get_field(row, name)  # raises, naming the configured field


def check_messages(value, key: str) -> list[dict]:
    """A chat: a non-empty list of {"role": str, "content": str}."""
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise ValueError(f"field {key!r} must be a string or a list of chat messages "
                         f"{{'role': str, 'content': str}}, got {value!r}")
    return value


def prompt_value(value, key: str) -> str | list[dict]:
    return value if isinstance(value, str) else check_messages(value, key)


def response_text(value, key: str) -> str:
    """A response: a string, or chat messages (TRL conversational completions), whose contents are joined."""
    if isinstance(value, str):
        return value
    return "".join(m["content"] for m in check_messages(value, key))


def split_conversation(messages: list[dict], key: str) -> tuple[list[dict], str]:
    """TRL `messages`: everything before the final assistant turn is the prompt, that turn the response."""
    messages = check_messages(messages, key)
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise ValueError(f"field {key!r} must end with an assistant message after the prompt, got roles "
                         f"{[m['role'] for m in messages]}")
    return messages[:-1], messages[-1]["content"]


def row_prompt(row: dict, fields: Fields):
    """The prompt of a row (string or messages); a TRL `messages` row without a prompt field: its user turns."""
    if get_field(row, fields.prompt, None) is None and fields.messages in row:
        messages = check_messages(row[fields.messages], fields.messages)
        return messages[:-1] if messages[-1]["role"] == "assistant" and len(messages) > 1 else messages
    return prompt_value(get_field(row, fields.prompt), fields.prompt)


def fill_template(template: str, prompt: str) -> str:
    """The template with each `{prompt}` replaced by the prompt; nothing else in it is special."""
    return template.replace(PLACEHOLDER, prompt)


def check_template(template: str) -> str | None:
    """What is wrong with a `data.prompt_template` value (None: nothing)."""
    if template != CHAT and PLACEHOLDER not in template:
        return f"must contain {PLACEHOLDER} or be 'chat' (the prompt replaces {PLACEHOLDER}), got {template!r}"
    return None


def prompt_ids(tokenizer, prompt: str | list[dict], template: str = PLACEHOLDER) -> list[int]:
    """Token ids of a prompt: chat messages (or any prompt with template "chat") through the tokenizer's chat
    template with the generation prompt, a string through the template (`fill_template`) with the tokenizer's
    special tokens."""
    if isinstance(prompt, str) and template != CHAT:
        return tokenizer(fill_template(template, prompt)).input_ids
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat-message prompts (or data.prompt_template=chat) need a tokenizer with a chat "
                         "template; set model.tokenizer to one that has it, or give string prompts")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids  # the template already holds BOS and friends


def load_sequences(path, tokenizer, budget: int, on_bad_row: str = "error", fields: Fields = DEFAULT_FIELDS,
                   file_format: str = "auto", split: str = "train") -> list[Sequence]:
    """Tokenize every usable row: prompt tokens (`prompt_ids`) + response + EOS."""
    sequences, skipped, name = [], 0, describe(path)
    for row_id, row in read_rows(path, file_format, split):
        try:
            prompt, responses = parse_row(row, fields, row_id)
            ids = prompt_ids(tokenizer, prompt, fields.template)
        except ValueError as err:
            if on_bad_row == "error":
                raise ValueError(f"{name} row {row_id}: {err} (set data.on_bad_row=skip to skip such rows)")
            log.warning("skipping %s row %d: %s", name, row_id, err)
            skipped += 1
            continue
        row = [tokenize(tokenizer, ids, response, row_id, values) for response, values in responses]
        problem = next((p for q in row if (p := check_sequence(q, budget))), None)
        if problem is None and sequences and set(row[0].fields) != set(sequences[0].fields):
            problem = f"numeric fields {sorted(row[0].fields)} differ from row {sequences[0].row_id}'s"
        if problem:
            log.warning("skipping %s row %d: %s", name, row_id, problem)
            skipped += 1
            continue
        sequences.extend(row)
    if not sequences:
        raise ValueError(f"{name}: no usable rows ({skipped} skipped)")
    log.info("loaded %d sequences from %s (%d rows skipped)", len(sequences), name, skipped)
    return sequences


def parse_row(row: dict | str, fields: Fields = DEFAULT_FIELDS, row_id: int = 0
              ) -> tuple[str | list[dict], list[tuple[str, dict[str, float]]]]:
    """(prompt, [(response, fields), ...]): one response, or the chosen and rejected sides of a pair. The prompt
    is a string or chat messages (see the module docstring for the layouts)."""
    if isinstance(row, str):
        raise ValueError(row)
    pair = get_field(row, fields.chosen, None) is not None and get_field(row, fields.response, None) is None
    if pair:
        sides = [get_field(row, key) for key in (fields.chosen, fields.rejected)]
        if get_field(row, fields.prompt, None) is None and isinstance(sides[0], list):
            prompt, _ = split_conversation(sides[0], fields.chosen)  # TRL's implicit prompt: the shared turns
            texts = [split_conversation(side, key)[1] for side, key in zip(sides, (fields.chosen, fields.rejected))]
        else:
            prompt = row_prompt(row, fields)
            texts = [response_text(side, key) for side, key in zip(sides, (fields.chosen, fields.rejected))]
    elif get_field(row, fields.prompt, None) is None and fields.messages in row:
        prompt, response = split_conversation(row[fields.messages], fields.messages)
        texts = [response]
    else:
        prompt = row_prompt(row, fields)
        texts = [response_text(find_field(row, fields.response, DEFAULT_FIELDS.response), fields.response)]
    values = {}
    for key, value in row.items():
        if key in fields.text or key in ALIASES["response"]:
            continue
        if value is None or isinstance(value, (str, list, dict)):
            continue  # metadata (verl's data_source, extra_info, ...)
        values[key] = require_number(row, key)
    if not pair:
        return prompt, [(texts[0], values)]
    return prompt, [(text, {**values, "pair_id": row_id, "chosen": int(side == 0)})
                    for side, text in enumerate(texts)]


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
    value = get_field(row, key)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {value!r}")
    return value


def tokenize(tokenizer, prompt: list[int], response: str, row_id, fields: dict | None = None) -> Sequence:
    """A sequence from prompt token ids and the response text (+ EOS)."""
    response_ids = tokenizer(response, add_special_tokens=False).input_ids if response else []
    if response_ids:
        response_ids.append(tokenizer.eos_token_id)
    return Sequence(tokens=list(prompt) + response_ids, prompt_len=len(prompt), row_id=row_id,
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
