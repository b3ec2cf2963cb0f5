"""Triton backend of the kept-set head (`twofold.kernels.kept`): one program per token, walking its kept row in
blocks of BLOCK_K ids and gathering those rows of W.

  _kept_stats_kernel  online max, sum-exp, sum p~ (z - max) and the target logit over the kept ids: the token's
                      lse, logp and entropy, as the full head's split statistics but over K_t alone.
  _kept_grads_kernel  recomputes z from the saved lse, forms dz = (g 1[v=y] - p (g + gH (log p + H))) / T, adds
                      dz @ W[K_t] to the token's own dX row and scatters dz h_t into dW[K_t] with atomic adds
                      (several tokens share ids, so dW rows are shared: unlike the full head's backward, the order
                      of those fp32 additions is not fixed, and dW is reproducible to round-off, not bitwise).

Products are fp32 (inputs upcast on load), whatever the input dtype. Same contract as the PyTorch functions
`torch_stats` / `torch_grads`: compacted tokens, kept [N, K] (-1 padded), pos [N] (the target's column).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from twofold.kernels.triton_logprobs import INTERPRET

BLOCK_K, BLOCK_H = 32, 64


@triton.jit
def _kept_logits_block(h_ptr, w_ptr, kept_ptr, t, k0, K, H, stride_h, stride_w, stride_k, inv_t,
                       BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """(z [BLOCK_K] fp32 tempered logits, -inf at padding; ids; valid) of token t's kept ids [k0, k0 + BLOCK_K)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    ids = tl.load(kept_ptr + t * stride_k + ks, mask=ks < K, other=-1).to(tl.int64)
    valid = ids >= 0
    z = tl.zeros([BLOCK_K], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        hv = tl.load(h_ptr + t * stride_h + hs, mask=h_ok, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + ids[:, None] * stride_w + hs[None, :], mask=valid[:, None] & h_ok[None, :],
                     other=0.0).to(tl.float32)
        z += tl.sum(wv * hv[None, :], axis=1)
    return tl.where(valid, z * inv_t, float("-inf")), ids, valid


@triton.jit
def _kept_stats_kernel(h_ptr, w_ptr, kept_ptr, pos_ptr, m_ptr, s_ptr, a_ptr, zy_ptr, K, H, stride_h, stride_w,
                       stride_k, inv_t, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    s = tl.zeros([1], dtype=tl.float32)
    a = tl.zeros([1], dtype=tl.float32)  # sum_v e^(z_v - m) (z_v - m)
    zy = tl.zeros([1], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        z, ids, valid = _kept_logits_block(h_ptr, w_ptr, kept_ptr, t, k0, K, H, stride_h, stride_w, stride_k,
                                           inv_t, BLOCK_K, BLOCK_H)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # a block of padding only, or nothing seen yet, must not form -inf - -inf
        seen = m > float("-inf")
        shift = tl.where(seen, m, 0.0) - tl.where(seen, m_new, 0.0)
        scale = tl.exp(shift)
        d = tl.where(valid, z, 0.0) - tl.where(valid, m_new, 0.0)
        e = tl.where(valid, tl.exp(d), 0.0)
        a = scale * (a + s * shift) + tl.sum(e * d, axis=0)
        s = s * scale + tl.sum(e, axis=0)
        m = m_new
        zy += tl.sum(tl.where(k0 + tl.arange(0, BLOCK_K) == pos, z, 0.0), axis=0)
    tl.store(m_ptr + t + tl.arange(0, 1), m)
    tl.store(s_ptr + t + tl.arange(0, 1), s)
    tl.store(a_ptr + t + tl.arange(0, 1), a)
    tl.store(zy_ptr + t + tl.arange(0, 1), zy)


@triton.jit
def _kept_grads_kernel(h_ptr, w_ptr, kept_ptr, pos_ptr, lse_ptr, ent_ptr, g_ptr, gh_ptr, dh_ptr, dw_ptr, K, H,
                       stride_h, stride_w, stride_k, stride_dh, stride_dw, inv_t, HAS_GH: tl.constexpr,
                       NEED_H: tl.constexpr, NEED_W: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    lse = tl.load(lse_ptr + t)
    g = tl.load(g_ptr + t)
    for k0 in range(0, K, BLOCK_K):
        z, ids, valid = _kept_logits_block(h_ptr, w_ptr, kept_ptr, t, k0, K, H, stride_h, stride_w, stride_k,
                                           inv_t, BLOCK_K, BLOCK_H)
        log_p = tl.where(valid, z - lse, 0.0)
        coef = g + tl.zeros([BLOCK_K], dtype=tl.float32)
        if HAS_GH:
            coef += tl.load(gh_ptr + t) * (log_p + tl.load(ent_ptr + t))
        dz = -tl.where(valid, tl.exp(log_p), 0.0) * coef
        dz = (dz + tl.where(k0 + tl.arange(0, BLOCK_K) == pos, g, 0.0)) * inv_t
        dz = tl.where(valid, dz, 0.0)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_ok = hs < H
            if NEED_H:
                wv = tl.load(w_ptr + ids[:, None] * stride_w + hs[None, :], mask=valid[:, None] & h_ok[None, :],
                             other=0.0).to(tl.float32)
                row = dh_ptr + t * stride_dh + hs
                tl.store(row, tl.load(row, mask=h_ok, other=0.0) + tl.sum(dz[:, None] * wv, axis=0), mask=h_ok)
            if NEED_W:
                hv = tl.load(h_ptr + t * stride_h + hs, mask=h_ok, other=0.0).to(tl.float32)
                tl.atomic_add(dw_ptr + ids[:, None] * stride_dw + hs[None, :], dz[:, None] * hv[None, :],
                              mask=valid[:, None] & h_ok[None, :])


def _check_device(hidden: torch.Tensor) -> None:
    if hidden.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 set before triton is "
                           "imported, for CPU tests)")


def triton_stats(hidden, weight, kept, pos, temperature, want_entropy):
    """(logp, entropy, lse) [N] fp32; the entropy is computed whether or not it is wanted (it is free here)."""
    _check_device(hidden)
    hidden, weight, kept = hidden.contiguous(), weight.contiguous(), kept.contiguous()
    n, dim = hidden.shape
    m, s, a, zy = (torch.zeros(n, dtype=torch.float32, device=hidden.device) for _ in range(4))
    if n:
        _kept_stats_kernel[(n,)](hidden, weight, kept, pos, m, s, a, zy, kept.shape[1], dim, hidden.stride(0),
                                 weight.stride(0), kept.stride(0), 1.0 / temperature, BLOCK_K=BLOCK_K,
                                 BLOCK_H=BLOCK_H)
    log_s = torch.log(s)
    lse = m + log_s
    # exact arithmetic gives logp <= 0 and entropy >= 0 (as the full head's merge clamps)
    return (zy - lse).clamp_(max=0.0), (log_s - a / s).clamp_(min=0.0), lse


def triton_grads(hidden, weight, kept, pos, lse, entropy, g, g_entropy, temperature, need_h, need_w):
    """(dX [N, H] fp32 or None, dW [V, H] fp32 or None); contract of `torch_grads`."""
    _check_device(hidden)
    hidden, weight, kept = hidden.contiguous(), weight.contiguous(), kept.contiguous()
    n, dim = hidden.shape
    grad_h = torch.zeros(n, dim, dtype=torch.float32, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    if n and (need_h or need_w):
        dh = grad_h if need_h else lse  # an unused pointer argument
        dw = grad_w if need_w else lse
        gh = g_entropy.float().contiguous() if g_entropy is not None else g
        _kept_grads_kernel[(n,)](hidden, weight, kept, pos, lse.float().contiguous(), entropy.float().contiguous(),
                                 g.float().contiguous(), gh, dh, dw, kept.shape[1], dim, hidden.stride(0),
                                 weight.stride(0), kept.stride(0), dim, dim, 1.0 / temperature,
                                 HAS_GH=g_entropy is not None, NEED_H=need_h, NEED_W=need_w, BLOCK_K=BLOCK_K,
                                 BLOCK_H=BLOCK_H)
    return grad_h, grad_w
