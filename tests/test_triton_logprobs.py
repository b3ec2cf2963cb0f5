"""Triton backend of linear_logprobs: the accuracy suite of the PyTorch path, run under TRITON_INTERPRET=1 on CPU.

Primary assertion (docs/kernels.md, the accuracy rule): element-wise
|ours - gt| <= |torch_same_dtype - gt| + tol (+ one rounding of the stored result, eps(dtype)*|gt|), where gt is
float64 math on the same rounded inputs. bf16 is GPU-only (the interpreter has no bf16 dot); fp16 covers half
precision here.
"""
import math
import os

import pytest
import torch


from twofold.kernels import linear_cross_entropy, linear_logprobs
from twofold.kernels.triton_logprobs import DEFAULT_TILES, triton_linear_logprobs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
TOL = {torch.float32: (1e-5, 5e-4), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}
SMALL_TILES = (16, 32, 16, 16, 32, 16)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_case(n, h, v, dtype, seed=0, ignore_frac=0.2, peaked=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    if peaked:  # CCE's trick: tokens aligned with a vocab row get a sharp softmax.
        k = min(n, v) // 2
        weight[:k] = hidden[:k] / h**0.25
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = IGNORE
    return hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), targets.to(DEVICE)


def materialised(hidden, weight, targets, temperature, dtype):
    """Reference: full logits in `dtype` -> (logp, entropy), 0 at ignored positions."""
    logits = (hidden.to(dtype) @ weight.to(dtype).t()) / temperature
    logsm = logits.to(torch.promote_types(dtype, torch.float32)).log_softmax(-1)
    valid = targets != IGNORE
    logp = logsm.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1) * valid
    return logp, -(logsm.exp() * logsm).sum(-1) * valid


def triton_fn(targets, temperature=1.0, **kw):
    return lambda h, w: triton_linear_logprobs(h, w, targets, ignore_index=IGNORE, temperature=temperature,
                                               want_entropy=True, chunk_size=kw.pop("chunk_size", None), **kw)[:2]


def outputs_and_grads(fn, hidden, weight, g_logp, g_ent):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logp, ent = fn(h, w)
    loss = sum((out.to(g.dtype) * g).sum() for out, g in ((logp, g_logp), (ent, g_ent)) if g is not None)
    dh, dw = torch.autograd.grad(loss, (h, w))
    return [x.detach().double() for x in (logp, ent, dh, dw)]


def upstream(n, which, seed=1):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2)]
    return [gr if name in which else None for gr, name in zip(grads, ("logp", "ent"))]


def assert_three_way(hidden, weight, targets, temperature=1.0, which=("logp", "ent"), **kw):
    dtype = hidden.dtype
    g_logp, g_ent = upstream(targets.numel(), which)
    ours = outputs_and_grads(triton_fn(targets, temperature, **kw), hidden, weight, g_logp, g_ent)
    gt = outputs_and_grads(lambda h, w: materialised(h, w, targets, temperature, torch.float64), hidden.double(),
                           weight.double(), g_logp, g_ent)
    cast = [None if g is None else g.to(dtype) for g in (g_logp, g_ent)]
    same = outputs_and_grads(lambda h, w: materialised(h, w, targets, temperature, dtype), hidden, weight, *cast)
    fwd_tol, bwd_tol = TOL[dtype]
    for name, o, t, s, tol in zip(("logp", "entropy", "dhidden", "dweight"), ours, gt, same,
                                  (fwd_tol, fwd_tol, bwd_tol, bwd_tol)):
        # + one unit of rounding of the stored result: gradients come back in the input dtype.
        excess = (o - t).abs() - ((s - t).abs() + tol + torch.finfo(dtype).eps * t.abs())
        assert excess.max() <= 0, f"{name}: worst excess over the three-way bound {excess.max():.3e}"
    return ours


@pytest.mark.parametrize("n,h,v,temperature,chunk,peaked", [
    (37, 40, 123, 1.0, 50, False),   # odd N, H not a multiple of the tile, ragged V, several backward slices
    (16, 31, 257, 0.7, None, True),  # peaked softmax, temperature < 1, one slice
    (33, 48, 129, 1.5, 64, False),   # temperature > 1, V one past a power of two
])
def test_three_way_fp32(n, h, v, temperature, chunk, peaked):
    assert_three_way(*make_case(n, h, v, torch.float32, peaked=peaked), temperature, chunk_size=chunk)


def test_three_way_fp16_peaked():
    assert_three_way(*make_case(29, 40, 123, torch.float16, seed=3, peaked=True), 0.7, chunk_size=64)


@pytest.mark.parametrize("which", [("logp",), ("ent",)])
def test_single_upstream_gradient(which):
    assert_three_way(*make_case(21, 24, 123, torch.float32, seed=4), 1.0, which=which, chunk_size=80)


def test_invariants():
    hidden, weight, targets = make_case(40, 32, 257, torch.float32, seed=5, peaked=True)
    (logp, ent, _, dw) = outputs_and_grads(triton_fn(targets, 0.7), hidden, weight, *upstream(40, ("logp", "ent")))
    assert (logp <= 0).all() and (ent >= 0).all() and (ent <= math.log(257) + 1e-3).all()
    # Every logits-gradient row sums to 0 over the vocabulary, so dW's column sums vanish.
    assert dw.sum(0).abs().max() <= 1e-5 * dw.abs().sum(0).max()


def test_tile_and_slice_invariance():
    hidden, weight, targets = make_case(37, 40, 123, torch.float32, seed=6)
    g = upstream(37, ("logp", "ent"))
    ref = outputs_and_grads(triton_fn(targets, 1.3, tiles=DEFAULT_TILES), hidden, weight, *g)
    for tiles, chunk in ((SMALL_TILES, None), (SMALL_TILES, 32), (DEFAULT_TILES, 96)):
        other = outputs_and_grads(triton_fn(targets, 1.3, tiles=tiles, chunk_size=chunk), hidden, weight, *g)
        for a, b in zip(ref, other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bitwise_reproducible():
    hidden, weight, targets = make_case(37, 40, 123, torch.float32, seed=7)
    g = upstream(37, ("logp", "ent"))
    first, second = (outputs_and_grads(triton_fn(targets, chunk_size=48), hidden, weight, *g) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("ignore_frac", [0.0, 1.0])
def test_no_and_all_ignored(ignore_frac):
    hidden, weight, targets = make_case(19, 24, 123, torch.float32, seed=8, ignore_frac=ignore_frac)
    g = upstream(19, ("logp", "ent"))
    logp, ent, dh, dw = outputs_and_grads(triton_fn(targets), hidden, weight, *g)
    if ignore_frac == 1.0:
        assert not logp.any() and not ent.any() and not dh.any() and not dw.any()
    else:
        assert (logp < 0).all()


def test_ignored_rows_get_zero_gradient():
    hidden, weight, targets = make_case(37, 24, 123, torch.float32, seed=9, ignore_frac=0.5)
    logp, ent, dh, _ = outputs_and_grads(triton_fn(targets), hidden, weight, *upstream(37, ("logp", "ent")))
    ignored = (targets == IGNORE).cpu()
    assert ignored.any() and not dh[ignored].any() and not logp[ignored].any() and not ent[ignored].any()


def test_tied_weights_match_torch_backend():
    g = torch.Generator().manual_seed(10)
    emb = (torch.randn(123, 32, generator=g) / 32**0.5).to(DEVICE)
    ids = torch.randint(0, 123, (2, 17), generator=g).to(DEVICE)
    targets = ids.roll(-1, 1)
    targets[:, -1] = IGNORE

    def grad_of(backend):
        w = emb.clone().requires_grad_()
        logp, ent = linear_logprobs(torch.tanh(w[ids]), w, targets, return_entropy=True, backend=backend)
        (logp.sum() - 0.1 * ent.sum()).backward()
        return w.grad

    torch.testing.assert_close(grad_of("triton"), grad_of("torch"), rtol=1e-5, atol=1e-6)


def test_api_dispatch_and_cross_entropy():
    hidden, weight, targets = make_case(2 * 13, 24, 123, torch.float32, seed=11)
    h3, t2 = hidden.view(2, 13, 24), targets.view(2, 13)
    for reduction in ("mean", "none"):
        ours = linear_cross_entropy(h3, weight, t2, reduction=reduction, backend="triton", temperature=0.9)
        ref = linear_cross_entropy(h3, weight, t2, reduction=reduction, backend="torch", temperature=0.9)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_no_grad_forward_and_float64_fallback():
    hidden, weight, targets = make_case(21, 24, 123, torch.float32, seed=12)
    with torch.no_grad():
        logp = linear_logprobs(hidden.requires_grad_(), weight, targets, backend="triton")
    assert not logp.requires_grad and logp.dtype == torch.float32
    ref = linear_logprobs(hidden.double(), weight.double(), targets, backend="torch")
    torch.testing.assert_close(linear_logprobs(hidden.double(), weight.double(), targets, backend="triton"), ref)


@pytest.mark.skipif(os.environ.get("TORCH_COMPILE_DISABLE") == "1",
                    reason="torch.compile is disabled (TORCH_COMPILE_DISABLE=1; conftest sets it under "
                           "ATEN_CPU_CAPABILITY=default, where inductor cannot build vLLM's compiled op)")
def test_custom_op_under_torch_compile():
    hidden, weight, targets = make_case(21, 24, 123, torch.float32, seed=13)
    fn = lambda h, w: linear_logprobs(h, w, targets, return_entropy=True, backend="triton",  # noqa: E731
                                      check_targets=False)
    g = upstream(21, ("logp", "ent"))
    eager = outputs_and_grads(fn, hidden, weight, *g)
    compiled = outputs_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), hidden, weight, *g)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_custom_op_opcheck():
    from twofold.kernels.triton_logprobs import _fwd_op
    hidden, weight, targets = make_case(13, 24, 123, torch.float32, seed=14)
    args = (hidden.requires_grad_(), weight.requires_grad_(), targets, IGNORE, 1.0, True, 0, [])
    torch.library.opcheck(_fwd_op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---- GPU only: real shapes, bf16, int64 offsets, speed sanity ----

@gpu
@needs_cuda
def test_gpu_bf16_three_way_large_ragged():
    assert_three_way(*make_case(1025, 2880, 32003, torch.bfloat16, peaked=True), 0.7)


@gpu
@needs_cuda
def test_gpu_int64_offsets():
    # N*V > 2^31 and a logits workspace wider than 2^31 elements would overflow int32 indexing.
    n, h, v = 17000, 128, 131072
    hidden, weight, targets = make_case(n, h, v, torch.bfloat16, ignore_frac=0.1)
    logp, ent = triton_fn(targets)(hidden, weight)
    rows = torch.arange(0, n, 997, device=DEVICE)
    ref_logp, ref_ent = materialised(hidden[rows], weight, targets[rows], 1.0, torch.float32)
    torch.testing.assert_close(logp[rows], ref_logp, rtol=0, atol=2e-2)
    torch.testing.assert_close(ent[rows], ref_ent, rtol=0, atol=2e-2)


@gpu
@needs_cuda
def test_gpu_bitwise_reproducible_and_faster_than_eager():
    hidden, weight, targets = make_case(4096, 4096, 128256, torch.bfloat16, ignore_frac=0.0)
    g = upstream(4096, ("logp", "ent"))
    first, second = (outputs_and_grads(triton_fn(targets), hidden, weight, *g) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))

    def fwd_ms(fn):
        fn(hidden, weight)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn(hidden, weight)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 5

    with torch.no_grad():
        ours = fwd_ms(triton_fn(targets))
        eager = fwd_ms(lambda h, w: materialised(h, w, targets, 1.0, torch.bfloat16))
    assert ours < eager, f"no-grad forward {ours:.2f} ms is not faster than eager {eager:.2f} ms"


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_vocab_splits_including_empty_ones(splits):
    # 4 vocab tiles of 32 over 7 splits leaves splits 4-6 empty (max -inf, sum 0): the merge must ignore them.
    from twofold.kernels.triton_logprobs import compact, vocab_stats
    hidden, weight, targets = make_case(21, 24, 123, torch.float32, seed=15)
    order, nvalid = compact(targets, IGNORE)
    logp, ent, lse = vocab_stats(hidden, weight, targets, order, nvalid, 0, 21, 0.8, True, tiles=SMALL_TILES,
                                 splits=splits)
    n = int(nvalid)
    ref_logp, ref_ent = materialised(hidden[order[:n]], weight, targets[order[:n]], 0.8, torch.float64)
    torch.testing.assert_close(logp[:n].double(), ref_logp, rtol=0, atol=2e-6)
    torch.testing.assert_close(ent[:n].double(), ref_ent, rtol=0, atol=2e-6)


@gpu
@needs_cuda
def test_gpu_cost_scales_with_valid_tokens():
    def full_ms(ignore_frac):
        hidden, weight, targets = make_case(8192, 2048, 65536, torch.bfloat16, ignore_frac=ignore_frac)
        g = upstream(8192, ("logp", "ent"))
        outputs_and_grads(triton_fn(targets), hidden, weight, *g)  # warm-up and autotune
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        outputs_and_grads(triton_fn(targets), hidden, weight, *g)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    dense, half = full_ms(0.0), full_ms(0.5)
    assert half < 0.7 * dense, f"50% ignored took {half:.1f} ms vs {dense:.1f} ms dense"
