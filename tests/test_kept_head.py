"""Kept-set head (`linear_logprobs(..., kept=)`, `fused_linear_loss(..., kept=)`): both backends against the float64
masked softmax (the torch equivalent in twofold/kernels/kept.py), on ragged kept sets, ids shared across tokens,
|K| = 1 and K = V; gradcheck; only the kept rows of dW are touched. Triton runs under TRITON_INTERPRET=1 on CPU."""
import pytest
import torch

from twofold.kernels import linear_logprobs
from twofold.kernels.fused import fused_linear_loss

BACKENDS = ["torch", "triton"]
# The PyTorch backend's two layouts (twofold/kernels/kept.py `_plan`), each forced, in small chunks (8 tokens, and
# union logits of 64 elements) so that every test walks several chunks and sub-chunks of a union.
LAYOUTS = {"union": 10**9, "gather": 0}


def force_layout(monkeypatch, layout):
    from twofold.kernels import kept
    monkeypatch.setattr(kept, "UNION_GAIN", LAYOUTS[layout])
    monkeypatch.setattr(kept, "UNION_ROWS", 8)
    monkeypatch.setattr(kept, "UNION_ELEMENTS", 64)
    monkeypatch.setattr(kept, "GATHER_ELEMENTS", 64 * 40)


@pytest.fixture(params=["torch-union", "torch-gather", "triton"])
def backend(request, monkeypatch):
    """The backend name, with the PyTorch layout forced."""
    name, _, layout = request.param.partition("-")
    if layout:
        force_layout(monkeypatch, layout)
    return name


@pytest.fixture(params=list(LAYOUTS))
def layout(request, monkeypatch):
    force_layout(monkeypatch, request.param)
    return request.param


def kept_case(n=24, h=40, v=70, seed=0, sizes=None, ignore=(3,)):
    """Hidden, weight, targets and -1 padded kept sets of ragged sizes (1 and V included), drawn from a few shared
    ids so that tokens share rows; each target in its set."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.3
    sizes = sizes or [1, v, 2, 5, 17, 3] * (n // 6) + [4] * (n % 6)
    k_max = max(sizes)
    kept = torch.full((n, k_max), -1, dtype=torch.long)
    targets = torch.empty(n, dtype=torch.long)
    for t, k in enumerate(sizes):
        pool = torch.randperm(v, generator=g)[:k] if k > 20 else torch.randperm(min(24, v), generator=g)[:k]  # shared ids
        kept[t, torch.randperm(k_max, generator=g)[:k].sort().values if t % 2 else torch.arange(k)] = pool
        targets[t] = pool[torch.randint(k, (1,), generator=g)]
    for t in ignore:
        targets[t] = -100
    return hidden, weight, targets, kept


def reference(hidden, weight, targets, kept, temperature=1.0):
    """float64 masked softmax over the whole vocabulary: (logp, entropy), 0 at ignored tokens."""
    z = (hidden.double() @ weight.double().T) / temperature
    mask = torch.zeros_like(z).scatter_add_(1, kept.clamp(min=0), (kept >= 0).to(z.dtype)) > 0
    log_q = z.masked_fill(~mask, float("-inf")).log_softmax(-1)
    ok = targets != -100
    logp = log_q.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    entropy = -(log_q.exp() * log_q.masked_fill(~mask, 0.0)).sum(1)
    return torch.where(ok, logp, 0.0), torch.where(ok, entropy, 0.0)


def grads_of(fn, hidden, weight, seed=1):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = fn(h, w)
    g = torch.Generator().manual_seed(seed)
    (logp.double() * torch.randn(logp.shape, generator=g, dtype=torch.float64)
     + entropy.double() * torch.randn(logp.shape, generator=g, dtype=torch.float64)).sum().backward()
    return logp.detach().double(), entropy.detach().double(), h.grad.double(), w.grad.double()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_float64_on_ragged_shared_singleton_and_full_vocabulary_sets(backend, temperature):
    hidden, weight, targets, kept = kept_case()
    want = grads_of(lambda h, w: reference(h, w, targets, kept, temperature), hidden, weight)
    got = grads_of(lambda h, w: linear_logprobs(h, w, targets, kept=kept, temperature=temperature,
                                                return_entropy=True, backend=backend),
                   hidden.float(), weight.float())
    for name, a, b in zip(("logp", "entropy", "dX", "dW"), got, want):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), (name, (a - b).abs().max().item())
    single = (kept >= 0).sum(1) == 1
    assert single.sum() >= 3 and (got[0][single] == 0).all() and (got[1][single] == 0).all()  # p(target) = 1


def test_float64_gradcheck(layout):
    hidden, weight, targets, kept = kept_case(n=7, h=5, v=9, sizes=[1, 9, 3, 2, 4, 6, 5], ignore=(2,))
    def f(h, w):
        logp, entropy = linear_logprobs(h, w, targets, kept=kept, temperature=0.8, return_entropy=True,
                                        backend="torch")
        return logp, entropy
    assert torch.autograd.gradcheck(f, (hidden.clone().requires_grad_(), weight.clone().requires_grad_()))


def test_only_kept_rows_of_the_weight_get_a_gradient(backend):
    hidden, weight, targets, kept = kept_case(sizes=[2, 3, 1, 4] * 6)
    _, _, _, dw = grads_of(lambda h, w: linear_logprobs(h, w, targets, kept=kept, return_entropy=True,
                                                        backend=backend), hidden.float(), weight.float())
    ok = targets != -100
    used, moved = (torch.zeros(weight.shape[0], dtype=torch.bool) for _ in range(2))
    used[kept[ok][kept[ok] >= 0]] = True
    several = ok & ((kept >= 0).sum(1) > 1)  # a kept set of one has p = 1: its row's gradient is exactly 0
    moved[kept[several][kept[several] >= 0]] = True
    assert (dw[~used] == 0).all() and (dw[moved].abs().sum(1) > 0).all()


def test_kept_equal_to_the_vocabulary_is_the_full_head():
    hidden, weight, targets, _ = kept_case()
    every = torch.arange(weight.shape[0]).expand(len(targets), -1)
    full = linear_logprobs(hidden, weight, targets, return_entropy=True)
    kept = linear_logprobs(hidden, weight, targets, kept=every.flip(1), return_entropy=True)
    for a, b in zip(full, kept):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("entropy_coef", [None, 0.1])
def test_fused_loss_on_kept_sets_matches_autograd_of_the_reference(backend, entropy_coef):
    hidden, weight, targets, kept = kept_case(seed=3)
    g = torch.Generator().manual_seed(5)
    inputs = {"weight": torch.rand(targets.shape, generator=g, dtype=torch.float64),
              "old_logp": reference(hidden, weight, targets, kept)[0] - 0.1,
              "adv": torch.randn(targets.shape, generator=g, dtype=torch.float64), "eps_low": 0.2, "eps_high": 0.2}
    if entropy_coef is not None:
        inputs["entropy_weight"] = inputs["weight"] * entropy_coef

    def fused(h, w):
        ins = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        out = fused_linear_loss(h, w, targets, "grpo", inputs=ins, temperature=0.9, kept=kept, backend=backend)
        return out.loss, out.logp

    def eager(h, w):
        from twofold.objectives.token_local import TOKEN_LOCAL, with_entropy_bonus
        logp, entropy = reference(h, w, targets, kept, 0.9)
        fn = TOKEN_LOCAL["grpo"] if entropy_coef is None else with_entropy_bonus(TOKEN_LOCAL["grpo"])
        loss = fn(logp, **inputs)[0] if entropy_coef is None else fn(logp, entropy=entropy, **inputs)[0]
        return torch.where(targets != -100, loss, 0.0).sum(), logp

    results = []
    for fn, dtype in ((fused, torch.float32), (eager, torch.float64)):
        h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
        loss, logp = fn(h, w)
        loss.backward()
        results.append((loss.double(), logp.double(), h.grad.double(), w.grad.double()))
    for name, a, b in zip(("loss", "logp", "dX", "dW"), *results):
        assert torch.allclose(a, b, atol=3e-5, rtol=1e-4), (name, (a - b).abs().max().item())


def test_triton_matches_torch_in_bf16_within_the_accuracy_rule():
    """bf16 inputs: both backends no worse than eager bf16 masked softmax (+ tol) against float64."""
    hidden, weight, targets, kept = kept_case(seed=7)
    want = reference(hidden, weight, targets, kept)[0]
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    z = (hb @ wb.T).float()  # eager bf16: the logits rounded to bf16
    mask = torch.zeros_like(z).scatter_add_(1, kept.clamp(min=0), (kept >= 0).to(z.dtype)) > 0
    eager = torch.where(targets != -100, z.masked_fill(~mask, float("-inf")).log_softmax(-1)
                        .gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0).double()
    for backend in BACKENDS:
        got = linear_logprobs(hb, wb, targets, kept=kept, backend=backend).double()
        assert (got - want).abs().max() <= (eager - want).abs().max() + 1e-2, backend


@pytest.mark.parametrize("bad, message", [
    (lambda k, y: k.int().float(), "int64 or int32"),
    (lambda k, y: k[:, :0], "K_max >= 1"),
    (lambda k, y: k.masked_fill(k == y[:, None], -1), "does not hold the token's target"),
    (lambda k, y: torch.cat([k, k[:, :1]], 1), "repeats an id"),
    (lambda k, y: k.masked_fill(k < 0, 999), "must be in"),
])
def test_bad_kept_sets_are_named(bad, message):
    hidden, weight, targets, kept = kept_case(ignore=())
    with pytest.raises(ValueError, match=message):
        linear_logprobs(hidden, weight, targets, kept=bad(kept, targets))


def test_plan_pools_shared_ids_into_one_gemm_and_gathers_spread_ones():
    from twofold.kernels.kept import _plan
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 30, (300, 5), generator=g)  # 30 ids in all: a union of 30 < 16 x 5
    spread = torch.rand(300, 10000, generator=g).topk(5, 1).indices  # ~1200 distinct ids per 256 tokens
    assert all(union is not None for _, _, union in _plan(shared, 64))
    assert all(union is None for _, _, union in _plan(spread, 64))
    for kept in (shared, spread):  # the chunks tile the tokens
        plan = _plan(kept, 64)
        assert [s for s, _, _ in plan] == [0] + [e for _, e, _ in plan[:-1]] and plan[-1][1] == 300
