"""transformers backend: `model.generate` with its KV cache, for environments without vLLM.

Same interface and semantics as the vLLM backend (see twofold.engine.rollout.sampler). One prompt at a time, its n samples as one
batch (`num_return_sequences`), so no padding can change a result; it is the correctness fallback, not the fast path.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from twofold.engine.rollout.sampler import Bucket, GenerationParams, KeptSets, Sample, Sampler, SamplerConfig

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class HFSampler(Sampler):
    def __init__(self, cfg: SamplerConfig, model_path: str, rank: int = 0):
        super().__init__(cfg, model_path, rank)
        on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        dtype = DTYPES[cfg.dtype]
        if cfg.load_format == "auto":
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=dtype)
        self.model = model.to(self.device).eval()
        self.params = dict(self.model.named_parameters())  # tied weights appear once, under the embedding's name
        self.calls = 0

    @torch.no_grad()
    def load_weights(self, buckets: Iterable[Bucket]) -> None:
        for bucket in buckets:
            for name, tensor in bucket:
                if name not in self.params:
                    raise KeyError(f"weight {name!r} is not a parameter of the sampler's model")
                self.params[name].copy_(tensor)
        self.weight_version += 1

    @torch.no_grad()
    def _generate(self, prompt_ids, params, stop, seeds):
        self.calls += 1
        groups = []
        for i, ids in enumerate(prompt_ids):
            # without a request seed, a per-engine stream: engine seed (+ rank), call count and prompt position
            seed = seeds[i] if seeds is not None else hash((self.cfg.seed + self.rank, self.calls, i)) % 2**63
            groups.append(self.generate_group(ids, params, stop, seed))
        return groups

    def generate_group(self, ids: list[int], params: GenerationParams, stop: tuple[str, ...], seed: int):
        greedy = params.temperature == 0
        sampling = {} if greedy else dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        end_ids = ([eos] if eos is not None else []) + list(params.stop_token_ids)
        # seed a forked RNG: sampling leaves the trainer's global RNG untouched
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = self.model.generate(
                torch.tensor([ids], device=self.device), attention_mask=torch.ones(1, len(ids), device=self.device),
                max_new_tokens=self.max_new_tokens(len(ids), params), num_return_sequences=params.n,
                do_sample=not greedy, eos_token_id=end_ids or None, pad_token_id=eos if pad is None else pad,
                stop_strings=list(stop) or None, tokenizer=self.tokenizer if stop else None,
                output_scores=params.logprobs or params.kept, return_dict_in_generate=True, use_cache=True,
                **sampling)
        new = out.sequences[:, len(ids):].tolist()
        # processed scores: temperature, top-k and top-p already applied (masked to -inf) in that order, as vLLM's
        # processed_logprobs; the finite ones are the kept set the token was drawn from
        scores = torch.stack(out.scores, 1).float() if params.logprobs or params.kept else None
        return [self.to_sample(row, None if scores is None else scores[j], params, end_ids, stop)
                for j, row in enumerate(new)]

    def to_sample(self, row: list[int], scores, params: GenerationParams, end_ids: list[int],
                  stop: tuple[str, ...]) -> Sample:
        ids, reason, text = self.trim(row, end_ids, stop)
        sample = Sample(prompt_index=-1, token_ids=ids, text=text, finish_reason=reason)
        if params.logprobs:
            steps = scores[:len(ids)].log_softmax(-1)
            sample.logprobs = steps[torch.arange(len(ids)), torch.tensor(ids, dtype=torch.long)].tolist()
        if params.kept:
            sample.kept = KeptSets.from_mask(torch.isfinite(scores[:len(ids)]))
        return sample

    def trim(self, row: list[int], end_ids: list[int], stop: tuple[str, ...]):
        """Cut a generated row after the token that ended it (generate pads finished rows); text without special
        tokens and without the stop string."""
        eos = self.tokenizer.eos_token_id
        for t, token in enumerate(row):
            if token in end_ids:
                ids = row[:t + 1]
                return ids, "eos" if token == eos else "stop", self.decode(ids)
            text = self.decode(row[:t + 1]) if stop else ""
            hits = [text.find(s) for s in stop if s in text]
            if hits:
                return row[:t + 1], "stop", text[:min(hits)]
        return row, "length", self.decode(row)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
