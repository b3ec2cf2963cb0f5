"""Fused token-local losses: loss and gradients straight from hidden states and the LM head, in one pass.

A token-local objective's gradient dL/dlogp_t depends only on token t (docs/objectives.md §8), so it is known as soon
as that token's log-prob is. Each token chunk therefore goes: logits block -> (logp, lse) -> the objective's
elementwise step from `twofold.objectives.token_local` -> dz in place -> dX of the chunk and dW += dz^T X. That is 6NHV
FLOPs instead of the 8NHV of log-probs + autograd, and no [N, V] tensor: the largest temporaries are [chunk, V].
The vocab passes live here (PyTorch on any device, Triton on CUDA); the per-token math is never re-written here.

    out = fused_linear_loss(hidden, lm_head.weight, targets, "nft", inputs=dict(weight=w, old_logp=..., ...))
    out.loss.backward()   # grads reach hidden (and the model below it) and the head weight through autograd

Entropy: a token-local function marked `uses_entropy` (or any objective given `entropy_weight` in its inputs,
which wraps it in `token_local.with_entropy_bonus`: the `entropy_coef` bonus) gets the per-token entropy H_t of the
same pass and returns dL/dH_t as well; the logits gradient then gains -p (log p + H) dL/dH, still per token.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from twofold.kernels.inputs import fold_bias
from twofold.kernels.kept import check_kept, kept_fused_pass
from twofold.kernels.chunked import (add_matmul_, chunk_logits, chunk_stats_, compute_dtype, default_chunk_size,
                                      logits_block, no_autocast, softmax_grad_, weight_for_gemm)
from twofold.objectives.token_local import TOKEN_LOCAL, token_step, with_entropy_bonus

# The PyTorch path holds two fp32 [chunk, V] blocks; larger than the log-probs default so the per-chunk dW update
# (an [V, H] read and write) is amortised over more tokens.
TORCH_CHUNK_BYTES = 64 * 2**20


class FusedLoss(NamedTuple):
    loss: torch.Tensor  # scalar: sum_t loss_t; differentiable w.r.t. hidden and weight
    logp: torch.Tensor  # [N] (shaped like targets), detached; 0 at ignored tokens
    entropy: torch.Tensor | None  # [N] detached, when return_entropy


class _AttachGrads(torch.autograd.Function):
    """Returns `value` and routes its upstream gradient to (hidden, weight) through precomputed gradients.

    When autograd will free the graph after this backward (no retain_graph, no create_graph), the saved gradients
    are scaled in place and returned: the peak holds one copy of dX and dW, not two (an out-of-place product is a
    second [N, H] and [V, H] at the moment of the multiply), and once the saved tensors are released AccumulateGrad
    may adopt them as .grad without a copy. A retained graph can be run again, so there the product is out of
    place (bitwise the same numbers), and under create_graph it stays differentiable w.r.t. the upstream.
    """

    @staticmethod
    def forward(ctx, value, hidden, weight, grad_hidden, grad_weight):
        ctx.save_for_backward(grad_hidden, grad_weight)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = torch.Tensor.mul if _graph_is_kept() or torch.is_grad_enabled() else torch.Tensor.mul_
        dh = scale(grad_hidden, grad.to(grad_hidden.dtype)) if ctx.needs_input_grad[1] else None
        dw = scale(grad_weight, grad.to(grad_weight.dtype)) if ctx.needs_input_grad[2] else None
        return None, dh, dw, None, None


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph); torch's own AOT autograd asks the same. Where
    this torch lacks the query, assume kept: out of place is always correct, only larger."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def _token_fn(objective, inputs: dict) -> Callable:
    """The token-local function; with `entropy_weight` in the inputs, wrapped to carry the entropy bonus."""
    if callable(objective):
        fn = objective
    elif objective not in TOKEN_LOCAL:
        raise ValueError(f"objective must be one of {sorted(TOKEN_LOCAL)} or a callable, got {objective!r}")
    else:
        fn = TOKEN_LOCAL[objective]
    if "entropy_weight" in inputs and not getattr(fn, "uses_entropy", False):
        fn = with_entropy_bonus(fn)
    return fn


def _split_inputs(inputs: dict, shape: torch.Size):
    """Per-token tensors (shaped like targets) are flattened to [N] and gathered per chunk; the rest broadcast."""
    per_token = {k: v.reshape(-1) for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.shape == shape}
    shared = {k: v for k, v in inputs.items() if k not in per_token}
    return per_token, shared


def fused_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, objective, *,
                      inputs: dict, temperature: float = 1.0, ignore_index: int = -100,
                      return_entropy: bool = False, chunk_size: int | None = None,
                      backend: str = "auto", bias: torch.Tensor | None = None,
                      kept: torch.Tensor | None = None) -> FusedLoss:
    """Token-local loss of softmax(hidden @ weight.T / temperature) evaluated at `targets`, with its gradients.

    objective: a name in `twofold.objectives.token_local.TOKEN_LOCAL` or a callable with that contract,
    `fn(logp, **inputs) -> (loss_t, dL/dlogp_t)`. inputs: its keyword arguments; tensors shaped like `targets`
    are per-token (e.g. `weight` = the aggregation weight, `old_logp`, `adv`), anything else (floats, 0-d
    tensors) is passed unchanged. Ignored targets contribute nothing and cost nothing. The loss is
    sum_t loss_t; `loss.backward()` sends exact gradients to hidden and weight (tied weights included).
    chunk_size: tokens per chunk. backend: "torch", "triton" or "auto" (Triton on CUDA). bias: the LM head's [V]
    bias or None (folded in by `twofold.kernels.inputs.fold_bias`; its gradient flows through autograd). kept: the
    sampler's kept sets [..., K_max] (-1 padded): the loss is that of the log-probs renormalised to each token's
    kept set, from its |K| weight rows alone (`twofold.kernels.kept`).
    """
    if hidden.shape[:-1] != targets.shape or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"need hidden [..., H], targets shaped like hidden[..., 0] and weight [V, H]; got "
                         f"{tuple(hidden.shape)}, {tuple(targets.shape)}, {tuple(weight.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if kept is not None:
        check_kept(kept, targets, weight.shape[0], check_range=False)  # as targets: no host sync here
    per_token, shared = _split_inputs(inputs, targets.shape)
    hidden, weight = fold_bias(hidden, weight, bias)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    needs = (hidden.requires_grad, weight.requires_grad)  # a frozen head skips its dW GEMM entirely
    fn = _token_fn(objective, inputs)
    entropy_mode = 2 if getattr(fn, "uses_entropy", False) else int(bool(return_entropy))  # 2: it has a gradient
    args = (h2, weight, targets.reshape(-1).long(), fn, per_token, shared, float(temperature), ignore_index,
            entropy_mode, chunk_size, needs)
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    with torch.no_grad(), no_autocast(h2.device):  # gradients are formed here by hand; autograd sees _AttachGrads
        if kept is not None:
            def step(logp, index, entropy):
                return token_step(fn, logp, per_token, shared, index, entropy)
            value, logp, entropy, grad_h, grad_w = kept_fused_pass(
                h2, weight, args[2], kept.reshape(-1, kept.shape[-1]), step, float(temperature), ignore_index,
                entropy_mode, needs, backend)
        elif backend == "triton" or (backend == "auto" and hidden.is_cuda and h2.dtype != torch.float64):
            from twofold.kernels.triton_fused import triton_fused_pass
            value, logp, entropy, grad_h, grad_w = triton_fused_pass(*args)
        else:
            value, logp, entropy, grad_h, grad_w = _torch_fused_pass(*args)
    loss = _AttachGrads.apply(value, hidden, weight, grad_h.view(hidden.shape) if needs[0] else grad_h, grad_w)
    shape = targets.shape
    return FusedLoss(loss, logp.view(shape), entropy.view(shape) if return_entropy else None)


def _torch_fused_pass(hidden, weight, targets, fn, per_token, shared, temperature, ignore_index, entropy_mode,
                      chunk_size, needs):
    """PyTorch vocab pass: (loss, logp, entropy, grad_hidden, grad_weight), chunks of valid tokens only; a
    gradient not in `needs` (hidden, weight) is an empty tensor and costs nothing. entropy_mode: 0 no entropy,
    1 entropy returned, 2 entropy also an input of `fn`, which returns its gradient (one more [chunk, V] block).

    Finding the valid tokens is one host sync (`nonzero`), as on the chunked log-probs path.
    """
    n, dim = hidden.shape
    acc = compute_dtype(hidden.dtype)
    w = weight_for_gemm(weight)
    valid = (targets != ignore_index).nonzero().squeeze(1)
    logp_all = torch.zeros(n, dtype=acc, device=hidden.device)
    entropy_all = torch.zeros_like(logp_all)
    grad_h = torch.zeros_like(hidden) if needs[0] else hidden.new_empty(0)
    grad_w = torch.zeros(weight.shape if needs[1] else 0, dtype=acc, device=weight.device)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    size = chunk_size or default_chunk_size(max(valid.numel(), 1), weight.shape[0], TORCH_CHUNK_BYTES)
    block = logits_block(min(size, max(valid.numel(), 1)), w.shape[0], acc, w.device)
    for s in range(0, valid.numel(), size):
        index = valid[s:s + size]
        h = hidden.index_select(0, index).to(w.dtype)
        y = targets.index_select(0, index)
        z = chunk_logits(h, w, temperature, acc, block)
        logp, entropy, _ = chunk_stats_(z, y, bool(entropy_mode))  # z becomes the log-softmax: no third block
        loss, g, g_entropy = token_step(fn, logp, per_token, shared, index, entropy if entropy_mode == 2 else None)
        total += loss.sum()
        if entropy_mode:
            entropy_all[index] = entropy
        dz = softmax_grad_(z, y, g, temperature, g_entropy, entropy)
        if needs[0]:
            grad_h[index] = (dz.to(w.dtype) @ w).to(hidden.dtype)
        if needs[1]:
            add_matmul_(grad_w, dz.t(), h)
        logp_all[index] = logp
    return total, logp_all, entropy_all, grad_h, grad_w.to(weight.dtype)
