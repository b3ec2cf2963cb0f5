"""Triton backend of `linear_logprobs` (`backend="triton"`): launchers, autotuning and the custom-op registration.

Same contract as `twofold.kernels.chunked.chunked_linear_logprobs`. Forward: one 2NHV pass over vocab splits keeps only
per-token (max, sum-exp, sum p*(z - max), target logit) partials, merged in a fixed order into logp, entropy, lse.
Backward (8NHV in total, vocab-outer): for each vocab slice, one kernel recomputes the logits from the saved lse and
writes dz into a [N, slice] workspace in the input dtype; dX accumulates over slices in fp32 and dW[slice] contracts
over all valid tokens at once, so no fp32 [V, H] buffer exists and no atomics are used: results are bitwise
reproducible (deterministic is the only mode). Ignored tokens are compacted on device (`compact`), never synced.

The building blocks (`compact`, `vocab_stats`, `dlogits`, `grad_hidden`, `grad_weight`) are also used by the fused
token-local losses in `twofold/kernels/fused.py`.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import torch
import triton

from twofold.kernels.chunked import chunked_linear_logprobs
from twofold.kernels.triton_kernels import _dlogits_kernel, _dw_kernel, _dx_kernel, _stats_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Tiles as (BLOCK_N, BLOCK_V, BLOCK_H) for the logits kernels and (BLOCK_M, BLOCK_N, BLOCK_K) for the GEMMs.
# Used under the interpreter (one small config keeps the CPU tests fast) and whenever a caller pins tiles.
DEFAULT_TILES = (32, 64, 32, 32, 64, 32)
# Bytes of the backward's dz workspace when chunk_size does not set its vocab width.
WORKSPACE_BYTES = 128 * 2**20


def _logits_configs():
    if INTERPRET:
        return []
    # (64, 256, 64) runs 3 stages, not 4: in fp32 four stages need 240 KiB of shared memory, over sm_90's 227
    # (python -m twofold.kernels.triton_aot checks every config against the target without a GPU).
    shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3), (128, 128, 64, 4, 4),
              (64, 128, 32, 4, 4), (64, 64, 32, 4, 2)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_H": h}, num_warps=w, num_stages=s)
            for n, v, h, w, s in shapes]


def _gemm_configs():
    if INTERPRET:
        return []
    shapes = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
              (64, 128, 32, 4, 4), (64, 64, 32, 4, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def _tuned(kernel, configs, key, restore=()):
    # The key leaves out the token count: RL batches change N every step and retuning each time would cost more
    # than it gains. Kernels that read their output back (running sums, in-place dz) restore it between trials.
    if not configs:
        return None
    return triton.autotune(configs=configs, key=key, restore_value=list(restore))(kernel)


_KERNELS = {
    "stats": (_stats_kernel, _tuned(_stats_kernel, _logits_configs(), ["V", "H", "PRECISION"])),
    "dlogits": (_dlogits_kernel, _tuned(_dlogits_kernel, _logits_configs(), ["H", "n_cols", "PRECISION", "RECOMPUTE"],
                                        restore=["ws_ptr"])),
    "dx": (_dx_kernel, _tuned(_dx_kernel, _gemm_configs(), ["H", "n_cols", "PRECISION"], restore=["acc_ptr"])),
    "dw": (_dw_kernel, _tuned(_dw_kernel, _gemm_configs(), ["H", "n_cols", "PRECISION"], restore=["out_ptr"])),
}
_META_NAMES = {"stats": ("BLOCK_N", "BLOCK_V", "BLOCK_H"), "dlogits": ("BLOCK_N", "BLOCK_V", "BLOCK_H"),
               "dx": ("BLOCK_M", "BLOCK_N", "BLOCK_K"), "dw": ("BLOCK_M", "BLOCK_N", "BLOCK_K")}


def _launch(name, grid, args, tiles):
    """Run kernel `name` with autotuning (CUDA, tiles=None) or the pinned/default tiles; grid(meta) -> grid."""
    raw, tuned = _KERNELS[name]
    if tuned is not None and not tiles:
        tuned[grid](*args)
        return
    t = tuple(tiles) if tiles else DEFAULT_TILES
    meta = dict(zip(_META_NAMES[name], t[:3] if name in ("stats", "dlogits") else t[3:]))
    raw[grid(meta)](*args, **meta)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (torch's default); TF32 would fail the fp32 accuracy rule.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(n_rows: int, vocab: int, device: torch.device) -> int:
    """Vocab splits so that about two programs per SM exist even when few tokens are valid (RL old/ref passes)."""
    target = 2 * _sm_count(device.index or 0) if device.type == "cuda" else 4
    splits = triton.cdiv(target, max(1, triton.cdiv(n_rows, 128)))
    return max(1, min(splits, triton.cdiv(vocab, 256)))


def compact(targets: torch.Tensor, ignore_index: int):
    """(order, nvalid): valid tokens first in their original order, and their count as a 1-element device tensor."""
    ignored = (targets == ignore_index).to(torch.uint8)
    order = torch.argsort(ignored, stable=True)
    nvalid = (targets.numel() - ignored.sum(dtype=torch.int64)).reshape(1)
    return order, nvalid


def vocab_stats(hidden, weight, targets, order, nvalid, row0, n_rows, temperature, want_entropy,
                logits_out=None, tiles=None, splits=None):
    """(logp, entropy, lse) of local compacted tokens [row0, row0+n_rows), fp32, garbage past nvalid.

    With `logits_out` ([n_rows, V]) the pass also stores the tempered logits, for callers that form dz later.
    `splits` overrides the number of vocab splits (default: enough programs to fill the GPU).
    """
    vocab, dim = weight.shape
    splits = splits or _num_splits(n_rows, vocab, hidden.device)
    parts = torch.empty(4, splits, n_rows, dtype=torch.float32, device=hidden.device)
    z = logits_out if logits_out is not None else parts
    args = (hidden, weight, targets, order, nvalid, parts[0], parts[1], parts[2], parts[3], z,
            row0, n_rows, vocab, dim, hidden.stride(0), weight.stride(0), z.stride(0), 1.0 / temperature,
            splits, want_entropy, logits_out is not None, _precision(hidden.dtype))
    _launch("stats", lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), splits), args, tiles)
    return _merge_splits(parts, want_entropy)


def _merge_splits(parts, want_entropy):
    """Merge per-split (max m, sum-exp s, target logit, sum p~(z - m)) in a fixed order."""
    m, s, tz, ez = parts
    top = m.amax(0)
    scale = torch.exp(m - top)
    total = (s * scale).sum(0)
    log_total = torch.log(total)
    lse = top + log_total
    # Exact arithmetic gives logp <= 0 and entropy >= 0; clamp the last-ulp rounding so callers can rely on it.
    logp = (tz.sum(0) - lse).clamp_(max=0.0)
    if not want_entropy:
        return logp, torch.zeros_like(lse), lse
    shift = torch.where(s > 0, m - top, torch.zeros_like(m))  # empty splits have m = -inf and s = 0
    mean_shifted = (scale * (ez + s * shift)).sum(0) / total
    return logp, (log_total - mean_shifted).clamp_(min=0.0), lse


def dlogits(hidden, weight, order, nvalid, y, lse, entropy, g, g_entropy, ws, row0, n_rows, col0, temperature,
            recompute, tiles=None):
    """Fill ws[:n_rows, :ws_cols] with dL/dz for local tokens x vocab [col0, col0 + ws_cols); per-token tensors
    are local and compacted. Without `recompute`, ws holds the logits and is overwritten in place."""
    vocab, dim = weight.shape
    n_cols = min(ws.shape[1], vocab - col0)
    has_gh = g_entropy is not None
    args = (hidden, weight, order, nvalid, y, lse, entropy if has_gh else lse, g, g_entropy if has_gh else g, ws,
            row0, n_rows, col0, n_cols, vocab, dim, hidden.stride(0), weight.stride(0), ws.stride(0),
            1.0 / temperature, recompute, has_gh, _precision(hidden.dtype))
    _launch("dlogits", lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), triton.cdiv(n_cols, meta["BLOCK_V"])),
            args, tiles)
    return n_cols


def grad_hidden(ws, weight, order, nvalid, acc, out, row0, n_rows, col0, n_cols, accumulate, scatter, tiles=None):
    """dX of local tokens from ws[:, :n_cols] @ weight[col0:col0+n_cols]: add to the fp32 running sum `acc`
    ([N, H], compacted rows) or, with `scatter`, write the finished rows to out[order]."""
    dim = weight.shape[1]
    args = (ws, weight, order, nvalid, acc, out, row0, n_rows, col0, n_cols, dim, ws.stride(0), weight.stride(0),
            out.stride(0), accumulate, scatter, _precision(weight.dtype))
    _launch("dx", lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]), triton.cdiv(dim, meta["BLOCK_N"])), args, tiles)


def grad_weight(ws, hidden, order, nvalid, out, row0, n_rows, col0, n_cols, accumulate, tiles=None):
    """out[col0:col0+n_cols] (+)= ws[:n_rows, :n_cols]^T @ hidden[order[row0:row0+n_rows]] over valid tokens."""
    dim = hidden.shape[1]
    args = (ws, hidden, order, nvalid, out, row0, n_rows, col0, n_cols, dim, ws.stride(0), hidden.stride(0),
            out.stride(0), accumulate, _precision(hidden.dtype))
    _launch("dw", lambda meta: (triton.cdiv(n_cols, meta["BLOCK_M"]), triton.cdiv(dim, meta["BLOCK_N"])), args, tiles)


def _to_original_order(local, order, nvalid):
    """Scatter compacted per-token values back to token order; ignored tokens get 0."""
    ok = torch.arange(local.shape[0], device=local.device) < nvalid
    return torch.zeros_like(local).scatter_(0, order, torch.where(ok, local, torch.zeros_like(local)))


def _slice_cols(n: int, vocab: int, itemsize: int, chunk_size: int) -> int:
    """Vocab width of the backward's [N, width] dz workspace: chunk_size if set (> 0), else a byte budget."""
    if chunk_size > 0:
        return min(vocab, chunk_size)
    return min(vocab, max(256, WORKSPACE_BYTES // max(1, n * itemsize) // 256 * 256))


def _forward(hidden, weight, targets, ignore_index, temperature, want_entropy, tiles):
    order, nvalid = compact(targets, ignore_index)
    stats = vocab_stats(hidden, weight, targets, order, nvalid, 0, hidden.shape[0], temperature, want_entropy,
                        tiles=tiles)
    return tuple(_to_original_order(t, order, nvalid) for t in stats)


def _backward(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, ignore_index, temperature,
              chunk_size, need_h, need_w, tiles):
    n, dim = hidden.shape
    vocab = weight.shape[0]
    order, nvalid = compact(targets, ignore_index)
    local = [t[order] for t in (targets, lse, entropy, grad_logp.float())]
    gh = grad_entropy.float()[order] if grad_entropy is not None else None
    width = _slice_cols(n, vocab, hidden.element_size(), chunk_size)
    ws = torch.empty(n, width, dtype=hidden.dtype, device=hidden.device)
    grad_h = torch.zeros_like(hidden) if need_h else hidden.new_empty(0)
    grad_w = torch.empty_like(weight) if need_w else weight.new_empty(0)
    starts = range(0, vocab, width)
    acc = torch.empty(n, dim, dtype=torch.float32, device=hidden.device) if need_h and len(starts) > 1 else grad_h
    for i, col0 in enumerate(starts):
        n_cols = dlogits(hidden, weight, order, nvalid, *local, gh, ws, 0, n, col0, temperature, True, tiles)
        if need_h:
            grad_hidden(ws, weight, order, nvalid, acc, grad_h, 0, n, col0, n_cols, i > 0, i == len(starts) - 1,
                        tiles)
        if need_w:
            grad_weight(ws, hidden, order, nvalid, grad_w, 0, n, col0, n_cols, False, tiles)
    return grad_h, grad_w


# ---- torch.library registration: opaque to torch.compile, with fake kernels for tracing ----

@torch.library.custom_op("twofold::triton_logprobs_fwd", mutates_args=())
def _fwd_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
            temperature: float, want_entropy: bool, chunk_size: int,
            tiles: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(hidden, weight, targets, ignore_index, temperature, want_entropy, tiles)


@_fwd_op.register_fake
def _(hidden, weight, targets, ignore_index, temperature, want_entropy, chunk_size, tiles):
    return tuple(hidden.new_empty(hidden.shape[0], dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("twofold::triton_logprobs_bwd", mutates_args=())
def _bwd_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
            entropy: torch.Tensor, grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor], ignore_index: int,
            temperature: float, chunk_size: int, need_h: bool, need_w: bool,
            tiles: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, ignore_index, temperature,
                     chunk_size, need_h, need_w, tiles)


@_bwd_op.register_fake
def _(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, ignore_index, temperature, chunk_size,
      need_h, need_w, tiles):
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, ignore_index, temperature, want_entropy, chunk_size, tiles = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, targets, lse, entropy)
    ctx.args = (ignore_index, temperature, want_entropy, chunk_size, list(tiles))


def _autograd_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, targets, lse, entropy = ctx.saved_tensors
    ignore_index, temperature, want_entropy, chunk_size, tiles = ctx.args
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    grad_h, grad_w = _bwd_op(hidden, weight, targets, lse, entropy, grad_logp,
                             grad_entropy if want_entropy else None, ignore_index, temperature, chunk_size,
                             need_h, need_w, tiles)
    return (grad_h if need_h else None, grad_w if need_w else None) + (None,) * 6


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def triton_linear_logprobs(hidden, weight, targets, *, ignore_index, temperature, chunk_size, want_entropy,
                           tiles: Sequence[int] | None = None):
    """Backend entry point, contract of `chunked_linear_logprobs`: [N,H], [V,H], [N] -> (logp, entropy, lse).

    `chunk_size` is the vocab width of the backward's dz workspace (default: a 128 MiB budget). `tiles` pins the
    six block sizes (see DEFAULT_TILES) instead of autotuning. float64 has no tensor-core path and runs on the
    PyTorch backend.
    """
    if hidden.dtype == torch.float64:
        return chunked_linear_logprobs(hidden, weight, targets, ignore_index=ignore_index, temperature=temperature,
                                       chunk_size=None, want_entropy=want_entropy)
    if hidden.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 set before triton is "
                           "imported, for CPU tests)")
    return _fwd_op(hidden.contiguous(), weight.contiguous(), targets, int(ignore_index), float(temperature),
                   bool(want_entropy), int(chunk_size or 0), list(tiles or ()))
