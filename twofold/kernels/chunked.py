"""Chunked PyTorch backend of `linear_logprobs`: the reference path, and the one CPU users run.

Per token t with logits z = h_t W^T / temperature:
    logp_t = z[y_t] - lse(z),            entropy_t = -sum_v p_v log p_v,   p = softmax(z).
Forward walks the tokens in chunks and keeps only logp, entropy and lse per token. Backward recomputes each
chunk's logits from the saved lse and forms the logits gradient from the upstream gradients g (of logp) and
g_H (of entropy):
    dL/dz_v = g * 1[v = y] - p_v * (g + g_H * (z_v - lse + H))
so no [N, V] tensor ever exists: the largest temporaries are two [chunk, V] fp32 blocks.
"""
from __future__ import annotations

import torch

# Bytes one [chunk, V] fp32 block may take. Two such blocks live at once in backward.
DEFAULT_CHUNK_BYTES = 16 * 2**20


def default_chunk_size(num_tokens: int, vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so one fp32 [chunk, V] block stays under `chunk_bytes` (multiple of 16, at least 16)."""
    rows = max(16, (chunk_bytes // (4 * vocab)) // 16 * 16)
    return max(1, min(rows, num_tokens))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); every other float type accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_logits(h: torch.Tensor, w_compute: torch.Tensor, temperature: float, acc: torch.dtype) -> torch.Tensor:
    """fp32 (or fp64) logits of one chunk, divided by the temperature, without a low-precision round trip."""
    z = h.to(acc) @ w_compute.t()
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _chunk_stats(z: torch.Tensor, targets: torch.Tensor, want_entropy: bool):
    """(logp, entropy or None, lse) of one chunk of logits (overwrites z)."""
    lse = torch.logsumexp(z, dim=1)
    logp = z.gather(1, targets[:, None]).squeeze(1) - lse
    if not want_entropy:
        return logp, None, lse
    # H = -sum_v p_v log p_v on the shifted logits (z - lse): no cancellation between two large terms.
    log_p = z.sub_(lse[:, None])
    # In place (no third [chunk, V] block); torch's sum reduces pairwise, a BLAS dot over V=32k drifts 10x more.
    entropy = -torch.exp(log_p).mul_(log_p).sum(1)
    return logp, entropy, lse


def weight_for_compute(weight: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    # One upcast per call (O(VH), never O(NV)) so every chunk's GEMM runs in the accumulation dtype.
    return weight if weight.dtype == acc else weight.to(acc)


class ChunkedLinearLogprobs(torch.autograd.Function):
    """hidden [N,H] (valid tokens only), weight [V,H], targets [N] -> (logp [N], entropy [N], lse [N])."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, want_entropy):
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None and costs nothing
        acc = compute_dtype(hidden.dtype)
        n = hidden.shape[0]
        w = weight_for_compute(weight, acc)
        logp = hidden.new_empty(n, dtype=acc)
        entropy = hidden.new_zeros(n, dtype=acc)
        lse = hidden.new_empty(n, dtype=acc)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = chunk_logits(hidden[s:e], w, temperature, acc)
            lp, ent, ls = _chunk_stats(z, targets[s:e], want_entropy)
            logp[s:e], lse[s:e] = lp, ls
            if ent is not None:
                entropy[s:e] = ent
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = compute_dtype(hidden.dtype)
        n = hidden.shape[0]
        w = weight_for_compute(weight, acc)
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(acc)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        rows = torch.arange(min(chunk_size, n), device=hidden.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            h = hidden[s:e]
            z = chunk_logits(h, w, temperature, acc)
            g = grad_logp[s:e, None]
            p = torch.exp(z - lse[s:e, None])
            if grad_entropy is not None:
                # z <- g + g_H * (z - lse + H), reusing z's storage.
                z.sub_(lse[s:e, None]).add_(entropy[s:e, None]).mul_(grad_entropy[s:e, None].to(acc)).add_(g)
                dz = p.mul_(z).neg_()
            else:
                dz = p.mul_(-g)
            del z
            dz[rows[: e - s], targets[s:e]] += g.squeeze(1)
            if temperature != 1.0:
                dz.div_(temperature)
            if need_h:
                grad_h[s:e] = (dz @ w).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(dz.t(), h.to(acc))
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def chunked_linear_logprobs(hidden, weight, targets, *, ignore_index, temperature, chunk_size, want_entropy):
    """Backend entry point: [N,H], [V,H], [N] -> (logp, entropy, lse), each [N], zero at ignored positions.

    Ignored tokens are dropped before any GEMM, so the cost scales with valid tokens. Finding them is one
    host sync (`nonzero`), acceptable on this path: it is the CPU path and the reference; the Triton
    backend masks tiles on device instead.
    """
    n = hidden.shape[0]
    valid = (targets != ignore_index).nonzero().squeeze(1)
    compact = valid.numel() != n
    h = hidden.index_select(0, valid) if compact else hidden
    y = targets.index_select(0, valid) if compact else targets
    size = chunk_size or default_chunk_size(max(h.shape[0], 1), weight.shape[0])
    logp, entropy, lse = ChunkedLinearLogprobs.apply(h, weight, y, float(temperature), size, want_entropy)
    if not compact:
        return logp, entropy, lse
    return tuple(torch.zeros(n, dtype=t.dtype, device=t.device).index_copy(0, valid, t) for t in (logp, entropy, lse))
