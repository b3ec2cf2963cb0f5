"""Triton kernels of the fused LM head: vocab-blockwise statistics, logits gradients and the two gradient GEMMs.

Every kernel works on *compacted* tokens: `order` lists the valid tokens first (an on-device stable sort), and
`nvalid` is a one-element device tensor. Tiles past `nvalid` run zero-trip loops, so ignored tokens cost nothing
and the host never syncs. Row indices are int64 (N*V and V*H can exceed 2^31). No kernel uses atomics: each output
element is written by exactly one program, so every result is bitwise reproducible.

Kernels (launched from `twofold/kernels/triton_logprobs.py`):
  _stats_kernel    per (token block, vocab split): online max, sum-exp, sum p*(z - max), target logit (fp32);
                   optionally stores the logits block (the fused-loss path reuses it instead of recomputing).
  _dlogits_kernel  dz = (g*1[v=y] - p*(g + gH*(z - lse + H))) / T per tile, from recomputed or stored logits.
  _dx_kernel       dX = dz @ W[slice] (fp32 accumulate, optional running sum, scatter to original rows).
  _dw_kernel       dW[slice] = dz^T @ X over all valid tokens in one contraction (optional running sum).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, row_ok, cols, col_ok, H, stride_h, stride_w, k_hi, inv_t,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of (h[rows] @ w[cols].T) * inv_t; k_hi = 0 skips the contraction."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    h_base = h_ptr + rows[:, None] * stride_h
    w_base = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, k_hi, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        a = tl.load(h_base + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_base + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc * inv_t


@triton.jit
def _stats_kernel(h_ptr, w_ptr, y_ptr, order_ptr, nvalid_ptr, m_ptr, s_ptr, t_ptr, e_ptr, z_ptr,
                  row0, n_rows, V, H, stride_h, stride_w, stride_z, inv_t,
                  splits, WANT_ENTROPY: tl.constexpr, STORE_LOGITS: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Partial statistics of local tokens [pid_n*BLOCK_N, +BLOCK_N) over one vocab split, written to [splits, n_rows]."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    t = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_hi = tl.minimum(tl.load(nvalid_ptr) - row0, n_rows)
    row_ok = t < t_hi
    rows = tl.load(order_ptr + row0 + t, mask=row_ok, other=0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    tiles = tl.cdiv(tl.cdiv(V, BLOCK_V), splits)
    v_lo = pid_s * tiles * BLOCK_V
    v_hi = tl.minimum(v_lo + tiles * BLOCK_V, V)
    v_hi = tl.where(pid_n * BLOCK_N < t_hi, v_hi, v_lo)  # a block of ignored tokens skips the vocab loop
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    tz = tl.zeros([BLOCK_N], dtype=tl.float32)
    ez = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logits_tile(h_ptr, w_ptr, rows, row_ok, cols, col_ok, H, stride_h, stride_w, H, inv_t,
                         BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
        if STORE_LOGITS:
            z_off = t.to(tl.int64)[:, None] * stride_z + cols[None, :]
            tl.store(z_ptr + z_off, z.to(z_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        tz += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        scale = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        if WANT_ENTROPY:
            # ez = sum p~ (z - m) relative to the running max: entropy = log s - ez / s, two non-negative terms,
            # with no cancellation between lse and E[z] when the logits are large.
            shift = tl.where(s > 0, m - m_new, 0.0)
            zs = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)
            ez = scale * (ez + s * shift) + tl.sum(p * zs, axis=1)
        s = s * scale + tl.sum(p, axis=1)
        m = m_new
    out = pid_s * n_rows + t
    in_range = t < n_rows
    tl.store(m_ptr + out, m, mask=in_range)
    tl.store(s_ptr + out, s, mask=in_range)
    tl.store(t_ptr + out, tz, mask=in_range)
    if WANT_ENTROPY:
        tl.store(e_ptr + out, ez, mask=in_range)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, order_ptr, nvalid_ptr, y_ptr, lse_ptr, ent_ptr, g_ptr, gh_ptr, ws_ptr,
                    row0, n_rows, col0, n_cols, V, H, stride_h, stride_w, stride_ws, inv_t,
                    RECOMPUTE: tl.constexpr, HAS_GH: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Writes dL/dz (already divided by T) for local tokens x vocab [col0, col0+n_cols) into ws[t, v - col0].

    Per-token inputs (y, lse, entropy, g, gH) are indexed by local token t. RECOMPUTE forms the logits tile from
    h and w; otherwise ws holds the logits and is overwritten in place.
    """
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    t = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_hi = tl.minimum(tl.load(nvalid_ptr) - row0, n_rows)
    row_ok = t < t_hi
    c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = c < n_cols
    cols = col0 + c
    ws_off = t.to(tl.int64)[:, None] * stride_ws + c[None, :]
    if RECOMPUTE:
        rows = tl.load(order_ptr + row0 + t, mask=row_ok, other=0)
        k_hi = tl.where(pid_n * BLOCK_N < t_hi, H, 0)
        z = _logits_tile(h_ptr, w_ptr, rows, row_ok, cols, col_ok & (cols < V), H, stride_h, stride_w, k_hi,
                         inv_t, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
    else:
        z = tl.load(ws_ptr + ws_off, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    y = tl.load(y_ptr + t, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + t, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + t, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    coef = g[:, None]
    if HAS_GH:
        gh = tl.load(gh_ptr + t, mask=row_ok, other=0.0)
        ent = tl.load(ent_ptr + t, mask=row_ok, other=0.0)
        coef = coef + gh[:, None] * (z - lse[:, None] + ent[:, None])
    # The target term is added in fp32 here, never as a low-precision `softmax - 1`.
    dz = (tl.where(cols[None, :] == y[:, None], g[:, None], 0.0) - p * coef) * inv_t
    dz = tl.where(row_ok[:, None], dz, 0.0)
    tl.store(ws_ptr + ws_off, dz.to(ws_ptr.dtype.element_ty), mask=(t < n_rows)[:, None] & col_ok[None, :])


@triton.jit
def _dx_kernel(ws_ptr, w_ptr, order_ptr, nvalid_ptr, acc_ptr, out_ptr,
               row0, n_rows, col0, n_cols, H, stride_ws, stride_w, stride_out,
               ACC_IN: tl.constexpr, SCATTER: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dX[t] (+)= ws[t, :n_cols] @ w[col0:col0+n_cols]; running sum in fp32 `acc` [*, H] (compacted rows), or
    (SCATTER) the final value cast and written to out[order[row0+t]]."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_hi = tl.minimum(tl.load(nvalid_ptr) - row0, n_rows)
    row_ok = t < t_hi
    hs = pid_h * BLOCK_N + tl.arange(0, BLOCK_N)
    h_ok = hs < H
    k_hi = tl.where(pid_m * BLOCK_M < t_hi, n_cols, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    a_base = ws_ptr + t.to(tl.int64)[:, None] * stride_ws
    for k0 in range(0, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < n_cols
        a = tl.load(a_base + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + (col0 + ks).to(tl.int64)[:, None] * stride_w + hs[None, :],
                    mask=k_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)
    mask = row_ok[:, None] & h_ok[None, :]
    acc_off = (row0 + t).to(tl.int64)[:, None] * H + hs[None, :]
    if ACC_IN:
        acc += tl.load(acc_ptr + acc_off, mask=mask, other=0.0)
    if SCATTER:
        rows = tl.load(order_ptr + row0 + t, mask=row_ok, other=0)
        tl.store(out_ptr + rows[:, None] * stride_out + hs[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(acc_ptr + acc_off, acc, mask=mask)


@triton.jit
def _dw_kernel(ws_ptr, x_ptr, order_ptr, nvalid_ptr, out_ptr,
               row0, n_rows, col0, n_cols, H, stride_ws, stride_x, stride_out,
               ACC_IN: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[col0+v] (+)= sum over valid local tokens t of ws[t, v] * x[order[row0+t]]: the K loop runs over the
    valid tokens only, and one program owns each output tile, so dW is written once per call with fp32 sums."""
    pid_v = tl.program_id(0)
    pid_h = tl.program_id(1)
    vs = pid_v * BLOCK_M + tl.arange(0, BLOCK_M)
    v_ok = vs < n_cols
    hs = pid_h * BLOCK_N + tl.arange(0, BLOCK_N)
    h_ok = hs < H
    t_hi = tl.minimum(tl.load(nvalid_ptr) - row0, n_rows)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, t_hi, BLOCK_K):
        ts = k0 + tl.arange(0, BLOCK_K)
        t_ok = ts < t_hi
        a = tl.load(ws_ptr + ts.to(tl.int64)[:, None] * stride_ws + vs[None, :],
                    mask=t_ok[:, None] & v_ok[None, :], other=0.0)
        rows = tl.load(order_ptr + row0 + ts, mask=t_ok, other=0)
        b = tl.load(x_ptr + rows[:, None] * stride_x + hs[None, :], mask=t_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(a.to(b.dtype)), b, acc, input_precision=PRECISION)
    mask = v_ok[:, None] & h_ok[None, :]
    out_off = (col0 + vs).to(tl.int64)[:, None] * stride_out + hs[None, :]
    if ACC_IN:
        acc += tl.load(out_ptr + out_off, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask)
