"""Fused token-local losses (twofold.kernels.fused): loss and gradients equal the materialised-logits reference.

The reference runs the same `twofold.objectives.token_local` function on float64 log-probs from full logits, through
`twofold.objectives.layout.apply_token_local` (what the objectives' own losses do), then autograd. PyTorch backend in
float64 (exact to rounding) for every token-local objective; Triton backend under TRITON_INTERPRET=1 in fp32/fp16.
With `entropy_weight` (the entropy bonus) the reference also differentiates the float64 entropy of the full logits.
"""

import pytest
import torch


from twofold.kernels import chunked, linear_logprobs
from twofold.kernels.fused import fused_linear_loss
from twofold.objectives.layout import apply_token_local
from twofold.objectives.token_local import TOKEN_LOCAL

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
OBJECTIVES = ["sft", "rft", "grpo", "dapo", "drgrpo", "gspo", "cispo", "nft", "oreal", "redi", "jepo", "linear"]


def make_case(n, h, v, seed=0, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = IGNORE
    return hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE)


def reference_logp(hidden, weight, targets, temperature):
    logsm = ((hidden @ weight.t()) / temperature).log_softmax(-1)
    return logsm.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)


def objective_inputs(name, logp, seed=1):
    """Per-token inputs for `name`, with old/ref log-probs near the current ones so clipping is partly active."""
    g = torch.Generator().manual_seed(seed)
    n = logp.numel()
    rand = lambda: torch.rand(n, generator=g, dtype=torch.float64).to(DEVICE)  # noqa: E731
    near = lambda: (logp.detach() + 0.3 * torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE))  # noqa: E731
    binary = lambda: (rand() > 0.5).double()  # noqa: E731
    signed = lambda: torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE)  # noqa: E731
    inputs = {"weight": rand()}
    extra = {
        "sft": lambda: {},
        "rft": lambda: dict(old_logp=near(), correct=binary()),
        "grpo": lambda: dict(old_logp=near(), adv=signed(), ref_logp=near(), beta=0.04),
        "dapo": lambda: dict(old_logp=near(), adv=signed()),
        "drgrpo": lambda: dict(old_logp=near(), adv=signed()),
        "gspo": lambda: dict(seq_log_ratio=0.2 * signed(), adv=signed(), eps_low=0.1, eps_high=0.15),
        "cispo": lambda: dict(old_logp=near(), adv=signed(), eps_high=0.2),
        "nft": lambda: dict(old_logp=near(), correct=binary(), r_hat=0.05 + 0.9 * rand(), prompt_weight=rand()),
        "oreal": lambda: dict(correct=binary(), adv=signed(), omega_pos=rand(), omega_neg=rand(), pos_scale=0.5,
                              neg_scale=0.3, ref_logp=near(), kl_scale=0.01),
        "redi": lambda: dict(chosen=binary(), alpha=0.8),
        "jepo": lambda: dict(coef=signed(), ref_logp=near(), kl_coef=0.05),
        "linear": lambda: dict(coef=signed()),
    }[name]
    return inputs | extra()


def reference(hidden, weight, targets, name, inputs, temperature=1.0):
    """(loss, d hidden, d weight) in float64 through full logits and apply_token_local on the valid tokens
    (with the float64 entropy of the full logits when the inputs carry the entropy bonus)."""
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    valid = targets != IGNORE
    logp = reference_logp(h, w, targets, temperature)[valid]
    local = {k: v[valid] if isinstance(v, torch.Tensor) and v.shape == targets.shape else v for k, v in inputs.items()}
    if "entropy_weight" in local:
        logsm = ((h @ w.t()) / temperature).log_softmax(-1)[valid]
        local["entropy"] = -(logsm.exp() * logsm).sum(-1)
    loss, _ = apply_token_local(logp, TOKEN_LOCAL[name], **local)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def fused(hidden, weight, targets, name, inputs, dtype=torch.float64, **kw):
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    out = fused_linear_loss(h, w, targets, name, inputs=inputs, ignore_index=IGNORE, **kw)
    out.loss.backward()
    return out.loss.detach(), h.grad, w.grad


def assert_matches(ours, ref, rtol, atol):
    for name, a, b in zip(("loss", "dhidden", "dweight"), ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def case_with_inputs(name, n=37, h=24, v=123, temperature=1.0, seed=0):
    hidden, weight, targets = make_case(n, h, v, seed)
    logp = reference_logp(hidden, weight, targets, temperature)
    return hidden, weight, targets, objective_inputs(name, logp, seed + 1)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_torch_backend_every_objective_float64(name):
    hidden, weight, targets, inputs = case_with_inputs(name, temperature=0.8)
    ours = fused(hidden, weight, targets, name, inputs, temperature=0.8, backend="torch", chunk_size=8)
    assert_matches(ours, reference(hidden, weight, targets, name, inputs, 0.8), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,temperature,chunk", [("nft", 1.0, 16), ("grpo", 0.7, None), ("oreal", 1.3, 7)])
def test_triton_backend_fp32(name, temperature, chunk):
    hidden, weight, targets, inputs = case_with_inputs(name, n=41, h=40, v=129, temperature=temperature, seed=2)
    ours = fused(hidden, weight, targets, name, inputs, torch.float32, temperature=temperature, backend="triton",
                 chunk_size=chunk)
    assert_matches(ours, reference(hidden, weight, targets, name, inputs, temperature), rtol=1e-4, atol=2e-5)


def with_entropy_bonus_inputs(inputs, n, seed=11):
    g = torch.Generator().manual_seed(seed)
    return inputs | {"entropy_weight": 0.5 * torch.rand(n, generator=g, dtype=torch.float64).to(DEVICE)}


@pytest.mark.parametrize("name", OBJECTIVES)
def test_torch_backend_entropy_bonus_every_objective_float64(name):
    """The entropy gradient (-p (log p + H) dL/dH per token) against autograd through the float64 entropy."""
    hidden, weight, targets, inputs = case_with_inputs(name, temperature=0.8, seed=12)
    inputs = with_entropy_bonus_inputs(inputs, targets.numel())
    ours = fused(hidden, weight, targets, name, inputs, temperature=0.8, backend="torch", chunk_size=8)
    assert_matches(ours, reference(hidden, weight, targets, name, inputs, 0.8), rtol=1e-10, atol=1e-12)
    plain = fused(hidden, weight, targets, name, {k: v for k, v in inputs.items() if k != "entropy_weight"},
                  temperature=0.8, backend="torch", chunk_size=8)
    assert (ours[1] - plain[1]).abs().max() > 1e-4  # the bonus moves the gradient


@pytest.mark.parametrize("name,temperature,chunk", [("grpo", 1.0, 16), ("cispo", 0.7, None), ("gspo", 1.3, 7)])
def test_triton_backend_entropy_bonus_fp32(name, temperature, chunk):
    hidden, weight, targets, inputs = case_with_inputs(name, n=41, h=40, v=129, temperature=temperature, seed=13)
    inputs = with_entropy_bonus_inputs(inputs, targets.numel())
    ours = fused(hidden, weight, targets, name, inputs, torch.float32, temperature=temperature, backend="triton",
                 chunk_size=chunk)
    assert_matches(ours, reference(hidden, weight, targets, name, inputs, temperature), rtol=1e-4, atol=2e-5)


def test_entropy_bonus_equals_linear_logprobs_entropy_through_autograd():
    """Fused entropy bonus == the unfused path: linear_logprobs(return_entropy) + the loss's entropy term."""
    hidden, weight, targets, inputs = case_with_inputs("dapo", seed=14)
    inputs = with_entropy_bonus_inputs(inputs, targets.numel())
    ours = fused(hidden, weight, targets, "dapo", inputs, backend="torch")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = linear_logprobs(h, w, targets, return_entropy=True, backend="torch")
    valid = targets != IGNORE
    local = {k: v[valid] if isinstance(v, torch.Tensor) and v.shape == targets.shape else v for k, v in inputs.items()}
    loss, _ = apply_token_local(logp[valid], TOKEN_LOCAL["dapo"], entropy=ent[valid], **local)
    loss.backward()
    assert_matches(ours, (loss.detach(), h.grad, w.grad), rtol=1e-10, atol=1e-12)


def test_triton_backend_fp16_within_half_precision():
    hidden, weight, targets, inputs = case_with_inputs("nft", n=33, h=32, v=123, seed=3)
    ours = fused(hidden, weight, targets, "nft", inputs, torch.float16, backend="triton", chunk_size=16)
    ref = reference(hidden.half().double(), weight.half().double(), targets, "nft", inputs)
    assert_matches(ours, ref, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_logprobs_then_autograd_and_entropy(backend):
    """The fused path equals linear_logprobs + the objective through autograd (the unfused path), entropy too."""
    hidden, weight, targets, inputs = case_with_inputs("grpo", seed=4)
    h32, w32 = hidden.float(), weight.float()
    h, w = h32.clone().requires_grad_(), w32.clone().requires_grad_()
    out = fused_linear_loss(h, w, targets, "grpo", inputs=inputs, return_entropy=True, backend=backend,
                            chunk_size=16)
    out.loss.backward()
    h2, w2 = h32.clone().requires_grad_(), w32.clone().requires_grad_()
    logp, ent = linear_logprobs(h2, w2, targets, return_entropy=True, backend="torch")
    valid = targets != IGNORE
    local = {k: v[valid] if isinstance(v, torch.Tensor) and v.shape == targets.shape else v for k, v in inputs.items()}
    loss, _ = apply_token_local(logp[valid].double(), TOKEN_LOCAL["grpo"], **local)
    loss.backward()
    torch.testing.assert_close(out.logp, logp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, ent.detach(), rtol=1e-5, atol=1e-5)
    assert_matches((out.loss, h.grad, w.grad), (loss.detach(), h2.grad.double(), w2.grad.double()), 1e-4, 1e-5)


def test_batched_shape_chunk_invariance_and_dw_invariant():
    hidden, weight, targets, inputs = case_with_inputs("nft", n=2 * 19, seed=5)
    shaped = {k: v.view(2, 19) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    whole = fused(hidden.view(2, 19, -1), weight, targets.view(2, 19), "nft", shaped, backend="torch")
    chunked = fused(hidden, weight, targets, "nft", inputs, backend="torch", chunk_size=5)
    assert_matches(chunked, (whole[0], whole[1].view(38, -1), whole[2]), rtol=1e-12, atol=1e-13)
    # Every logits-gradient row sums to zero over V, so dW's column sums vanish.
    assert whole[2].sum(0).abs().max() <= 1e-12 * whole[2].abs().sum(0).max()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tied_weights_and_upstream_scale(backend):
    g = torch.Generator().manual_seed(6)
    emb = (torch.randn(123, 32, generator=g) / 32**0.5).to(DEVICE)
    ids = torch.randint(0, 123, (37,), generator=g).to(DEVICE)
    targets = ids.roll(-1)
    targets[::6] = IGNORE
    inputs = {"weight": torch.rand(37, generator=g).to(DEVICE)}

    def grad_of(fused_path):
        w = emb.clone().requires_grad_()
        hidden = torch.tanh(w[ids])
        if fused_path:
            loss = fused_linear_loss(hidden, w, targets, "sft", inputs=inputs, backend=backend).loss
        else:
            logp = linear_logprobs(hidden, w, targets, backend="torch")
            loss = -(inputs["weight"] * logp).sum()
        (0.5 * loss).backward()
        return w.grad

    torch.testing.assert_close(grad_of(True), grad_of(False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("upstream", [1.0, 0.37])
def test_backward_scales_the_saved_gradients_in_place(backend, upstream):
    """Bitwise what the out-of-place product gave, and the leaves' gradients are the saved buffers themselves: the
    backward allocates no second [N, H] / [V, H] copy (at V 151936 that copy was half the fused pass's peak)."""
    hidden, weight, targets, inputs = case_with_inputs("nft", seed=12)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    loss = fused_linear_loss(h, w, targets, "nft", inputs=inputs, backend=backend).loss
    saved = loss.grad_fn.saved_tensors
    scale = torch.tensor(upstream)
    before = [t * scale for t in saved]  # the former out-of-place backward
    ptrs = [t.data_ptr() for t in saved]
    del saved
    (loss * upstream).backward()
    assert torch.equal(h.grad, before[0].view(h.shape)) and torch.equal(w.grad, before[1])
    assert [h.grad.data_ptr(), w.grad.data_ptr()] == ptrs


def test_retained_graph_and_create_graph_scale_out_of_place():
    """A retained graph runs again with the same saved gradients; under create_graph the product is differentiable
    w.r.t. the upstream. Both give bitwise the in-place result of a one-off backward."""
    hidden, weight, targets, inputs = case_with_inputs("sft", seed=13)

    def loss_of(h):
        return fused_linear_loss(h, weight.float(), targets, "sft", inputs=inputs).loss

    h = hidden.float().requires_grad_()
    (once,) = torch.autograd.grad(loss_of(h) * 0.5, h)
    loss = loss_of(h) * 0.5
    first = torch.autograd.grad(loss, h, retain_graph=True)[0]
    assert torch.equal(first, once) and torch.equal(torch.autograd.grad(loss, h)[0], once)
    scale = torch.tensor(0.5, requires_grad=True)
    (dh,) = torch.autograd.grad(loss_of(h) * scale, h, create_graph=True)
    assert torch.equal(dh, once)
    (d_scale,) = torch.autograd.grad(dh.sum(), scale)
    torch.testing.assert_close(d_scale, (dh / scale).sum())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_ignored_gives_zero(backend):
    hidden, weight, targets = make_case(9, 16, 123, seed=7, ignore_frac=1.0)
    loss, dh, dw = fused(hidden, weight, targets, "sft", {"weight": torch.ones(9, device=DEVICE)}, torch.float32,
                         backend=backend)
    assert loss == 0 and not dh.any() and not dw.any()


def test_bad_arguments():
    hidden, weight, targets = make_case(5, 8, 11)
    with pytest.raises(ValueError, match="objective"):
        fused_linear_loss(hidden, weight, targets, "no-such", inputs={})
    with pytest.raises(ValueError, match="backend"):
        fused_linear_loss(hidden, weight, targets, "sft", inputs={"weight": 1.0}, backend="cuda")
    with pytest.raises(ValueError, match="shaped"):
        fused_linear_loss(hidden, weight, targets[:3], "sft", inputs={"weight": 1.0})


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_head_or_frozen_hidden(backend):
    hidden, weight, targets, inputs = case_with_inputs("sft", seed=8)
    ref = reference(hidden, weight, targets, "sft", inputs)
    h, w = hidden.float().requires_grad_(), weight.float()
    fused_linear_loss(h, w, targets, "sft", inputs=inputs, backend=backend).loss.backward()
    torch.testing.assert_close(h.grad.double(), ref[1], rtol=1e-4, atol=1e-6)
    h, w = hidden.float(), weight.float().requires_grad_()
    fused_linear_loss(h, w, targets, "sft", inputs=inputs, backend=backend).loss.backward()
    torch.testing.assert_close(w.grad.double(), ref[2], rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_fused_close_to_float64_reference():
    hidden, weight, targets, inputs = case_with_inputs("dapo", n=2048, h=1024, v=32003, seed=9)
    ours = fused(hidden, weight, targets, "dapo", inputs, torch.bfloat16, backend="triton")
    ref = reference(hidden.bfloat16().double(), weight.bfloat16().double(), targets, "dapo", inputs)
    for a, b in zip(ours, ref):
        rel = (a.double() - b).norm() / b.norm()
        assert rel < 2e-2, f"relative error {rel:.3e}"


@pytest.mark.parametrize("policy", ["fp32-upcast", "native"])
def test_torch_backend_bf16_on_both_gemm_policies(policy, monkeypatch):
    """bf16 inputs on CPU under each GEMM policy (forced, whatever this CPU picks): fp32 GEMMs, or bf16 GEMMs with
    fp32 accumulation; both are within bf16 rounding of float64 math on the same rounded inputs."""
    monkeypatch.setenv(chunked.GEMM_PRECISION_ENV, policy)
    hidden, weight, targets, inputs = case_with_inputs("nft", n=33, h=32, v=123, seed=3)
    ours = fused(hidden, weight, targets, "nft", inputs, torch.bfloat16, backend="torch", chunk_size=16)
    ref = reference(hidden.bfloat16().double(), weight.bfloat16().double(), targets, "nft", inputs)
    assert_matches(ours, ref, rtol=3e-2, atol=3e-3)


def test_autocast_does_not_change_the_fused_pass():
    hidden, weight, targets, inputs = case_with_inputs("grpo", seed=6)
    plain = fused(hidden, weight, targets, "grpo", inputs, torch.float32, backend="torch", chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = fused(hidden, weight, targets, "grpo", inputs, torch.float32, backend="torch", chunk_size=16)
    for a, b in zip(under, plain):
        assert torch.equal(a, b)
