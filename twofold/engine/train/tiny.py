"""Named random-init model presets and a character-level tokenizer, built locally (nothing is downloaded).

Tests, the CPU demo and the step benchmark use these; `save_preset` writes a preset as a normal HF checkpoint
directory so that every loading path (model.path, vLLM, export round trips) can be exercised on it.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast, Qwen2Config

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
CHARS = string.printable  # digits, letters, punctuation, whitespace: enough for arithmetic and short prose


def _byte_level(char: str) -> str:
    """GPT-2's byte-to-unicode mapping of one ASCII character (printable bytes are themselves, the rest 256 + n)."""
    code = ord(char)
    printable = [*range(ord("!"), ord("~") + 1)]
    return char if code in printable else chr(256 + [b for b in range(256) if b not in printable].index(code))


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; ids 0-3 are <pad> <unk> <bos> <eos>.

    The vocabulary is spelled byte-level (a space is "Ġ", as in GPT-2 and Qwen) with no merges, so that a saved
    copy loaded through `AutoTokenizer` (which rebuilds a Qwen2 tokenizer as byte-level BPE from the vocabulary)
    gives the same ids for the same text."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + [_byte_level(c) for c in sorted(set(CHARS))])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>")


CHAR_VOCAB_SIZE = 128  # >= len(SPECIAL_TOKENS + CHARS) = 104, rounded up for aligned GEMMs


def _tiny_qwen2(tie: bool = True) -> PretrainedConfig:
    return Qwen2Config(vocab_size=CHAR_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=tie, bos_token_id=2, eos_token_id=3, pad_token_id=0)


def _tiny_qwen2_vllm() -> PretrainedConfig:
    # vLLM's CPU attention needs head_dim 64 (it refuses 16): the smallest model the in-process sampler can serve
    return Qwen2Config(vocab_size=CHAR_VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                       tie_word_embeddings=True, bos_token_id=2, eos_token_id=3, pad_token_id=0)


def _tiny_llama() -> PretrainedConfig:
    return LlamaConfig(vocab_size=CHAR_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=0)


def _qwen25_1p5b_shape() -> PretrainedConfig:
    # Qwen2.5-1.5B's published config.json (random weights; for the GPU step benchmark).
    return Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def _cpu_bench_qwen2() -> PretrainedConfig:
    # big enough vocabulary that the LM head dominates memory, small enough for a CPU step in seconds
    return Qwen2Config(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True)


PRESETS = {
    "tiny-qwen2": _tiny_qwen2,                          # tied head
    "tiny-qwen2-untied": lambda: _tiny_qwen2(tie=False),
    "tiny-qwen2-vllm": _tiny_qwen2_vllm,                # head_dim 64
    "tiny-llama": _tiny_llama,                          # untied head
    "cpu-bench-qwen2": _cpu_bench_qwen2,
    "qwen2.5-1.5b-shape": _qwen25_1p5b_shape,
}


def preset_config(name: str) -> PretrainedConfig:
    if name not in PRESETS:
        raise ValueError(f"model.preset {name!r} is unknown; presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


def build_preset_model(name: str, seed: int = 0) -> torch.nn.Module:
    """Random-init fp32 model of a preset; the same seed gives the same weights on every machine."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(preset_config(name), dtype=torch.float32)


def save_preset(name: str, directory: str | Path, seed: int = 0) -> Path:
    """Write a preset (weights + char tokenizer) as an HF checkpoint directory."""
    directory = Path(directory)
    build_preset_model(name, seed).save_pretrained(directory)
    build_char_tokenizer().save_pretrained(directory)
    return directory
