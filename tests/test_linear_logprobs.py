"""Accuracy of kernels.linear_logprobs / linear_cross_entropy (torch backend) against a float64 reference.

Primary assertion (docs/kernels.md, the precision contract), with gt float64 math on the same (rounded) inputs and
eager = torch materialising the logits in the test dtype:
    fp32 GEMMs (fp32 inputs, or bf16 under fp32-upcast): element-wise |ours - gt| <= |eager - gt| + tol;
    bf16 GEMMs (bf16 under native):                       norm-wise   ||ours - gt||_2 <= ||eager - gt||_2.
bf16 cases run under both policies, forced with TWOFOLD_GEMM_PRECISION (the `dtype` fixture), on any CPU.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from twofold.kernels import chunked, linear_cross_entropy, linear_logprobs

IGNORE = -100
TOL = {torch.float32: (1e-5, 5e-4), torch.bfloat16: (1e-2, 1e-2)}  # (forward, backward)
CPU = torch.device("cpu")


@pytest.fixture(params=[pytest.param((torch.float32, "auto"), id="fp32"),
                        pytest.param((torch.bfloat16, "fp32-upcast"), id="bf16-fp32-upcast"),
                        pytest.param((torch.bfloat16, "native"), id="bf16-native")])
def dtype(request, monkeypatch):
    """The input dtype, with the GEMM policy forced: bf16 under each policy whatever this CPU would pick."""
    dtype, policy = request.param
    monkeypatch.setenv(chunked.GEMM_PRECISION_ENV, policy)
    return dtype


def low_precision_gemms(dtype):
    """Whether the head's GEMMs run in `dtype` itself (bf16 under the native policy): each logit then rounds."""
    return dtype not in (torch.float32, torch.float64) and chunked.gemm_dtype(dtype, CPU) == dtype


def make_case(n, h, v, dtype, seed=0, ignore_frac=0.2, peaked=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    if peaked:  # CCE's trick: some tokens align with a vocab row, so their softmax is sharp.
        k = min(n, v) // 2
        weight[:k] = hidden[:k] / h**0.25
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = IGNORE
    return hidden.to(dtype), weight.to(dtype), targets


def materialised(hidden, weight, targets, temperature=1.0, dtype=torch.float64):
    """Reference: full logits in `dtype`; returns (logp, entropy), 0 at ignored positions."""
    logits = (hidden.to(dtype) @ weight.to(dtype).t()) / temperature
    logsm = logits.log_softmax(-1)
    valid = targets != IGNORE
    logp = logsm.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * valid
    entropy = -(logsm.exp() * logsm).sum(-1) * valid
    return logp, entropy


def outputs_and_grads(fn, hidden, weight, g_logp, g_ent):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    logp, ent = fn(h, w)
    loss = 0
    if g_logp is not None:
        loss = loss + (logp.to(g_logp.dtype) * g_logp).sum()
    if g_ent is not None:
        loss = loss + (ent.to(g_ent.dtype) * g_ent).sum()
    dh, dw = torch.autograd.grad(loss, (h, w))
    return [x.detach().double() for x in (logp, ent, dh, dw)]


def with_tile(tile, temperature):
    """The torch backend with the backward's (rows, cols) tile pinned: (logp, entropy) of (hidden, weight, targets)."""
    def fn(h, w, targets):
        return chunked.chunked_linear_logprobs(h, w, targets, ignore_index=IGNORE, temperature=temperature,
                                               chunk_size=None, want_entropy=True, tile=tile)[:2]
    return fn


def three_way(hidden, weight, targets, temperature=1.0, chunk_size=None, upstream=("logp", "ent"), tile=None):
    """The precision contract of the policy in force (module docstring) for logp, entropy, dX and dW. With bf16
    GEMMs each logit is rounded once, at another place than eager rounds it (the temperature divides the hidden
    states; eager also rounds its log-softmax), so the two errors are not comparable logit by logit, only in norm.
    `tile` pins the backward's (rows, cols) tile."""
    dtype = hidden.dtype
    n = targets.numel()
    g = torch.Generator().manual_seed(1)
    g_logp = torch.randn(n, generator=g, dtype=torch.float64) if "logp" in upstream else None
    g_ent = torch.randn(n, generator=g, dtype=torch.float64) if "ent" in upstream else None
    if tile is None:
        fn = lambda h, w: linear_logprobs(h, w, targets, temperature=temperature, return_entropy=True,
                                          chunk_size=chunk_size)
    else:
        fn = lambda h, w: with_tile(tile, temperature)(h, w, targets)
    ours = outputs_and_grads(fn, hidden, weight, g_logp, g_ent)
    gt = outputs_and_grads(lambda h, w: materialised(h, w, targets, temperature), hidden.double(), weight.double(),
                           g_logp, g_ent)
    same = outputs_and_grads(lambda h, w: materialised(h, w, targets, temperature, dtype), hidden, weight,
                             None if g_logp is None else g_logp.to(dtype), None if g_ent is None else g_ent.to(dtype))
    fwd_tol, bwd_tol = TOL[dtype]
    norm_wise = low_precision_gemms(dtype)
    for name, o, t, s, tol in zip(("logp", "entropy", "dhidden", "dweight"), ours, gt, same,
                                  (fwd_tol, fwd_tol, bwd_tol, bwd_tol)):
        if norm_wise:
            ours_err, eager_err = (o - t).norm(), (s - t).norm()
            assert ours_err <= eager_err, f"{name}: norm-wise error {ours_err:.3e} > eager's {eager_err:.3e}"
            continue
        excess = (o - t).abs() - ((s - t).abs() + tol)
        assert excess.max() <= 0, f"{name}: worst excess over the three-way bound {excess.max():.3e}"
    return ours, gt


@pytest.mark.parametrize("n,h,v,temperature,chunk", [
    (37, 31, 123, 1.0, 5),       # odd tokens, H not a multiple of anything, ragged V, many chunks
    (64, 48, 257, 0.7, None),    # temperature < 1, default chunking
    (33, 16, 32003, 1.5, 8),     # large ragged V, temperature > 1
])
def test_three_way_rule(dtype, n, h, v, temperature, chunk):
    hidden, weight, targets = make_case(n, h, v, dtype, peaked=True)
    three_way(hidden, weight, targets, temperature, chunk)


@pytest.mark.parametrize("upstream", [("logp",), ("ent",)])
def test_each_output_alone(upstream):
    hidden, weight, targets = make_case(29, 24, 123, torch.float32, seed=3)
    three_way(hidden, weight, targets, chunk_size=7, upstream=upstream)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
@pytest.mark.parametrize("v", [123, 32000])
def test_invariants(v, temperature, dtype):
    hidden, weight, targets = make_case(41, 32, v, dtype, seed=v)
    w = weight.detach().requires_grad_()
    logp, ent = linear_logprobs(hidden * 3, w, targets, temperature=temperature, return_entropy=True, chunk_size=16)
    assert (logp <= 0).all()
    assert (ent >= 0).all() and (ent <= math.log(v) + 1e-3).all()
    g = torch.Generator().manual_seed(2)
    (logp * torch.randn(41, generator=g) + ent * torch.randn(41, generator=g)).sum().backward()
    # Every logits-gradient row sums to zero over V, so the weight gradient's column sums vanish up to rounding,
    # which scales with the column's absolute sum: fp32's, or in bf16 one bf16 eps (dW is stored in bf16, and under
    # the native policy the GEMM reads the logits-gradient rounded to bf16: each within half an eps).
    col = w.grad.double()
    rel = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert (col.sum(0).abs() <= rel * col.abs().sum(0)).all()


def test_chunk_size_invariance():
    hidden, weight, targets = make_case(50, 32, 300, torch.float32, seed=5)
    results = [three_way(hidden, weight, targets, chunk_size=c)[0] for c in (1, 7, 16, 50)]
    for other in results[1:]:
        # Per-token outputs barely depend on chunking; dW sums over chunks in another order (fp32 rounding).
        for a, b, tol in zip(results[0], other, (1e-6, 1e-6, 1e-6, 1e-5)):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("tile", [(1, 1), (5, 7), (16, 64), (64, 1000), (37, 301)])
def test_backward_tiles_ragged_at_both_edges(tile, dtype):
    """The backward walks (tokens x vocabulary) tiles: any tile, ragged in rows and columns or one tile for the
    whole problem, meets the accuracy rule, with targets in every column tile and a temperature."""
    hidden, weight, targets = make_case(37, 24, 301, dtype, seed=21, peaked=True)
    assert len(set((targets[targets >= 0] // 7).tolist())) > 20  # the targets spread over many column tiles
    three_way(hidden, weight, targets, 0.8, tile=tile)


def test_backward_tiles_gradcheck_float64():
    hidden, weight, targets = make_case(7, 5, 11, torch.float64, ignore_frac=0.3, seed=11)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    for tile in ((2, 3), (3, 11)):
        assert torch.autograd.gradcheck(lambda h, w: with_tile(tile, 0.8)(h, w, targets), (h, w))


def test_ignored_tokens_give_zero_and_no_gradient():
    hidden, weight, targets = make_case(30, 16, 123, torch.float32, ignore_frac=0.5, seed=7)
    h = hidden.requires_grad_()
    logp, ent = linear_logprobs(h, weight, targets, return_entropy=True)
    ignored = targets == IGNORE
    assert ignored.any() and (~ignored).any()
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all() and (logp[~ignored] < 0).all()
    (logp.sum() + ent.sum()).backward()
    assert (h.grad[ignored] == 0).all() and (h.grad[~ignored] != 0).any()


def test_all_ignored():
    hidden, weight, _ = make_case(6, 8, 20, torch.float32)
    targets = torch.full((6,), IGNORE)
    w = weight.requires_grad_()
    assert (linear_logprobs(hidden, w, targets) == 0).all()
    loss = linear_cross_entropy(hidden, w, targets)
    assert loss.item() == 0.0  # never NaN
    loss.backward()
    assert (w.grad == 0).all()


def test_gradcheck_float64():
    hidden, weight, targets = make_case(7, 5, 11, torch.float64, ignore_frac=0.3, seed=11)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    fn = lambda h, w: linear_logprobs(h, w, targets, return_entropy=True, temperature=0.8, chunk_size=3)
    assert torch.autograd.gradcheck(fn, (h, w))


def test_batched_input_and_lse():
    hidden, weight, targets = make_case(24, 16, 77, torch.float64, seed=13)
    logp, ent, lse = linear_logprobs(hidden.view(4, 6, 16), weight, targets.view(4, 6), return_entropy=True,
                                     return_lse=True, temperature=1.3)
    ref_logp, ref_ent = materialised(hidden, weight, targets, 1.3)
    ref_lse = torch.logsumexp(hidden @ weight.t() / 1.3, -1) * (targets != IGNORE)
    assert logp.shape == ent.shape == lse.shape == (4, 6)
    for a, b in ((logp, ref_logp), (ent, ref_ent), (lse, ref_lse)):
        torch.testing.assert_close(a.reshape(-1), b, rtol=1e-12, atol=1e-12)


def test_tied_embeddings():
    """Input embedding and LM head share one tensor; both gradient paths must land in it."""
    torch.manual_seed(0)
    v, h, n = 50, 16, 21
    emb = torch.nn.Embedding(v, h).double()
    ids = torch.randint(0, v, (n,))
    targets = torch.randint(0, v, (n,))
    mix = torch.randn(h, h, dtype=torch.float64)

    def head_grad(fn):
        emb.zero_grad()
        hidden = torch.tanh(emb(ids) @ mix)
        fn(hidden, emb.weight).sum().backward()
        return emb.weight.grad.clone()

    ours = head_grad(lambda x, w: linear_logprobs(x, w, targets, chunk_size=4))
    ref = head_grad(lambda x, w: materialised(x, w, targets)[0])
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_matches_torch(reduction):
    hidden, weight, targets = make_case(40, 24, 131, torch.float64, seed=17)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = linear_cross_entropy(h1, w1, targets, reduction=reduction, chunk_size=9)
    ref = F.cross_entropy(h2 @ w2.t(), targets, ignore_index=IGNORE, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-10, atol=1e-12)


def _grads(loss_fn, hidden, weight):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = loss_fn(h, w)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_scalar_cross_entropy_runs_the_fused_pass_and_matches_the_logprobs_path(reduction, temperature,
                                                                               monkeypatch):
    """mean/sum go through the fused SFT pass: loss and gradients equal the log-probs path they replaced (fp32)
    and the float64 reference, ignored tokens (a custom ignore_index) included, and the backward runs no GEMM."""
    hidden, weight, targets = make_case(53, 24, 301, torch.float64, seed=23)
    targets[targets == IGNORE] = -1
    kw = dict(reduction=reduction, temperature=temperature, ignore_index=-1, chunk_size=16)
    ref = _grads(lambda h, w: F.cross_entropy(h @ w.t() / temperature, targets, ignore_index=-1,
                                              reduction=reduction), hidden, weight)
    ours64 = _grads(lambda h, w: linear_cross_entropy(h, w, targets, **kw), hidden, weight)
    for a, b in zip(ours64, ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)

    def logprobs_path(h, w):  # the former implementation of mean/sum
        nll = -linear_logprobs(h, w, targets, temperature=temperature, ignore_index=-1, chunk_size=16)
        return nll.sum() if reduction == "sum" else nll.sum() / (targets != -1).sum()

    h32, w32 = hidden.float(), weight.float()
    ours = _grads(lambda h, w: linear_cross_entropy(h, w, targets, **kw), h32, w32)
    for a, b, gt in zip(ours, _grads(logprobs_path, h32, w32), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert (a.double() - gt).abs().max() <= (b.double() - gt).abs().max() * 2 + 1e-6

    calls = []
    real = chunked.logits_into
    monkeypatch.setattr(chunked, "logits_into", lambda *a: calls.append(1) or real(*a))  # counts, then runs it
    h, w = h32.clone().requires_grad_(), w32.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, **kw)
    calls.clear()
    loss.backward()
    assert not calls  # the gradients were formed in the forward: no logits block is recomputed


def test_scalar_cross_entropy_with_bias_and_kept_sets_matches_float64():
    hidden, weight, targets = make_case(30, 16, 97, torch.float64, seed=29)
    bias = torch.randn(97, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kept = torch.stack([torch.randperm(97, generator=torch.Generator().manual_seed(t)) for t in range(30)])
    first = (kept == targets.clamp(min=0)[:, None]).int().argmax(1)
    kept[range(30), first], kept[:, 0] = kept[:, 0], targets.clamp(min=0)  # each target in its set, once
    kept = kept[:, :9]
    kept[::4, 5:] = -1  # ragged sets

    def ref_loss(h, w, b):
        z = h @ w.t() + b
        mask = torch.zeros_like(z).scatter_add_(1, kept.clamp(min=0), (kept >= 0).double()) > 0
        return F.cross_entropy(z.masked_fill(~mask, float("-inf")), targets, ignore_index=IGNORE)

    got, want = [], []
    for fn, out in ((lambda h, w, b: linear_cross_entropy(h, w, targets, bias=b, kept=kept), got), (ref_loss, want)):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        loss = fn(h, w, b)
        loss.backward()
        out.extend([loss.detach(), h.grad, w.grad, b.grad])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    t = int((targets != IGNORE).nonzero()[3])
    kept[t, 1] = kept[t, 0]
    with pytest.raises(ValueError, match=rf"kept\[{t}\] repeats an id"):
        linear_cross_entropy(hidden, weight, targets, kept=kept)


def test_num_items_in_batch():
    hidden, weight, targets = make_case(20, 8, 30, torch.float64, seed=19)
    total = linear_cross_entropy(hidden, weight, targets, reduction="sum")
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, num_items_in_batch=64), total / 64)


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_never_materialises_token_by_vocab():
    n, h, v, chunk = 256, 16, 1000, 32
    hidden, weight, targets = make_case(n, h, v, torch.float32, ignore_frac=0.0)
    hidden.requires_grad_()
    weight.requires_grad_()
    with MaxNumel() as probe:
        logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, chunk_size=chunk)
        (logp.sum() + ent.sum()).backward()
    assert probe.max_numel <= max(chunk * v, v * h), probe.max_numel  # one chunk's logits, or the weight gradient
    assert probe.max_numel < n * v


@pytest.mark.parametrize("call,match", [
    (lambda h, w, y: linear_logprobs(h, w[:, :-1], y), "weight"),
    (lambda h, w, y: linear_logprobs(h, w.double(), y), "weight dtype"),
    (lambda h, w, y: linear_logprobs(h, w, y[:-1]), "targets shape"),
    (lambda h, w, y: linear_logprobs(h, w, y.float()), "targets must be"),
    (lambda h, w, y: linear_logprobs(h.long(), w, y), "hidden"),
    (lambda h, w, y: linear_logprobs(h[0], w, y), "hidden"),
    (lambda h, w, y: linear_logprobs(h, w, torch.where(y == 3, 10, y)), r"targets\[.*outside \[0, 10\)"),
    (lambda h, w, y: linear_logprobs(h, w, torch.where(y == 3, -1, y)), "targets"),
    (lambda h, w, y: linear_logprobs(h, w, y, temperature=0.0), "temperature"),
    (lambda h, w, y: linear_logprobs(h, w, y, temperature=float("nan")), "temperature"),
    (lambda h, w, y: linear_logprobs(h, w, y, chunk_size=0), "chunk_size"),
    (lambda h, w, y: linear_logprobs(h, w, y, backend="nope"), "backend"),
    (lambda h, w, y: linear_cross_entropy(h, w, y, reduction="avg"), "reduction"),
])
def test_bad_input_raises_value_error(call, match):
    hidden = torch.randn(12, 8)
    weight = torch.randn(10, 8)
    targets = torch.arange(12) % 10
    with pytest.raises(ValueError, match=match):
        call(hidden, weight, targets)


def test_ignore_index_is_not_out_of_range():
    hidden, weight = torch.randn(5, 4), torch.randn(6, 4)
    targets = torch.tensor([0, -7, 5, -7, 1])
    logp = linear_logprobs(hidden, weight, targets, ignore_index=-7)
    assert (logp[[1, 3]] == 0).all()


@pytest.mark.parametrize("policy", ["fp32-upcast", "native"])
def test_gemm_dtype_follows_the_forced_policy(policy, monkeypatch):
    monkeypatch.setenv(chunked.GEMM_PRECISION_ENV, policy)
    for device in (CPU, torch.device("cuda")):
        assert chunked.gemm_dtype(torch.float32, device) == torch.float32
        assert chunked.gemm_dtype(torch.float64, device) == torch.float64
        assert chunked.gemm_dtype(torch.bfloat16, device) == (torch.bfloat16 if policy == "native" else torch.float32)


def test_auto_policy_is_native_on_a_gpu_and_where_this_cpu_runs_bf16(monkeypatch):
    monkeypatch.delenv(chunked.GEMM_PRECISION_ENV, raising=False)
    native = chunked.cpu_has_native(torch.bfloat16)
    assert chunked.gemm_dtype(torch.bfloat16, CPU) == (torch.bfloat16 if native else torch.float32)
    assert chunked.gemm_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16


def test_a_bad_policy_is_named(monkeypatch):
    monkeypatch.setenv(chunked.GEMM_PRECISION_ENV, "bf16")
    with pytest.raises(ValueError, match=r"TWOFOLD_GEMM_PRECISION='bf16'.*fp32-upcast, native"):
        chunked.gemm_dtype(torch.bfloat16, CPU)


def test_a_bad_policy_stops_twofold_train_before_it_starts(monkeypatch):
    from twofold.engine.run.train import main

    monkeypatch.setenv(chunked.GEMM_PRECISION_ENV, "fp16")
    with pytest.raises(SystemExit, match=r"config error: TWOFOLD_GEMM_PRECISION='fp16' is not a GEMM policy"):
        main(["--print-config"])


def test_bf16_chunks_and_tiles_meet_the_contract(dtype):
    hidden, weight, targets = make_case(45, 40, 1003, dtype, seed=9, peaked=True)
    for temperature in (1.0, 0.8):
        three_way(hidden, weight, targets, temperature, chunk_size=16)
    three_way(hidden, weight, targets, 0.8, tile=(16, 100))  # ragged vocabulary tiles


def test_native_needs_the_instructions_and_oneDNN_uncapped(monkeypatch):
    """Native bf16 needs the CPU's instructions (AVX512-BF16 / AMX) and oneDNN running them: a cap on oneDNN's ISA
    below AVX512_CORE_BF16 makes it emulate bf16 (several times slower than fp32), and the head then upcasts."""
    flags = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert chunked.cpu_has_native(torch.bfloat16) == (flags and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    for cap in ("AVX2", "avx512_core", "AVX512_CORE_VNNI", "NOT_AN_ISA"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert not chunked.cpu_has_native(torch.bfloat16), cap
    for cap in ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "ALL"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert chunked.cpu_has_native(torch.bfloat16) == (flags and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_the_oneDNN_cap_is_what_the_library_reports():
    """In a fresh process under ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN reads it at start-up) torch's oneDNN says it has no
    bf16 and the head agrees, whatever the CPU's flags say."""
    code = ("import torch; from twofold.kernels import chunked; "
            "print(torch.ops.mkldnn._is_mkldnn_bf16_supported(), chunked.cpu_has_native(torch.bfloat16))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("backward_inside", [False, True])
def test_autocast_does_not_change_the_head(backward_inside):
    """Under a bf16 autocast region the head still runs its own precision, in forward and in the backward's
    recomputed logits: the same numbers as without autocast, bit for bit."""
    hidden, weight, targets = make_case(40, 32, 301, torch.float32, seed=4)
    g = torch.randn(40, generator=torch.Generator().manual_seed(3))

    def run(autocast):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logp, ent = linear_logprobs(h, w, targets, return_entropy=True, chunk_size=16)
            loss = (logp * g).sum() + ent.sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        return logp.detach(), ent.detach(), h.grad, w.grad

    for a, b in zip(run(True), run(False)):
        assert a.dtype == torch.float32 and torch.equal(a, b)
