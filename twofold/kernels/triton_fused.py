"""Triton vocab pass of the fused token-local losses (`twofold.kernels.fused.fused_linear_loss`, backend="triton").

Per chunk of compacted tokens: one kernel computes the logits block (stored in the input dtype) with its online
statistics, the objective's elementwise step gives g, a second kernel turns the stored logits into dz in place,
then dX of the chunk is written once and dW accumulates in fp32 (the weight gradient itself when the weight is
fp32). 6NHV FLOPs. Chunk boundaries are fixed on the host and tokens past the on-device valid count skip every
loop, so there is no host sync.
"""
from __future__ import annotations

import torch

from twofold.kernels.triton_logprobs import INTERPRET, compact, dlogits, grad_hidden, grad_weight, vocab_stats
from twofold.objectives.token_local import token_step

# Bytes of one [chunk, V] logits block on the Triton path. dW is accumulated once per chunk (an fp32 [V, H] read
# and write), so bigger chunks amortise that traffic; `chunk_size` overrides.
TRITON_CHUNK_BYTES = 512 * 2**20


def _chunk_tokens(n: int, vocab: int, itemsize: int, chunk_size: int | None) -> int:
    if chunk_size:
        return max(1, min(n, chunk_size))
    return max(1, min(n, max(128, TRITON_CHUNK_BYTES // (vocab * itemsize) // 128 * 128)))


def triton_fused_pass(hidden, weight, targets, fn, per_token, shared, temperature, ignore_index, entropy_mode,
                      chunk_size, needs, tiles=None):
    """(loss, logp, entropy, grad_hidden, grad_weight); same contract as `twofold.kernels.fused._torch_fused_pass`
    (entropy_mode 2: the entropy is an input of `fn`, and its gradient enters the dlogits kernel as g_H)."""
    if hidden.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 for CPU tests)")
    hidden, weight = hidden.contiguous(), weight.contiguous()
    n, vocab = hidden.shape[0], weight.shape[0]
    order, nvalid = compact(targets, ignore_index)
    size = _chunk_tokens(n, vocab, hidden.element_size(), chunk_size)
    ws = torch.empty(size, vocab, dtype=hidden.dtype, device=hidden.device)
    grad_h = torch.zeros_like(hidden) if needs[0] else hidden.new_empty(0)
    # The first chunk's dW kernel initialises every row (zero-trip loops give zeros), later chunks add to it.
    grad_w = (torch.empty if n else torch.zeros)(weight.shape if needs[1] else 0, dtype=torch.float32,
                                                 device=weight.device)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    logp_c, entropy_c = (torch.zeros(n, dtype=torch.float32, device=hidden.device) for _ in range(2))
    for row0 in range(0, n, size):
        rows = min(size, n - row0)
        logp, entropy, lse = vocab_stats(hidden, weight, targets, order, nvalid, row0, rows, temperature,
                                         entropy_mode > 0, logits_out=ws, tiles=tiles)
        index = order[row0:row0 + rows]
        ok = torch.arange(row0, row0 + rows, device=hidden.device) < nvalid
        logp, entropy = (torch.where(ok, t, torch.zeros_like(t)) for t in (logp, entropy))
        loss, g, g_entropy = token_step(fn, logp, per_token, shared, index, entropy if entropy_mode == 2 else None)
        total += torch.where(ok, loss, torch.zeros_like(loss)).sum()
        g = torch.where(ok, g, torch.zeros_like(g)).float()
        if g_entropy is not None:
            g_entropy = torch.where(ok, g_entropy, torch.zeros_like(g_entropy)).float()
        dlogits(hidden, weight, order, nvalid, targets[index], lse, entropy, g, g_entropy, ws, row0, rows, 0,
                temperature, False, tiles)
        if needs[0]:
            grad_hidden(ws, weight, order, nvalid, grad_h, grad_h, row0, rows, 0, vocab, False, True, tiles)
        if needs[1]:
            grad_weight(ws, hidden, order, nvalid, grad_w, row0, rows, 0, vocab, row0 > 0, tiles)
        logp_c[row0:row0 + rows], entropy_c[row0:row0 + rows] = logp, entropy
    logp_all, entropy_all = (torch.zeros_like(t).scatter_(0, order, t) for t in (logp_c, entropy_c))
    return total, logp_all, entropy_all, grad_h, grad_w.to(weight.dtype)
