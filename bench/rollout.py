"""Rollout benchmark: weight sync (FSDP2 policy -> in-process sampler) and sampling throughput.

    python -m bench.rollout                                   # CPU: tiny model, vLLM backend
    python -m bench.rollout --backend transformers            # the fallback, same numbers
    torchrun --nproc_per_node=2 -m bench.rollout              # one engine per rank, each sampling its share
    python -m bench.rollout --shape qwen2.5-1.5b-shape --prompts 64 --samples-per-prompt 8 --max-new-tokens 512   # GPU

Prints sync time, bytes and bandwidth, and generated tokens/s over all ranks. On a GPU it also estimates the sync
time of a Qwen2.5-7B-shaped model from its bf16 bytes and the measured bandwidth; without a GPU that estimate is
not printed (CPU bandwidth says nothing about a GPU).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, Qwen2Config

from twofold.engine.run.schema import ModelConfig
from twofold.engine.train.distributed import init_distributed, shutdown_distributed
from twofold.engine.train.model import build_policy
from twofold.engine.rollout.backends import build_sampler
from twofold.engine.rollout.sampler import GenerationParams, SamplerConfig, sample_distributed, write_model_dir
from twofold.engine.train.tiny import CHAR_VOCAB_SIZE, build_char_tokenizer, preset_config
from twofold.engine.rollout.weight_sync import sync_weights


def tiny_sampler_config(tie: bool = True) -> PretrainedConfig:
    """Smallest shape vLLM's CPU attention accepts (head_dim 64); char-tokenizer vocabulary."""
    return Qwen2Config(vocab_size=CHAR_VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                       tie_word_embeddings=tie, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                       initializer_range=0.1)  # larger than the default 0.02: peaked logits, fewer greedy near-ties


# Qwen2.5-7B's published config.json: only its parameter count is used (the sync-time estimate).
QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)


def write_tiny_model(directory, seed: int = 0, tie: bool = True) -> str:
    """Tiny checkpoint (fp32 weights, char tokenizer) that both the trainer and vLLM load."""
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_sampler_config(tie), dtype=torch.float32).save_pretrained(directory)
    build_char_tokenizer().save_pretrained(directory)
    return str(directory)


def qwen2_parameter_count(vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
                          num_key_value_heads, tie_word_embeddings) -> int:
    head_dim = hidden_size // num_attention_heads
    kv = num_key_value_heads * head_dim
    attn = hidden_size * hidden_size * 2 + hidden_size * kv * 2 + hidden_size + 2 * kv  # q,o + k,v + biases
    layer = attn + 3 * hidden_size * intermediate_size + 2 * hidden_size
    embed = vocab_size * hidden_size
    return num_hidden_layers * layer + embed * (1 if tie_word_embeddings else 2) + hidden_size


def prepare(shape: str, directory: str, dtype: str):
    """(trainer model config, sampler model dir): the trainer owns the weights, the sampler gets none from disk."""
    if shape == "tiny":
        path = write_tiny_model(directory)
        return ModelConfig(path=path, dtype=dtype, attn_implementation="sdpa"), path
    return ModelConfig(preset=shape, dtype=dtype), write_model_dir(preset_config(shape), build_char_tokenizer(),
                                                                   directory)


def run(args) -> dict:
    env = init_distributed()
    with tempfile.TemporaryDirectory() as tmp:  # rank 0's directory is read by every rank (one machine)
        setup = [*prepare(args.shape, tmp, args.dtype)] if env.is_main else [None, None]
        if env.world_size > 1:
            torch.distributed.broadcast_object_list(setup, src=0)
        model_cfg, path = setup
        policy = build_policy(model_cfg, env, seed=0)
        cfg = SamplerConfig(backend=args.backend, dtype=args.dtype, max_model_len=args.max_model_len,
                            kv_cache_gib=args.kv_cache_gib, sync_bucket_mb=args.bucket_mb, seed=args.seed)
        sampler = build_sampler(cfg, path, rank=env.rank)
        syncs = [sync_weights(policy, sampler) for _ in range(args.syncs)]
    params = GenerationParams(n=args.samples_per_prompt, temperature=1.0, max_new_tokens=args.max_new_tokens,
                              seed=args.seed)
    prompts = [f"{i} + {2 * i} = " for i in range(args.prompts)]
    sample_distributed(sampler, prompts[:1], params)  # warm-up (first-call allocations)
    start = time.perf_counter()
    groups = sample_distributed(sampler, prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(s.token_ids) for g in groups for s in g)
    best = min(syncs, key=lambda s: s.seconds)
    report = {"rank": env.rank, "shape": args.shape, "backend": args.backend, "dtype": args.dtype,
              "ranks": env.world_size,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "sync_s": best.seconds, "sync_bytes": best.bytes, "sync_gib_per_s": best.gib_per_s,
              "sync_buckets": best.buckets, "largest_bucket_bytes": best.largest_bucket_bytes,
              "samples": sum(len(g) for g in groups), "generated_tokens": tokens, "rollout_s": elapsed,
              "tokens_per_s": tokens / elapsed}
    if torch.cuda.is_available():
        seven_b = qwen2_parameter_count(**QWEN25_7B) * 2
        report["qwen2.5-7b_bf16_bytes"] = seven_b
        report["qwen2.5-7b_sync_s_estimate"] = seven_b / (best.gib_per_s * 2**30)
    sampler.close()
    shutdown_distributed()
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", help="tiny, or a preset of twofold.engine.train.tiny (qwen2.5-1.5b-shape)")
    parser.add_argument("--backend", default="vllm", choices=["vllm", "transformers"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-cache-gib", type=float, default=0.25)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--syncs", type=int, default=3, help="sync repeats; the fastest is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = parser.parse_args(argv)
    report = run(args)
    if report.pop("rank") == 0:
        print(json.dumps(report) if args.json else "\n".join(f"{k:>28}: {v}" for k, v in report.items()))
    return report


if __name__ == "__main__":
    main()
