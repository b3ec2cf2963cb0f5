"""vLLM backend: `vllm.LLM` inside the training process, weights pushed through vLLM's weight-transfer API.

Weight sync uses the public RL protocol of `vllm.LLM` (`init_weight_transfer_engine`, `start_weight_update`,
`update_weights`, `finish_weight_update`) with a backend registered through `WeightTransferEngineFactory`, the
documented extension point. vLLM's own backends move tensors between processes (NCCL broadcast, CUDA IPC); here
the engine lives in the trainer's process, so an update carries the tensors themselves. start/finish run vLLM's
layerwise reload (the same path as `reload_weights(weights_iterator=...)`): each layer is re-processed once all its
weights arrived and copied into the original storage, so kernel re-layouts (CPU GEMM packing) are redone.

Engine per rank: under torchrun, `distributed_executor_backend="external_launcher"`, tensor_parallel_size=1.
"""
from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from twofold.engine.rollout.sampler import (Bucket, FinishReason, GenerationParams, KeptSets, Sample, Sampler,
                                            SamplerConfig, workload_kv_blocks)

# In-process engine core (no spawned process): must be set before vLLM reads its environment.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.config import WeightTransferConfig  # noqa: E402
from vllm.distributed.weight_transfer.base import (  # noqa: E402
    WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory  # noqa: E402
from vllm.model_executor.layers.vocab_parallel_embedding import (  # noqa: E402
    ParallelLMHead, VocabParallelEmbedding)
from vllm.model_executor.model_loader.reload import (  # noqa: E402
    finalize_layerwise_reload, initialize_layerwise_reload)

BACKEND = "twofold_inprocess"
log = logging.getLogger("twofold")


class _ExpectedSyncNoise(logging.Filter):
    """Drops vLLM's per-sync messages that are expected here: the layerwise reload warns "Failed to load weights"
    for layers with no checkpoint tensors of their own (the rotary cache, restored as is; a tied LM head, refreshed
    by `refresh_tied_lm_heads`), and the prefix-cache reset after every sync is logged at INFO. Both would
    otherwise print on every training step; the greedy-equality tests check that the sync is right."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in ("RotaryEmbedding: Failed to load weights", "ParallelLMHead: Failed to load weights"):
            return False
        return message != "Successfully reset prefix cache"


for _name in ("vllm.model_executor.model_loader.reload.layerwise", "vllm.v1.core.block_pool"):
    logging.getLogger(_name).addFilter(_ExpectedSyncNoise())


@dataclass
class InProcessInitInfo(WeightTransferInitInfo):
    """Nothing to rendezvous: trainer and engine share the process."""


@dataclass
class InProcessUpdateInfo(WeightTransferUpdateInfo):
    weights: list[tuple[str, torch.Tensor]]
    """Full tensors in Hugging Face names; they must stay alive until update_weights returns."""


class InProcessWeightTransferEngine(WeightTransferEngine[InProcessInitInfo, InProcessUpdateInfo]):
    init_info_cls = InProcessInitInfo
    update_info_cls = InProcessUpdateInfo

    def init_transfer_engine(self, init_info: InProcessInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: InProcessUpdateInfo) -> None:
        self.model.load_weights(update_info.weights)

    def finish_weight_update(self) -> None:
        finalize_layerwise_reload(self.model, self.model_config)
        refresh_tied_lm_heads(self.model)

    def shutdown(self) -> None:
        pass


def refresh_tied_lm_heads(model: torch.nn.Module) -> None:
    """A tied LM head receives no weights of its own (checkpoints hold only the embedding), so layerwise reload
    leaves it unprocessed; its data is the embedding's, but on CPU its packed GEMM copy would stay stale. Re-run
    its post-load processing (a no-op on GPU)."""
    embeddings = {id(m.weight) for m in model.modules() if type(m) is VocabParallelEmbedding}
    for module in model.modules():
        if isinstance(module, ParallelLMHead) and id(module.weight) in embeddings:
            module.quant_method.process_weights_after_loading(module)


def eager_logprob_ranks() -> None:
    """vLLM's sampler ranks each sampled token with a `torch.compile`d count (`batched_count_greater_than`); on
    CPU its first call traces and builds it with dynamo and inductor, 2-3 s of an online run's start-up (the first
    weight-sync canary pays it) for one comparison and a sum. On CPU the sampler calls the same function
    uncompiled, at the cost of one [seqs, vocab] bool temporary per decoding step."""
    from vllm.v1.sample import sampler as vllm_sampler

    compiled = getattr(vllm_sampler, "batched_count_greater_than", None)  # a vLLM without it: nothing to undo
    if compiled is not None:
        vllm_sampler.batched_count_greater_than = getattr(compiled, "_torchdynamo_orig_callable", compiled)


CPU_TOKENS_PER_STEP = 4096
"""vLLM's own CPU default of `max_num_batched_tokens` (prompt + decode tokens one engine step computes)."""


def whole_prompt_prefill(max_model_len: int) -> dict:
    """Engine arguments that keep every prompt's prefill in one engine step (CPU). With chunked prefill, a step whose
    prompts pass its token budget (vLLM's CPU default: 4096) computes only the first part of the last one, samples
    a token for it anyway and discards that token by rewinding the request's seeded generator
    (`gen.set_offset(gen.get_offset() - 4)` in the GPU model runner, which the CPU runner inherits). A CUDA
    (Philox) generator has an offset; a CPU (Mersenne Twister) generator has none and raises "CPU Generator does not
    use offset", so any seeded batch of more than 4096 prompt tokens crashed. Without chunking a prompt that does
    not fit waits for the next step, whole; the budget must then hold the longest sequence, max_model_len. (vLLM
    warns that turning chunked prefill off is not "officially supported"; the sampler tests hold a seeded batch
    past the budget to the samples each prompt gets alone, and every other sampler test runs with it off.)"""
    return dict(enable_chunked_prefill=False, max_num_batched_tokens=max(CPU_TOKENS_PER_STEP, max_model_len))


def freeze_heap() -> None:
    """vLLM collects garbage three times while it builds an engine (twice in its model loader, once more as it
    freezes its heap at the end), and each full pass walks every Python object in the process: with torch,
    transformers and vLLM imported, ~0.3-0.6 s a pass on a CPU, 1.2-1.9 s of the demo's start-up. One pass now,
    then `gc.freeze()` on the survivors (what vLLM itself does to every object alive when its engine is built),
    leaves those passes only the objects that the build creates."""
    gc.collect()
    gc.freeze()


class KeptSetRecorder:
    """Records the kept set of every sampled token from vLLM's own sampler: a forward hook on its top-k/top-p module
    (`TopKTopPSampler`, installed through `LLM.collective_rpc`, so it runs inside the in-process engine) reads the
    processed log-probs that module returns (`logprobs_mode="processed_logprobs"`: log-softmax of the tempered,
    top-k- then top-p-masked logits, -inf outside the kept set) and the tokens it drew, one batch row per running
    request. So the set is the one vLLM sampled from, by construction, whatever its tie rules; nothing is
    recomputed. Cost: one pass over the [rows, V] mask and its nonzero ids per decoding step (`cost_s`, CPU
    seconds; 0.3-0.9 ms per token on one CPU core at V = 32,000-151,936, bench/README.md "Kept-set head").

    Rows are keyed by vLLM's internal request id and the request's output length at that step (its token's
    position), so a partial-prefill row, whose draw vLLM discards, is overwritten by the real one."""

    def __init__(self):
        self.active = False
        self.rows: dict[str, dict[int, tuple[int, torch.Tensor]]] = {}
        self.cost_s = 0.0
        self.tokens = 0

    def install(self, worker) -> bool:
        runner = worker.model_runner
        runner.sampler.topk_topp_sampler.register_forward_hook(lambda module, args, out: self.record(runner, out))
        return True

    def record(self, runner, out) -> None:
        if not self.active:
            return
        start = time.thread_time()  # CPU time of this thread: what the recording costs, whatever else runs
        sampled, processed = out
        if processed is None:
            raise RuntimeError("kept sets need vLLM's processed log-probs: request logprobs with kept=True")
        batch = runner.input_batch
        mask = processed > float("-inf")  # log-probs: finite or -inf (one pass; isfinite is two)
        ids = mask.nonzero()[:, 1].to(torch.int32).split(mask.sum(1).tolist())
        for i, (req, token, row) in enumerate(zip(batch.req_ids, sampled.tolist(), ids)):
            self.rows.setdefault(req, {})[len(batch.req_output_token_ids[i])] = (token, row)
        self.tokens += len(ids)
        self.cost_s += time.thread_time() - start

    def take(self, outputs) -> dict[tuple[int, int], KeptSets]:
        """{(output number, completion index): KeptSets} for vLLM's outputs, each checked against its tokens."""
        by_base = {req.rsplit("-", 1)[0]: rows for req, rows in self.rows.items()}  # internal id = id-<suffix>
        self.rows, out = {}, {}
        for o_index, o in enumerate(outputs):
            for c in o.outputs:
                key = f"{c.index}_{o.request_id}" if len(o.outputs) > 1 else o.request_id
                rows = by_base.get(key, {})
                tokens = [rows[t][0] if t in rows else None for t in range(len(c.token_ids))]
                if tokens != list(c.token_ids):
                    raise RuntimeError(f"vLLM request {key!r}: the recorded kept sets do not line up with its "
                                       f"{len(c.token_ids)} sampled tokens (recorded {len(rows)})")
                out[o_index, c.index] = KeptSets.from_rows([rows[t][1] for t in range(len(c.token_ids))])
        return out


def register_backend() -> None:
    if BACKEND not in WeightTransferEngineFactory._registry:  # no public "is registered" query
        WeightTransferEngineFactory.register_engine(BACKEND, InProcessWeightTransferEngine)


class VLLMSampler(Sampler):
    def __init__(self, cfg: SamplerConfig, model_path: str, rank: int = 0):
        super().__init__(cfg, model_path, rank)
        register_backend()
        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu:
            eager_logprob_ranks()
        self.sleep_mode = cfg.sleep_mode and self.on_gpu
        freeze_heap()
        self.llm = LLM(**self.engine_args())
        self.llm.init_weight_transfer_engine({"init_info": {}})
        self.kept = KeptSetRecorder()
        self.llm.collective_rpc(self.kept.install)
        self.asleep = False
        self.sleep()

    def engine_args(self) -> dict:
        cfg = self.cfg
        args = dict(model=self.model_path, dtype=cfg.dtype, max_model_len=cfg.max_model_len, seed=cfg.seed + self.rank,
                    load_format=cfg.load_format, enforce_eager=cfg.enforce_eager, max_num_seqs=cfg.max_num_seqs,
                    enable_prefix_caching=True, enable_sleep_mode=self.sleep_mode,
                    logprobs_mode="processed_logprobs",  # temperature/top-p applied: the sampling distribution
                    weight_transfer_config=WeightTransferConfig(backend=BACKEND))
        if not self.on_gpu:
            args.update(whole_prompt_prefill(cfg.max_model_len))
        if "RANK" in os.environ:  # torchrun: one engine per rank, sharing the launcher's process group
            args.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1)
        kv_cache_gib = cfg.kv_cache_gib
        if kv_cache_gib == 0 and not self.on_gpu:  # a GPU setting: on CPU vLLM would reserve a RAM fraction (9 GiB)
            log.warning("sampler.kv_cache_gib=0 leaves the KV cache to gpu_memory_utilization, which a CPU has none "
                        "of: sizing it from the workload instead (as kv_cache_gib=null)")
            kv_cache_gib = None
        if kv_cache_gib is None:  # the blocks, and their bytes (on CPU vLLM otherwise reserves a RAM fraction)
            blocks, block_bytes = self.workload_blocks(args)
            args.update(num_gpu_blocks_override=blocks, kv_cache_memory_bytes=blocks * block_bytes)
        elif kv_cache_gib > 0:
            args["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        else:
            args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        return args

    def workload_blocks(self, args: dict) -> tuple[int, int]:
        """(`workload_kv_blocks`, bytes per block) in the engine's own block size, which vLLM picks per platform
        and attention backend (128 on CPU): its config is resolved here as the engine will resolve it (a second
        resolution takes ~10 ms; the first pays imports that the engine would pay anyway). A block's bytes are
        K and V of every layer (an upper bound for MLA or sliding-window layers, which store less); the engine
        gets that many bytes and exactly that many blocks."""
        from vllm.engine.arg_utils import EngineArgs

        config = EngineArgs(**args).create_engine_config()
        model, block = config.model_config, config.cache_config.block_size
        layers = model.get_num_layers(config.parallel_config)
        per_token = 2 * model.get_num_kv_heads(config.parallel_config) * model.get_head_size() * model.dtype.itemsize
        block_bytes = block * per_token * layers
        return workload_kv_blocks(self.cfg.max_num_seqs, self.cfg.max_model_len, block, block_bytes), block_bytes

    def load_weights(self, buckets: Iterable[Bucket]) -> None:
        # wake weights -> load -> wake KV cache (GPU sleep mode); never reload from disk after this
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.start_weight_update()
        for bucket in buckets:
            self.llm.update_weights({"update_info": {"weights": bucket}})
        self.llm.finish_weight_update()
        if self.asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.weight_version += 1

    def _generate(self, prompt_ids, params, stop, seeds):
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        sampling = [self.sampling_params(len(ids), params, stop, None if seeds is None else seeds[i])
                    for i, ids in enumerate(prompt_ids)]
        self.kept.active = params.kept
        try:
            outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        finally:
            self.kept.active = False
        self.sleep()
        kept = self.kept.take(outputs) if params.kept else {}
        groups = [[self.to_sample(c, params.logprobs, kept.get((i, c.index)))
                   for c in sorted(out.outputs, key=lambda c: c.index)] for i, out in enumerate(outputs)]
        if not stop:
            self.decode_texts([s for g in groups for s in g])
        return groups

    def sampling_params(self, prompt_len: int, params: GenerationParams, stop, seed) -> SamplingParams:
        # without stop strings vLLM need not detokenize: it would decode every sampled token twice per step
        # (the text, incrementally, and each logprob entry's token string), a third of a CPU decode step's engine
        # time on a small model; `decode_texts` then writes the same text in one call per sample
        # kept sets are read from the processed log-probs, which vLLM forms only when log-probs are requested
        return SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                              max_tokens=self.max_new_tokens(prompt_len, params), stop=list(stop),
                              stop_token_ids=list(params.stop_token_ids), seed=seed,
                              logprobs=0 if params.logprobs or params.kept else None, detokenize=bool(stop))

    def decode_texts(self, samples: list[Sample]) -> None:
        """The text vLLM's detokenizer gives (tests compare the two): special tokens skipped, and the token that
        ended a sample (EOS or a stop token id) left out."""
        for sample in samples:
            ids = sample.token_ids[:-1] if sample.finish_reason != "length" else sample.token_ids
            sample.text = self.tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def to_sample(completion, with_logprobs: bool, kept: KeptSets | None = None) -> Sample:
        ids = list(completion.token_ids)
        logprobs = [step[t].logprob for step, t in zip(completion.logprobs, ids)] if with_logprobs else None
        return Sample(prompt_index=-1, token_ids=ids, text=completion.text or "",
                      finish_reason=finish_reason(completion.finish_reason, completion.stop_reason),
                      logprobs=logprobs, kept=kept)

    def sleep(self) -> None:
        if self.sleep_mode:
            self.llm.sleep(level=1)  # level 2 drops buffers (rotary caches) that a weight push does not restore
            self.asleep = True

    def close(self) -> None:
        # The engine shuts down now, not when its last reference goes (a traceback frame can hold it to interpreter
        # exit, where its shutdown raised after the run's error line). Its groups are forgotten first: the
        # shutdown's `destroy_process_group()` frees them with the default group, and destroying them one by one
        # raises once the default group is gone or was re-created.
        _forget_vllm_process_groups()
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm


def _forget_vllm_process_groups() -> None:
    """vLLM keeps its process groups in module globals and reuses them for the next engine in this process. The
    trainer may destroy and re-create its own group in between (repeated runs, tests), which leaves those stale
    ("not initialized in the world group map"), so an engine that closes drops them."""
    from vllm.distributed import parallel_state

    for name in ("_TP", "_ETP", "_PP", "_DP", "_EP", "_EPLB", "_DCP", "_PCP", "_ENGRAM_DP", "_WORLD",
                 "_INNER_DP_WORLD", "_NODE_COUNT"):
        if hasattr(parallel_state, name):
            setattr(parallel_state, name, None)


def finish_reason(vllm_reason: str | None, stop_reason) -> FinishReason:
    if vllm_reason == "length":
        return "length"
    return "eos" if stop_reason is None else "stop"
