"""The LM head of the training step, run inside the FSDP2 root's forward: `train.head = fused | logprobs`.

Both take the trunk's final hidden states [N, H] and the (all-gathered) head weight [V, H] and return the
micro-batch loss, its log-probs and the objective's metrics; the head weight's gradient is reduce-scattered by
FSDP2 like any other.

- `LogprobsHead`: `kernels.linear_logprobs` -> the objective on those log-probs -> autograd. 8NHV on the head
  (2NHV forward; logits recomputed, dX and dW in backward).
- `FusedHead`, token-local objectives (`ObjectiveSpec.token_local`): one `fused_linear_loss` pass
  forms the loss and its gradient in the forward, 6NHV. The token function and its inputs are the objective's
  own: the objective is called once on a NaN probe inside `recording_token_local()`, which records what it hands
  to `apply_token_local` (aggregation weight, advantages, old/ref log-probs, ...), so no input is computed twice.
  An input that aliases the probe is the current log-prob itself (on-policy `old_logp = sg[logp]`, R = 1); the
  kernel passes its live log-prob there. A NaN probe makes any other dependence on the log-probs poison the loss
  loudly instead of silently. Metrics come from a second, elementwise call on the returned log-probs.
- `TwoPhaseHead`, every other objective: log-probs forward only (2NHV, on the
  same hidden states: the trunk runs once), the objective's dL/dlogp by autograd on those [N] values, then one
  fused pass with that gradient as the per-token weight (6NHV).

With the sampler's kept sets (`kept`, top-k / top-p replay) every head renormalises to them: the same calls with
`kept=` (`twofold.kernels.kept`), from the kept rows of the head weight alone.

With an entropy bonus (`entropy_coef`) every head computes the per-token entropy in the same pass and the
objective's dL/dH reaches the logits through it (the fused kernel's entropy mode).

A rollout correction's importance weight is an input of the objective (`is_weight`, `engine.correction`), so
every head applies it the same way, through the objective's own token function.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from twofold.kernels import linear_logprobs
from twofold.kernels.fused import fused_linear_loss
from twofold.objectives import get_spec
from twofold.objectives.layout import recording_token_local

HEADS = ("fused", "logprobs")

# call_objective(logp [N], entropy [N] | None) -> (loss, metrics): the objective bound to one micro-batch
ObjectiveCall = Callable[..., tuple[Tensor, dict]]


class HeadOutput(NamedTuple):
    loss: Tensor  # scalar, differentiable w.r.t. hidden and the head weight
    logp: Tensor  # [N] fp32, detached, 0 at ignored targets
    metrics: dict[str, Tensor]


class LogprobsHead:
    def __init__(self, call_objective: ObjectiveCall, entropy: bool = False):
        self.call_objective, self.entropy = call_objective, entropy

    def __call__(self, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                 kept: Tensor | None = None) -> HeadOutput:
        out = self.logprobs(hidden, weight, targets, temperature, self.entropy, kept)
        logp, entropy = out if self.entropy else (out, None)
        loss, metrics = self.call_objective(logp, entropy)
        return HeadOutput(loss, logp.detach().float(), metrics)

    @staticmethod
    def logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, entropy: bool = False,
                 kept: Tensor | None = None):
        return linear_logprobs(hidden, weight, targets, temperature=temperature, return_entropy=entropy,
                               check_targets=False, kept=kept)


class TwoPhaseHead(LogprobsHead):
    def __call__(self, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                 kept: Tensor | None = None) -> HeadOutput:
        with torch.no_grad():
            out = self.logprobs(hidden, weight, targets, temperature, self.entropy, kept)
        leaves = [t.float().requires_grad_() for t in (out if self.entropy else (out,))]
        with torch.enable_grad():
            value, metrics = self.call_objective(*leaves)
            grads = torch.autograd.grad(value, leaves, allow_unused=True)
        grad, *grad_entropy = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
        inputs, fn = {"weight": grad}, "linear"
        if grad_entropy:
            inputs, fn = {"weight": grad, "entropy_grad": grad_entropy[0]}, _given_gradients
        fused = fused_linear_loss(hidden, weight, targets, fn, inputs=inputs, temperature=temperature, kept=kept)
        # the pass carries the gradient; the value is the objective's
        return HeadOutput(fused.loss - fused.loss.detach() + value.detach(), leaves[0].detach(), metrics)


def _given_gradients(logp: Tensor, weight: Tensor, entropy_grad: Tensor, entropy: Tensor):
    """Phase 2 with an entropy term: dL/dlogp = weight and dL/dH = entropy_grad, both given."""
    return weight * logp, weight, entropy_grad


_given_gradients.uses_entropy = True


class FusedHead:
    def __init__(self, call_objective: ObjectiveCall, entropy: bool = False):
        self.call_objective, self.entropy = call_objective, entropy

    def __call__(self, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                 kept: Tensor | None = None) -> HeadOutput:
        fn, inputs = self.token_local_form(targets)
        out = fused_linear_loss(hidden, weight, targets, fn, inputs=inputs, temperature=temperature,
                                return_entropy=self.entropy, kept=kept)
        logp = out.logp.float()
        with torch.no_grad():
            _, metrics = self.call_objective(logp, None if out.entropy is None else out.entropy.float())
        return HeadOutput(out.loss, logp, metrics)

    def token_local_form(self, targets: Tensor) -> tuple[Callable, dict]:
        """(token function, its inputs) from the objective's own call, with live log-probs."""
        probe = torch.full(targets.shape, float("nan"), dtype=torch.float32, device=targets.device)
        with torch.no_grad(), recording_token_local() as calls:
            self.call_objective(probe, probe if self.entropy else None)
        if len(calls) != 1 or calls[0][0].shape != targets.shape:
            raise ValueError(f"train.head=fused needs an objective that makes one token-local call on the "
                             f"micro-batch's log-probs; this one made {len(calls)} (use train.head=logprobs)")
        recorded, fn, inputs = calls[0]
        live = [k for k, v in inputs.items() if isinstance(v, Tensor) and _aliases(v, recorded)]
        inputs = {k: v for k, v in inputs.items() if k not in live}
        return _LiveTokenFn(fn, tuple(live)), inputs


def _aliases(x: Tensor, y: Tensor) -> bool:
    return x.shape == y.shape and x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()


class _LiveTokenFn:
    """The objective's token function with its live inputs set to the kernel's log-probs."""

    def __init__(self, fn: Callable, live: tuple[str, ...]):
        self.fn, self.live = fn, live

    def __call__(self, logp: Tensor, **inputs):
        return self.fn(logp, **inputs, **{k: logp for k in self.live})


def make_head(head: str, objective: str, call_objective: ObjectiveCall, entropy: bool = False):
    """The head of one micro-batch; `entropy`: the objective takes the per-token entropy (its bonus)."""
    if head not in HEADS:
        raise ValueError(f"train.head must be one of {HEADS}, got {head!r}")
    if head == "logprobs":
        return LogprobsHead(call_objective, entropy)
    return (FusedHead if get_spec(objective).token_local else TwoPhaseHead)(call_objective, entropy)
