"""Kept-set head: log-probs renormalised to a per-token kept set K_t (the sampler's top-k / top-p set), from the
|K_t| rows of the head weight alone.

A token sampled with top-k / top-p was drawn from softmax(z) restricted to K_t and renormalised, so its exact
log-prob is
    logp_t = z_t[y_t] - logsumexp_{v in K_t} z_t[v],     z_t = h_t W^T / temperature,
and the entropy of that distribution is H_t = -sum_{v in K_t} p_v log p_v. Neither needs a vocabulary row outside
K_t: each token gathers its |K_t| rows of W, so the head costs 2 H sum_t |K_t| FLOPs instead of 2 N V H, and the
backward writes dW only at those rows (scatter-added: ids shared by several tokens accumulate).

Kept sets are an int tensor `kept` [N, K_max] (K_max = the largest |K_t|), each row the ids of K_t padded with -1;
the target must be in its row, and no id may repeat within a row. The exact torch equivalent:

    z = hidden @ weight.T / temperature
    mask = torch.zeros_like(z).scatter_add_(1, kept.clamp(min=0), (kept >= 0).to(z.dtype)) > 0
    logp = z.masked_fill(~mask, -inf).log_softmax(-1).gather(1, targets[:, None])

Backends share two functions on compacted (valid) tokens, `stats` (forward: logp, entropy, lse) and `grads`
(backward from the saved lse: dX, dW), so `linear_logprobs(..., kept=)` and `fused_linear_loss(..., kept=)` run the
same math: the PyTorch one here (chunks of tokens, each either one GEMM against the union of its tokens' rows or
a batched GEMV over each token's own rows, whichever is cheaper: `_plan`; the GEMMs in `gemm_dtype`) and the
Triton one in `twofold/kernels/triton_kept.py` (per-token gathers).
"""
from __future__ import annotations

import torch

from twofold.kernels.chunked import compute_dtype, gemm_dtype, gemm_input, no_autocast

# Elements of the gathered [rows, K_max, H] weight block per chunk (16 MiB of fp32), and of a union chunk's
# [rows, |U|] logits: bound the temporaries whatever K_max is, as the full head's tile does.
GATHER_ELEMENTS = 2**22
UNION_ELEMENTS = 2**22
# Tokens whose ids are pooled into one union, and how much larger than K_max that union may be and still win. On
# one CPU core the head's GEMM ran at ~80 GFLOP/s and the per-token gathers at ~1, but a union also copies its
# rows of W and gathers from [rows, |U|] logits: with 64 in place of 16, 256 tokens of 512 ids spread over
# V = 32,000 (|U| ~ 31,500) took the union and ran 2x slower than their gathers (bench/README.md, "Kept-set
# head"). A union's gathered weight rows stay within UNION_WEIGHT_ELEMENTS (128 MiB of fp32).
UNION_ROWS = 256
UNION_GAIN = 16
UNION_WEIGHT_ELEMENTS = 2**25


def kept_positions(kept: torch.Tensor, targets: torch.Tensor, ignore_index: int, check: bool) -> torch.Tensor:
    """[N] column of each token's target within its kept row (0 for ignored tokens); with `check`, a target outside
    its row, an id outside [-1, V) or an id repeated in a row is an error naming the token."""
    hit = kept == targets[:, None]
    if check:
        valid = targets != ignore_index
        missing = valid & ~hit.any(1)
        if bool(missing.any()):
            t = int(missing.nonzero()[0])
            raise ValueError(f"kept[{t}] does not hold the token's target {int(targets[t])}: the kept set of a "
                             f"sampled token must contain it (ids {kept[t][kept[t] >= 0].tolist()[:8]}...)")
        ids = kept.sort(1).values
        repeated = valid & ((ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0)).any(1)
        if bool(repeated.any()):
            t = int(repeated.nonzero()[0])
            raise ValueError(f"kept[{t}] repeats an id: a kept set lists each vocabulary id once")
    return hit.int().argmax(1)


def check_kept(kept, targets: torch.Tensor, vocab: int, check_range: bool = True) -> None:
    """Shape, dtype and device of `kept` against `targets`, and with `check_range` (one host sync on CUDA) its ids'
    range (one line naming the fix)."""
    if not isinstance(kept, torch.Tensor) or kept.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"kept must be an int64 or int32 tensor of vocabulary ids (-1 = padding), got "
                         f"{type(kept).__name__ if not isinstance(kept, torch.Tensor) else kept.dtype}")
    if kept.shape[:-1] != targets.shape or kept.dim() != targets.dim() + 1 or kept.shape[-1] < 1:
        raise ValueError(f"kept must be shaped like targets plus one trailing dim [..., K_max >= 1]: targets "
                         f"{tuple(targets.shape)}, kept {tuple(kept.shape)}")
    if kept.device != targets.device:
        raise ValueError(f"kept is on {kept.device}, targets on {targets.device}: put them on one device")
    if check_range and kept.numel() and (int(kept.min()) < -1 or int(kept.max()) >= vocab):
        raise ValueError(f"kept ids must be in [0, {vocab}) or -1 (padding), got [{int(kept.min())}, "
                         f"{int(kept.max())}]")


# ---- PyTorch backend ----

def _rows_per_chunk(k_max: int, dim: int) -> int:
    return max(1, GATHER_ELEMENTS // max(1, k_max * dim))


def _plan(kept: torch.Tensor, dim: int) -> list[tuple[int, int, tuple | None]]:
    """Chunks (start, end, union) of tokens in the cheaper of two layouts. Union: one GEMM against the rows of the
    union U of the chunk's ids, each token's columns then gathered from the [rows, |U|] logits; taken when
    |U| < UNION_GAIN * K_max, since a GEMM runs at many times the FLOP rate of per-token gathers (bench/README.md,
    "Kept-set head"). Gather (union None): each token's own rows, [rows, K_max, H] within GATHER_ELEMENTS."""
    plan = []
    n, k_max = kept.shape
    for s in range(0, n, UNION_ROWS):
        e = min(s + UNION_ROWS, n)
        union, inverse = torch.unique(kept[s:e].clamp(min=0), return_inverse=True)
        if union.numel() < UNION_GAIN * k_max and union.numel() * dim <= UNION_WEIGHT_ELEMENTS:
            step = max(1, UNION_ELEMENTS // union.numel())
            plan.extend((a, min(a + step, e), (union, inverse[a - s:a - s + step])) for a in range(s, e, step))
        else:
            step = _rows_per_chunk(k_max, dim)
            plan.extend((a, min(a + step, e), None) for a in range(s, e, step))
    return plan


def _kept_logits(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor,
                 temperature: float, union: tuple | None):
    """([rows, K] tempered logits in the accumulation dtype, -inf at padding; the gathered weight rows in
    `gemm_dtype`: [|U|, H] (union layout) or [rows, K, H]). Only gathered rows are cast, never the whole weight."""
    acc = compute_dtype(hidden.dtype)
    gemm = gemm_dtype(weight.dtype, weight.device)
    if union is None:
        wg = weight.index_select(0, ids.clamp(min=0).reshape(-1)).view(*ids.shape, weight.shape[1]).to(gemm)
        z = torch.bmm(wg, gemm_input(hidden, temperature, wg, acc)[:, :, None]).squeeze(2).to(acc)
    else:
        wg = weight.index_select(0, union[0]).to(gemm)
        z = (gemm_input(hidden, temperature, wg, acc) @ wg.t()).to(acc).gather(1, union[1])
    return z.masked_fill_(~valid, float("-inf")), wg


def _backprop(dz, hidden, ids, valid, wg, union, grad_w):
    """dX of the chunk's tokens from dz [rows, K] (0 at padding), and dW += dz^T h at the kept rows only."""
    acc = dz.dtype
    if union is not None:
        dzu = torch.zeros(dz.shape[0], wg.shape[0], dtype=acc, device=dz.device).scatter_add_(1, union[1], dz)
        if grad_w is not None:
            grad_w.index_add_(0, union[0], (dzu.t().to(wg.dtype) @ hidden.to(wg.dtype)).to(acc))
        return (dzu.to(wg.dtype) @ wg).to(acc)
    if grad_w is not None:
        flat = valid.reshape(-1).nonzero().squeeze(1)  # padding adds nothing
        contrib = (dz[:, :, None] * hidden[:, None, :].to(acc)).reshape(-1, hidden.shape[1])
        grad_w.index_add_(0, ids.reshape(-1).index_select(0, flat), contrib.index_select(0, flat))
    return torch.bmm(dz[:, None, :].to(wg.dtype), wg).squeeze(1).to(acc)


def _log_softmax_stats(z: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor, want_entropy: bool):
    """(log q [rows, K] with 0 at padding, logp, entropy or None, lse) of masked logits z."""
    lse = torch.logsumexp(z, 1)
    log_q = (z - lse[:, None]).masked_fill_(~valid, 0.0)
    logp = log_q.gather(1, pos[:, None]).squeeze(1)
    entropy = -(log_q.exp().masked_fill_(~valid, 0.0) * log_q).sum(1) if want_entropy else None
    return log_q, logp, entropy, lse


def torch_stats(hidden, weight, kept, pos, temperature, want_entropy):
    """(logp, entropy (zeros without want_entropy), lse), each [N] in the accumulation dtype."""
    acc = compute_dtype(hidden.dtype)
    n = hidden.shape[0]
    logp, lse, entropy = (hidden.new_zeros(n, dtype=acc) for _ in range(3))
    for s, e, union in _plan(kept, hidden.shape[1]):
        ids = kept[s:e]
        valid = ids >= 0
        z, _ = _kept_logits(hidden[s:e], weight, ids, valid, temperature, union)
        _, logp[s:e], ent, lse[s:e] = _log_softmax_stats(z, valid, pos[s:e], want_entropy)
        if ent is not None:
            entropy[s:e] = ent
    return logp, entropy, lse


def torch_grads(hidden, weight, kept, pos, lse, entropy, g, g_entropy, temperature, need_h, need_w):
    """(dX [N, H] or None, dW [V, H] or None) from upstream g = dL/dlogp and g_entropy = dL/dH (or None):
        dL/dz_v = (g 1[v = y] - p_v (g + g_H (log p_v + H))) / temperature,   v in K_t,
    dX_t = sum_v dz_v W_v, and dW_v += dz_v h_t scattered to the kept rows only."""
    acc = compute_dtype(hidden.dtype)
    (n, dim), vocab = hidden.shape, weight.shape[0]
    grad_h = torch.zeros(n, dim, dtype=acc, device=hidden.device) if need_h else None
    grad_w = torch.zeros(vocab, dim, dtype=acc, device=weight.device) if need_w else None
    for s, e, union in _plan(kept, dim):
        ids = kept[s:e]
        valid = ids >= 0
        z, wg = _kept_logits(hidden[s:e], weight, ids, valid, temperature, union)
        log_p = (z - lse[s:e, None]).masked_fill_(~valid, 0.0)
        coef = g[s:e, None].expand_as(log_p)
        if g_entropy is not None:
            coef = coef + g_entropy[s:e, None] * (log_p + entropy[s:e, None])
        dz = -(log_p.exp().masked_fill_(~valid, 0.0) * coef)
        dz.scatter_add_(1, pos[s:e, None], g[s:e, None].to(dz.dtype))
        dz /= temperature
        dh = _backprop(dz, hidden[s:e], ids, valid, wg, union, grad_w)
        if need_h:
            grad_h[s:e] = dh
    return grad_h, grad_w


BACKENDS = {"torch": (torch_stats, torch_grads)}


def kept_backend(name: str, device: torch.device, dtype: torch.dtype):
    """(stats, grads) of backend `name` ("auto": Triton on CUDA, PyTorch elsewhere; float64 always PyTorch)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "triton" and dtype != torch.float64:
        from twofold.kernels.triton_kept import triton_grads, triton_stats
        return triton_stats, triton_grads
    if name not in ("torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {name!r}")
    return BACKENDS["torch"]


class KeptLinearLogprobs(torch.autograd.Function):
    """Valid tokens only: hidden [N,H], weight [V,H], kept [N,K], pos [N] -> (logp, entropy, lse)."""

    @staticmethod
    def forward(ctx, hidden, weight, kept, pos, temperature, want_entropy, backend):
        ctx.set_materialize_grads(False)
        stats, grads = kept_backend(backend, hidden.device, hidden.dtype)
        with no_autocast(hidden.device):
            logp, entropy, lse = stats(hidden, weight, kept, pos, temperature, want_entropy)
        ctx.save_for_backward(hidden, weight, kept, pos, lse, entropy)
        ctx.temperature, ctx.grads = temperature, grads
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        hidden, weight, kept, pos, lse, entropy = ctx.saved_tensors
        g = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(lse.dtype)
        gh = None if grad_entropy is None else grad_entropy.to(lse.dtype)
        with no_autocast(hidden.device):
            dh, dw = ctx.grads(hidden, weight, kept, pos, lse, entropy, g, gh, ctx.temperature,
                               ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
                None, None, None, None, None)


def kept_linear_logprobs(hidden, weight, targets, kept, *, ignore_index, temperature, want_entropy, backend,
                         check_targets):
    """[N,H], [V,H], [N], [N,K] -> (logp, entropy, lse) [N], zero at ignored positions (see the module doc)."""
    n = hidden.shape[0]
    valid = (targets != ignore_index).nonzero().squeeze(1)
    h, y, k = hidden.index_select(0, valid), targets.index_select(0, valid), kept.index_select(0, valid).long()
    pos = kept_positions(k, y, ignore_index, check_targets)
    out = KeptLinearLogprobs.apply(h, weight, k, pos, float(temperature), want_entropy, backend)
    return tuple(torch.zeros(n, dtype=t.dtype, device=t.device).index_copy(0, valid, t) for t in out)


def kept_fused_pass(hidden, weight, targets, kept, step, temperature, ignore_index, entropy_mode, needs,
                    backend):
    """The fused loss on kept sets: (loss, logp, entropy, grad_hidden, grad_weight) as `_torch_fused_pass`.
    `step(logp, index, entropy)` is the objective's elementwise step on the valid tokens `index`. The head
    is small here (|K| rows per token), so it runs as stats over every valid token, the step, then grads."""
    n, dim = hidden.shape
    acc = compute_dtype(hidden.dtype)
    stats, grads = kept_backend(backend, hidden.device, hidden.dtype)
    valid = (targets != ignore_index).nonzero().squeeze(1)
    h, k = hidden.index_select(0, valid), kept.index_select(0, valid).long()
    pos = kept_positions(k, targets.index_select(0, valid), ignore_index, False)
    logp, entropy, lse = stats(h, weight, k, pos, temperature, bool(entropy_mode))
    loss, g, g_entropy = step(logp, valid, entropy if entropy_mode == 2 else None)
    dh, dw = grads(h, weight, k, pos, lse, entropy, g.to(acc), None if g_entropy is None else g_entropy.to(acc),
                   temperature, needs[0], needs[1])
    grad_h = (torch.zeros_like(hidden).index_copy_(0, valid, dh.to(hidden.dtype)) if needs[0]
              else hidden.new_empty(0))
    grad_w = dw.to(weight.dtype) if needs[1] else weight.new_empty(0)
    logp_all, entropy_all = (torch.zeros(n, dtype=acc, device=hidden.device).index_copy_(0, valid, t.to(acc))
                             for t in (logp, entropy))
    return loss.sum(), logp_all, entropy_all, grad_h, grad_w
