"""Model loading and FSDP2: any local HF causal LM (or a preset) as a `PolicyModel` sharded per decoder layer.

`PolicyModel` is the FSDP2 root: its forward runs the transformer trunk to the final hidden states and then the
head: `kernels.linear_logprobs` with the LM-head weight (scoring: old / reference log-probs), or a training
`loss_head` from `engine.heads` (the fused loss, or log-probs + objective). Because that happens inside the root's
forward, FSDP2 has already all-gathered the root's own parameters (embeddings, final norm, LM head; tied or not),
so the kernel sees the full weight in the compute dtype and its gradient is reduce-scattered like any other. The
model's own logits are never computed.

Precision: parameters, gradients and optimizer state are fp32 shards (the master copy); FSDP2 casts to
`model.dtype` for compute and reduces gradients in fp32. The frozen reference policy (`build_reference`, the KL
term's) is sharded the same way but stored in `model.dtype`, without gradients or optimizer state: in a bf16 run
it costs 2 bytes per parameter (over the ranks) instead of the policy's 16 (fp32 weights, gradients, Adam's two
moments). Loading at scale: every rank builds the model on the meta device, shards it and allocates only its
shard; rank 0 alone reads the checkpoint and broadcasts it.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from twofold.engine.run.schema import ModelConfig
from twofold.engine.train.distributed import DistEnv
from twofold.engine.train.packing import PackedLayout
from twofold.engine.train.tiny import build_preset_model, preset_config
from twofold.kernels import linear_logprobs

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class PolicyModel(nn.Module):
    """Causal LM trunk + fused LM head: per-token log-probs of `targets` from packed sequences."""

    def __init__(self, causal_lm: nn.Module):
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, input_ids: Tensor, position_ids: Tensor, targets: Tensor, *, temperature: float = 1.0,
                return_entropy: bool = False, loss_head=None, kept: Tensor | None = None):
        """input_ids, position_ids, targets [N] (one packed row) -> fp32 log-probs [N] (0 at ignored targets) at
        `temperature`; with `loss_head` (an `engine.heads` head), its `HeadOutput` (loss, log-probs, metrics).
        kept [N, K_max]: the sampler's kept sets; the log-probs are then renormalised to them (`kernels.kept`)."""
        trunk = self.causal_lm.get_decoder()
        # use_cache=False: with a cache transformers stops reading packed position_ids as sequence boundaries
        hidden = trunk(input_ids=input_ids[None], position_ids=position_ids[None], use_cache=False).last_hidden_state
        head = self.causal_lm.get_output_embeddings().weight
        if loss_head is not None:
            return loss_head(hidden[0], head, targets, temperature, kept)
        out = self.head_logprobs(hidden[0], head, targets, temperature, return_entropy, kept)
        # the kernel returns views; FSDP2 warns that in-place ops on a root output's view would skip its hooks
        return tuple(t.clone() for t in out) if return_entropy else out.clone()

    def head_logprobs(self, hidden: Tensor, head: Tensor, targets: Tensor, temperature: float, return_entropy: bool,
                      kept: Tensor | None = None):
        """hidden [N,H], head [V,H] -> log-probs [N] (and entropy [N]) without materialising [N,V] logits."""
        return linear_logprobs(hidden, head, targets, temperature=temperature, return_entropy=return_entropy,
                               check_targets=False, kept=kept)


# The attention transformers runs for `sdpa` on a packed row: SDPA per sequence instead of over the whole row.
PACKED_SDPA = "twofold_packed_sdpa"


def _is_packed_row(batch_size: int, q_length: int, kv_length: int, q_offset, attention_mask) -> bool:
    """One row, no padding mask and no cache: the engine's packed training forward (anything else is plain sdpa)."""
    return batch_size == 1 and attention_mask is None and q_length == kv_length and not q_offset


def packed_sdpa_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """No mask for a packed row (its attention follows position_ids); transformers' sdpa mask otherwise."""
    if _is_packed_row(batch_size, q_length, kv_length, q_offset, attention_mask):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     attention_mask=attention_mask, **kwargs)


def packed_sdpa_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """transformers attention function: causal SDPA inside each sequence of a packed row, the sequences of similar
    length batched (`PackedLayout`). The same numbers as SDPA over the row with a block-diagonal mask, at cost
    sum_s L_s^2 instead of N^2. Any other call (a padding mask, a KV cache) is transformers' sdpa unchanged."""
    batch, _, q_length, _ = query.shape
    if position_ids is None or not _is_packed_row(batch, q_length, key.shape[2], 0, attention_mask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, position_ids=position_ids, **kwargs)
    kwargs.pop("is_causal", None)
    layout = PackedLayout.from_position_ids(position_ids.reshape(-1))
    # [1, heads, N, d] -> [N, heads, d] (a view of the projection's output) -> [rows, length, heads, d] per bucket
    q, k, v = (layout.pad(x[0].transpose(0, 1)) for x in (query, key, value))
    outs = [sdpa_attention_forward(module, qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2), None,
                                   is_causal=True, **kwargs)[0] for qb, kb, vb in zip(q, k, v)]
    return layout.unpad(outs)[None], None  # [1, N, heads, d], as every transformers attention function returns


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)


def load_hf_config(cfg: ModelConfig) -> PretrainedConfig:
    hf_config = AutoConfig.from_pretrained(cfg.path) if cfg.path else preset_config(cfg.preset)
    hf_config.use_cache = False
    return hf_config


def resolve_attn_implementation(requested: str, device: torch.device, hf_config: PretrainedConfig | None = None) -> str:
    """auto: flash_attention_2 (varlen) on CUDA with flash-attn, else sdpa; sdpa runs per sequence of a packed row
    (`packed_sdpa_attention`) unless the model has sliding-window layers (their window lives in the mask)."""
    if requested == "auto":
        flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
        requested = "flash_attention_2" if flash else "sdpa"
    if requested == "flash_attention_2" and device.type != "cuda":
        raise ValueError("model.attn_implementation=flash_attention_2 needs a CUDA device; use auto or sdpa on CPU")
    sliding = "sliding_attention" in (getattr(hf_config, "layer_types", None) or ())
    return PACKED_SDPA if requested == "sdpa" and not sliding else requested


def build_policy(cfg: ModelConfig, env: DistEnv, seed: int = 0, policy_cls: type = PolicyModel) -> PolicyModel:
    """The trainable policy: fp32 shards (the master copy), in train mode. `policy_cls` swaps the head (bench.step
    compares against materialised logits)."""
    policy = build_sharded(cfg, env, seed, policy_cls, torch.float32, frozen=False)
    policy.train()
    return policy


def build_reference(cfg: ModelConfig, env: DistEnv, initial: PolicyModel) -> PolicyModel:
    """The frozen reference policy (the KL term's): a copy of `initial`, a policy built from the same config that
    still holds the initial weights (before any update or resume). Sharded like it, its shards stored in the
    compute dtype (`model.dtype`, so a bf16 run keeps no fp32 copy of it), no parameter requires grad, eval mode,
    no optimizer, and its root resharded after each forward (between the steps that score with it, each rank
    holds only its shard). Each rank copies its own shards: the checkpoint is not read a second time. Its
    log-probs equal the policy's before the first update: FSDP2 casts the policy's fp32 shards to the same
    dtype, with the same rounding, before every forward."""
    reference = build_sharded(cfg, env, 0, PolicyModel, DTYPES[cfg.dtype], frozen=True, copy_of=initial)
    reference.requires_grad_(False)
    reference.eval()
    return reference


def build_sharded(cfg: ModelConfig, env: DistEnv, seed: int, policy_cls: type, param_dtype: torch.dtype,
                  frozen: bool, copy_of: PolicyModel | None = None) -> PolicyModel:
    """Meta-init with parameters in `param_dtype`, shard with FSDP2, allocate shards, then load weights: rank 0
    reads the checkpoint (or builds the preset) and everyone receives, or, with `copy_of`, each rank copies that
    model's shards. `frozen`: no activation checkpointing (no backward), the root resharded after each forward."""
    hf_config = load_hf_config(cfg)
    attn = resolve_attn_implementation(cfg.attn_implementation, env.device, hf_config)
    with torch.device("meta"):
        causal_lm = AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn, dtype=param_dtype)
    if cfg.activation_checkpointing and not frozen:
        enable_activation_checkpointing(causal_lm)
    policy = policy_cls(causal_lm)
    shard_policy(policy, env, DTYPES[cfg.dtype], reshard_root=frozen)
    policy.to_empty(device=env.device)
    if copy_of is not None:
        copy_shards(copy_of, policy)
    else:
        load_full_weights(policy, _load_full_model(cfg, seed) if env.is_main else None)
    return policy


@torch.no_grad()
def copy_shards(source: PolicyModel, target: PolicyModel) -> None:
    """Each rank copies its shard of every parameter (cast to the target's dtype) and the buffers: the same
    config, mesh and per-layer wrapping give the same shard layout, so nothing is read or communicated."""
    for (name, s), (other, t) in zip(source.named_parameters(), target.named_parameters(), strict=True):
        if name != other or not isinstance(s, DTensor) or s.placements != t.placements or s.shape != t.shape:
            raise ValueError(f"cannot copy the shards of {name}: the models are not sharded alike (a different "
                             "config, or parameters still gathered after a forward)")
        t.to_local().copy_(s.to_local())
    for (_, s), (_, t) in zip(source.causal_lm.named_buffers(), target.causal_lm.named_buffers(), strict=True):
        t.copy_(s)


def enable_activation_checkpointing(causal_lm: nn.Module) -> None:
    """Recompute every decoder layer in backward (non-reentrant, which composes with FSDP2)."""
    kwargs = {"use_reentrant": False}
    # transformers renamed the method (the old name warns in 5.23; 5.17 on the GPU machine has only the old one)
    new_api = getattr(causal_lm, "activation_checkpointing_enable", None)
    if new_api is not None:
        new_api(activation_checkpointing_kwargs=kwargs)
    else:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def shard_policy(policy: PolicyModel, env: DistEnv, compute_dtype: torch.dtype, reshard_root: bool = False) -> None:
    """fully_shard every decoder layer, then the root; gradients are summed (not averaged) over ranks, because
    the objectives divide by global token/sequence counts themselves. FSDP2 keeps the root's parameters
    (embeddings, final norm, LM head) gathered after a forward, for the backward that follows; `reshard_root`
    frees them instead (a model that never runs backward)."""
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in policy.causal_lm.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(policy, mesh=mesh, mp_policy=mp, reshard_after_forward=True if reshard_root else None)
    for module in policy.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM


def _load_full_model(cfg: ModelConfig, seed: int) -> nn.Module:
    if cfg.path:
        return AutoModelForCausalLM.from_pretrained(cfg.path, dtype=torch.float32)
    return build_preset_model(cfg.preset, seed)


def load_full_weights(policy: PolicyModel, source: nn.Module | None) -> None:
    """Copy a full (unsharded) model held by rank 0 into the sharded policy on every rank."""
    full = {f"causal_lm.{k}": v for k, v in source.state_dict().items()} if source is not None else {}
    set_model_state_dict(policy, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # non-persistent buffers (rotary inv_freq) are not in the state dict: rank 0 copies them, then broadcasts
    source_buffers = dict(source.named_buffers()) if source is not None else {}
    for name, buffer in policy.causal_lm.named_buffers():
        if source is not None:
            buffer.copy_(source_buffers[name])
        dist.broadcast(buffer, src=0)


def count_parameters(policy: PolicyModel) -> tuple[int, int]:
    """(all parameters, parameters outside the input embedding): the second one drives the 6*N*T FLOP count."""
    total = sum(p.numel() for p in policy.parameters())
    embedding = policy.causal_lm.get_input_embeddings().weight.numel()
    tied = policy.causal_lm.get_output_embeddings().weight is policy.causal_lm.get_input_embeddings().weight
    return total, total - (0 if tied else embedding)
