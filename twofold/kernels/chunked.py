"""Chunked PyTorch backend of `linear_logprobs`: the reference path, and the one CPU users run.

Per token t with logits z = h_t W^T / temperature:
    logp_t = z[y_t] - lse(z),            entropy_t = -sum_v p_v log p_v,   p = softmax(z).
Forward keeps only logp, entropy and lse per token. Backward recomputes the logits from the saved lse and forms
their gradient from the upstream gradients g (of logp) and g_H (of entropy):
    dL/dz_v = g * 1[v = y] - p_v * (g + g_H * (z_v - lse + H))
so no [N, V] tensor ever exists: the largest temporary is one [rows, cols] tile of logits (two with the entropy).

Both passes walk tiles of tokens x vocabulary (`TILE`), not whole-vocabulary chunks. The forward merges each
tile's (lse, entropy) into the row's (`merge_tiles`, exact: no cancellation); the backward reads and writes dW
[V, H] once per row of tiles and dX [rows, H] once per column of tiles, so its traffic is N V H (1/rows + 1/cols),
least for square tiles, and every GEMM keeps K >= 1024 (or H). Whole-vocabulary chunks need few rows to fit a
block (128 at V=151936, 74 MiB) and so re-read the fp32 dW (594 MiB there) every 128 tokens: at N=4096 H=1024
V=151936 the head's fwd+bwd ran its GEMMs at 45 GFLOP/s that way and at 71 in tiles (one core, bench/README.md).

Elementwise work per tile is kept to few passes because on CPU it costs as much as a thin GEMM: the log-softmax
runs in place as one fused kernel, and the backward forms dz in place in three passes (five with the entropy),
with the temperature folded into the per-token coefficients.

Precision: the softmax math is always fp32 (fp64 for fp64 inputs). The GEMMs run in `gemm_dtype`: for bf16/fp16
inputs, the `native` policy (low-precision GEMMs with fp32 accumulation, the logits rounded to the input dtype, as
eager's are) on a GPU and on a CPU whose oneDNN runs the dtype natively, else `fp32-upcast` (fp32 GEMMs: on a CPU
without native bf16 a bf16 GEMM is emulated and several times slower, bench/README.md). TWOFOLD_GEMM_PRECISION
forces either; docs/kernels.md states what each promises. Autocast is off inside the head in forward and backward
alike, so the backward's recomputed logits are the forward's.

The whole-vocabulary chunk helpers (`chunk_logits`, `chunk_stats_`, `default_chunk_size`) serve the fused loss
pass (`twofold.kernels.fused`), which needs a row's whole softmax before it can form that row's gradient.
"""
from __future__ import annotations

import os

import torch

# The (tokens, vocabulary) tile of both passes: 4 MiB of fp32 logits. Square per the traffic above; in a one-off
# sweep of the backward alone (N=2048 H=1024 V=151936, one core, load ~3) the tiles from 256 x 2048 to 4096 x 512
# ran within noise of each other, 1.6x faster than 128-token whole-vocabulary chunks.
TILE = (1024, 1024)
# Fewest tokens per whole-vocabulary chunk (the fused pass): below this the GEMMs lose most of their speed (at
# V=151936, 16-row chunks ran the GEMM 3x slower than 128-row ones).
MIN_CHUNK_ROWS = 128


def default_chunk_size(num_tokens: int, vocab: int, chunk_bytes: int) -> int:
    """Tokens per whole-vocabulary chunk so one fp32 [chunk, V] block stays under `chunk_bytes` (a multiple of 16),
    but never fewer than MIN_CHUNK_ROWS."""
    rows = max(MIN_CHUNK_ROWS, (chunk_bytes // (4 * vocab)) // 16 * 16)
    return max(1, min(rows, num_tokens))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); every other float type accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The switch that forces the head's GEMM policy for bf16/fp16 inputs (docs/kernels.md, "Precision contract"):
#   fp32-upcast  the inputs are upcast and the GEMMs run in fp32 (exact products, fp32 accumulation);
#   native       the GEMMs run in the input dtype with fp32 accumulation, each logit rounded to that dtype;
#   auto         (the default) native on a GPU and on a CPU where oneDNN runs that dtype natively, else fp32-upcast.
GEMM_PRECISION_ENV = "TWOFOLD_GEMM_PRECISION"
GEMM_POLICIES = ("auto", "fp32-upcast", "native")

# oneDNN's x86 ISA levels, lowest first, by the names ONEDNN_MAX_CPU_ISA takes (the older aliases map onto them).
# A cap below the level where the dtype's dot-product instructions live makes oneDNN emulate that dtype: at
# ONEDNN_MAX_CPU_ISA=AVX512_CORE its bf16 GEMM ran at 38 GFLOP/s against 97-103 for fp32 (bench/README.md).
ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
               "AVX512_CORE_BF16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
               "AVX10_2_512_AMX_2")
ONEDNN_ISA_ALIASES = {"AVX512_CORE_FP16": "AVX10_1_512", "AVX512_CORE_AMX": "AVX10_1_512_AMX",
                      "AVX512_CORE_AMX_FP16": "AVX10_1_512_AMX_FP16"}
# dtype -> (does the CPU have its dot-product instructions, does torch's oneDNN run the dtype, lowest oneDNN ISA
# that uses those instructions)
NATIVE_GEMM = {
    torch.bfloat16: (lambda: torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported(),
                     lambda: torch.ops.mkldnn._is_mkldnn_bf16_supported(), "AVX512_CORE_BF16"),
    torch.float16: (lambda: torch.cpu._is_amx_fp16_supported(),
                    lambda: torch.ops.mkldnn._is_mkldnn_fp16_supported(), "AVX10_1_512_AMX_FP16"),
}


def onednn_isa_allows(level: str) -> bool:
    """Whether ONEDNN_MAX_CPU_ISA (or its old name DNNL_MAX_CPU_ISA), read by oneDNN at start-up, lets it use
    `level`. An unknown cap counts as below: the fp32 path is never the slow one."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if cap in ("ALL", "DEFAULT"):
        return True
    cap = ONEDNN_ISA_ALIASES.get(cap, cap)
    return cap in ONEDNN_ISAS and ONEDNN_ISAS.index(cap) >= ONEDNN_ISAS.index(level)


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether torch's CPU GEMMs run `dtype` natively, as the math library will actually run them: the CPU has
    the instructions (AVX512-BF16 or AMX for bf16, AMX-FP16 for fp16), oneDNN reports the dtype supported, and
    ONEDNN_MAX_CPU_ISA does not cap oneDNN below them. The CPU flags alone are not enough: under a cap oneDNN
    emulates bf16 (14x slower than upcasting at ONEDNN_MAX_CPU_ISA=AVX2)."""
    if dtype not in NATIVE_GEMM:
        return False
    has_instructions, onednn_runs, level = NATIVE_GEMM[dtype]
    return has_instructions() and onednn_runs() and onednn_isa_allows(level)


def gemm_precision() -> str:
    """The GEMM policy forced by TWOFOLD_GEMM_PRECISION, or "auto"."""
    policy = os.environ.get(GEMM_PRECISION_ENV, "auto").strip().lower() or "auto"
    if policy not in GEMM_POLICIES:
        raise ValueError(f"{GEMM_PRECISION_ENV}={os.environ[GEMM_PRECISION_ENV]!r} is not a GEMM policy: set it to "
                         f"one of {', '.join(GEMM_POLICIES)} (docs/kernels.md), or unset it")
    return policy


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the head's GEMMs run in for inputs of `dtype` on `device`: fp32/fp64 as they are; bf16/fp16 per
    the policy (`gemm_precision`; "auto": native on a GPU or where `cpu_has_native`, else fp32-upcast)."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    policy = gemm_precision()
    if policy == "auto":
        policy = "native" if device.type != "cpu" or cpu_has_native(dtype) else "fp32-upcast"
    return dtype if policy == "native" else torch.float32


def no_autocast(device: torch.device):
    """The head chooses its own precision (`gemm_dtype`). Under an autocast region (HF Trainer's bf16=True) the
    forward GEMMs would otherwise run in bf16 while a backward outside the region recomputes them in fp32."""
    return torch.autocast(device.type, enabled=False)


def logits_block(rows: int, cols: int, acc: torch.dtype, device: torch.device) -> torch.Tensor:
    """The one buffer every chunk's (or tile's) logits are written into, viewed per chunk by `block_view`.
    Allocating a block per chunk would keep two alive (the previous chunk's until the new one is assigned) and,
    on CPU, fault in fresh pages each time."""
    return torch.empty(rows * cols, dtype=acc, device=device)


def block_view(block: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous [rows, cols] view of the first rows * cols elements of `block` (a ragged last tile too)."""
    return block[:rows * cols].view(rows, cols)


def gemm_input(h: torch.Tensor, temperature: float, w_gemm: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """h / temperature in the GEMM dtype. The temperature divides the [chunk, H] hidden states, not the
    [chunk, V] logits: a pass over H, not V."""
    if temperature != 1.0:
        h = h.to(acc) / temperature
    return h.to(w_gemm.dtype)


def logits_into(out: torch.Tensor, h_gemm: torch.Tensor, w_gemm: torch.Tensor) -> torch.Tensor:
    """out (acc dtype) = h_gemm @ w_gemm^T, a GEMM in w_gemm's dtype; a low-precision result is upcast into out."""
    if w_gemm.dtype == out.dtype:
        return torch.mm(h_gemm, w_gemm.t(), out=out)
    return out.copy_(h_gemm @ w_gemm.t())


def chunk_logits(h: torch.Tensor, w_gemm: torch.Tensor, temperature: float, acc: torch.dtype,
                 block: torch.Tensor) -> torch.Tensor:
    """Logits of one chunk over the whole vocabulary in `acc`, divided by the temperature, written into `block`."""
    out = block_view(block, h.shape[0], w_gemm.shape[0])
    return logits_into(out, gemm_input(h, temperature, w_gemm, acc), w_gemm)


def tile_stats_(z: torch.Tensor, want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(lse, entropy or None) of a block of logits, each row's softmax over the block's columns alone; z becomes
    that log-softmax, in place (one fused kernel; a row is read before it is written). The lse is read at the
    row's maximum (max - log_softmax there, at most log(cols) in magnitude): no cancellation. The entropy is
    -sum p log p on the log-softmax, no difference of two large terms; torch's sum reduces pairwise (a BLAS dot
    over V=32k drifts 10x more)."""
    top, where = z.max(1, keepdim=True)
    log_q = torch.log_softmax(z, dim=1, out=z)
    lse = (top - log_q.gather(1, where)).squeeze(1)
    return lse, (-torch.exp(log_q).mul_(log_q).sum(1) if want_entropy else None)


def chunk_stats_(z: torch.Tensor, targets: torch.Tensor, want_entropy: bool):
    """(logp, entropy or None, lse) of a whole-vocabulary chunk of logits (overwrites z with its log-softmax)."""
    lse, entropy = tile_stats_(z, want_entropy)
    return z.gather(1, targets[:, None]).squeeze(1), entropy, lse


def merge_tiles(tile_lse: torch.Tensor, tile_entropy: torch.Tensor | None, tile_logp: torch.Tensor,
                target_tile: torch.Tensor):
    """(logp, entropy or None, lse) of rows split into column tiles k with per-tile (lse_k, H_k) [rows, tiles] and
    the target's in-tile log-prob: with tile masses w_k = exp(lse_k - lse),
        lse = log sum_k exp(lse_k),  logp = log q(y) + log w_k(y),  H = sum_k w_k (H_k - log w_k),
    every term non-negative: no cancellation."""
    lse = torch.logsumexp(tile_lse, 1)
    log_w = tile_lse - lse[:, None]
    logp = tile_logp + log_w.gather(1, target_tile[:, None]).squeeze(1)
    if tile_entropy is None:
        return logp, None, lse
    return logp, (log_w.exp() * (tile_entropy - log_w)).sum(1), lse


def softmax_grad_(log_p: torch.Tensor, targets: torch.Tensor, grad_logp: torch.Tensor, temperature: float,
                  grad_entropy: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                  col0: int = 0) -> torch.Tensor:
    """dL/d(h W^T) of one chunk, formed in log_p's storage (log_p: the chunk's log-softmax over vocabulary columns
    [col0, col0 + width); targets, grad_logp, grad_entropy, entropy: [chunk]):
        (g 1[v = y] - p_v (g + g_H (log p_v + H))) / temperature."""
    g = grad_logp / temperature
    if grad_entropy is None:
        dz = log_p.exp_().mul_(-g[:, None])
    else:
        g_h = grad_entropy.to(log_p.dtype) / temperature
        p = torch.exp(log_p)
        # log_p <- -(g + g_H (log p + H)), then dz = p * log_p: no negation pass, no third block
        dz = p.mul_(log_p.mul_(-g_h[:, None]).sub_((g + g_h * entropy)[:, None]))
    # the target's +g, for the rows whose target falls in these columns: no host sync, no branch per tile
    col = targets - col0
    hit = (col >= 0) & (col < dz.shape[1])
    dz[torch.arange(dz.shape[0], device=dz.device), col.clamp(0, dz.shape[1] - 1)] += torch.where(hit, g, 0.0)
    return dz


def weight_for_gemm(weight: torch.Tensor) -> torch.Tensor:
    """The weight in `gemm_dtype`: at most one upcast per call (O(VH), never O(NV))."""
    return weight.to(gemm_dtype(weight.dtype, weight.device))


def add_matmul_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out (fp32/fp64) += a @ b, the GEMM in b's dtype: addmm in place when that is out's dtype, else one
    low-precision GEMM with fp32 accumulation whose result is added."""
    if b.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out += a.to(b.dtype) @ b


class ChunkedLinearLogprobs(torch.autograd.Function):
    """hidden [N,H] (valid tokens only), weight [V,H], targets [N] -> (logp [N], entropy [N], lse [N]), walking
    (rows, cols) = `tile` tiles of tokens x vocabulary in forward and backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, tile, want_entropy):
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None and costs nothing
        with no_autocast(hidden.device):
            return ChunkedLinearLogprobs._forward(ctx, hidden, weight, targets, temperature, tile, want_entropy)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, temperature, tile, want_entropy):
        acc = compute_dtype(hidden.dtype)
        (n, _), vocab = hidden.shape, weight.shape[0]
        rows, cols = tile
        w = weight_for_gemm(weight)
        logp, lse = hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc)
        entropy = hidden.new_zeros(n, dtype=acc)
        block = logits_block(min(rows, n), min(cols, vocab), acc, w.device)
        starts = range(0, vocab, cols)
        for s in range(0, n, rows):
            e = min(s + rows, n)
            h, y = gemm_input(hidden[s:e], temperature, w, acc), targets[s:e]
            tile_lse = torch.empty(e - s, len(starts), dtype=acc, device=w.device)
            tile_entropy = torch.empty_like(tile_lse) if want_entropy else None
            tile_logp = torch.empty(e - s, dtype=acc, device=w.device)
            for k, c in enumerate(starts):
                d = min(c + cols, vocab)
                log_q = logits_into(block_view(block, e - s, d - c), h, w[c:d])
                tile_lse[:, k], ent = tile_stats_(log_q, want_entropy)
                if ent is not None:
                    tile_entropy[:, k] = ent
                col = y - c
                hit = (col >= 0) & (col < d - c)
                tile_logp = torch.where(hit, log_q.gather(1, col.clamp(0, d - c - 1)[:, None]).squeeze(1), tile_logp)
            lp, ent, ls = merge_tiles(tile_lse, tile_entropy, tile_logp, y // cols)
            logp[s:e], lse[s:e] = lp, ls
            if ent is not None:
                entropy[s:e] = ent
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.tile = temperature, tile
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        with no_autocast(ctx.saved_tensors[0].device):
            return ChunkedLinearLogprobs._backward(ctx, grad_logp, grad_entropy)

    @staticmethod
    def _backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        temperature, (rows, cols) = ctx.temperature, ctx.tile
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = compute_dtype(hidden.dtype)
        (n, dim), vocab = hidden.shape, weight.shape[0]
        w = weight_for_gemm(weight)
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(acc)
        grad_h = torch.zeros(n, dim, dtype=acc, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        block = logits_block(min(rows, n), min(cols, vocab), acc, w.device)
        for s in range(0, n, rows):
            e = min(s + rows, n)
            h = gemm_input(hidden[s:e], temperature, w, acc)  # the logits' GEMM input: h / temperature
            h_raw = hidden[s:e].to(w.dtype)  # dW = dz^T h takes the untempered h (the 1/T is inside dz)
            g_entropy = None if grad_entropy is None else grad_entropy[s:e]
            for c in range(0, vocab, cols):
                d = min(c + cols, vocab)
                log_p = logits_into(block_view(block, e - s, d - c), h, w[c:d]).sub_(lse[s:e, None])
                dz = softmax_grad_(log_p, targets[s:e], grad_logp[s:e], temperature, g_entropy, entropy[s:e], c)
                if need_h:
                    add_matmul_(grad_h[s:e], dz, w[c:d])
                if need_w:
                    add_matmul_(grad_w[c:d], dz.t(), h_raw)
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None)


def chunked_linear_logprobs(hidden, weight, targets, *, ignore_index, temperature, chunk_size, want_entropy,
                            tile=None):
    """Backend entry point: [N,H], [V,H], [N] -> (logp, entropy, lse), each [N], zero at ignored positions.
    chunk_size: tokens per tile (default TILE's rows); tile: (rows, cols), to test ragged tiles (default TILE).

    Ignored tokens are dropped before any GEMM, so the cost scales with valid tokens. Finding them is one
    host sync (`nonzero`), acceptable on this path: it is the CPU path and the reference; the Triton
    backend masks tiles on device instead.
    """
    n = hidden.shape[0]
    valid = (targets != ignore_index).nonzero().squeeze(1)
    compact = valid.numel() != n
    h = hidden.index_select(0, valid) if compact else hidden
    y = targets.index_select(0, valid) if compact else targets
    tile = tuple(tile or (chunk_size or TILE[0], TILE[1]))
    logp, entropy, lse = ChunkedLinearLogprobs.apply(h, weight, y, float(temperature), tile, want_entropy)
    if not compact:
        return logp, entropy, lse
    return tuple(torch.zeros(n, dtype=t.dtype, device=t.device).index_copy(0, valid, t) for t in (logp, entropy, lse))
