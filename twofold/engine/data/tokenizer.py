"""The tokenizer a run trains with: `model.tokenizer`, else the model's own, else the character-level tokenizer of
the tiny test/demo model (no `model.path`). Resolved paths only: Hub ids are resolved by `hub` before this."""
from __future__ import annotations

from transformers import AutoTokenizer

from twofold.engine.train.tiny import build_char_tokenizer


def load_tokenizer(config):
    """`config` is a `Config` (anything with `.model.tokenizer` and `.model.path`)."""
    source = config.model.tokenizer or config.model.path
    return AutoTokenizer.from_pretrained(source) if source else build_char_tokenizer()
