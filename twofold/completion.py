"""Per-token log-probs of the completion tokens of a padded batch, from any Hugging Face causal LM, with no logits.

    logp = twofold.completion_logprobs(model, input_ids, attention_mask, completion_mask)            # [B, Tc]
    logp, entropy = twofold.completion_logprobs(model, input_ids, attention_mask, completion_mask,
                                                return_entropy=True, temperature=0.7)

`input_ids`/`attention_mask` are the whole sequences [B, T] (prompt then completion, any padding). `completion_mask`
marks the tokens to score: either [B, T] (aligned with input_ids) or [B, Tc] for the last Tc positions (TRL's
`completion_mask` with `input_ids = cat(prompt_ids, completion_ids)`, verl's `response_mask` with
`cat(prompts, responses)`). The result is shaped like `completion_mask`: entry t is log p(token t | tokens < t), 0
where the mask is false. The model runs its decoder (`get_decoder()`); the head (`get_output_embeddings()`, bias
included) goes through `twofold.linear_logprobs`, so no [B, T, V] tensor exists. The decoder runs under the
caller's autocast, if any; the head never does (see `twofold.kernels.chunked.no_autocast`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from twofold.kernels import linear_logprobs


class CompletionHidden(NamedTuple):
    hidden: Tensor  # [B, Tc, H]: the hidden state that predicts each completion position
    targets: Tensor  # [B, Tc] token ids, ignore_index where completion_mask is false
    weight: Tensor  # [V, H] LM-head weight
    bias: Tensor | None  # [V] LM-head bias
    logit_scale: float  # the model multiplies its logits by this (1.0 for most); fold it into the temperature


def lm_head(model) -> tuple[Tensor, Tensor | None, float]:
    """(weight, bias, logit_scale) of a causal LM's output layer; raises for heads the kernels cannot reproduce."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise ValueError(f"{type(model).__name__}.get_output_embeddings() has no weight; not a causal LM head")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "final_logit_softcapping", None):
        raise ValueError(f"{type(model).__name__} soft-caps its logits (final_logit_softcapping); the fused head "
                         "computes plain softmax(h W^T + b) and would not match the model")
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere multiplies its logits
        scale = float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite divides them
        scale = 1.0 / float(config.logits_scaling)
    return head.weight, getattr(head, "bias", None), scale


def completion_hidden(model, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, *,
                      ignore_index: int = -100, **model_kwargs) -> CompletionHidden:
    """Run the decoder once and return the hidden states, targets and head that score the completion tokens."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, T], got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    b, t = input_ids.shape
    if completion_mask.dim() != 2 or completion_mask.shape[0] != b or not 0 < completion_mask.shape[1] <= t:
        raise ValueError(f"completion_mask must be [B, T] or [B, Tc] with Tc <= T={t} (B={b}), got "
                         f"{tuple(completion_mask.shape)}")
    mask = completion_mask.bool()
    tc = mask.shape[1]
    if tc == t and bool(mask[:, 0].any()):
        row = int(mask[:, 0].nonzero()[0, 0])
        raise ValueError(f"completion_mask[{row}, 0] is set: the first token of a sequence has no prediction")
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    # Position p predicts token p + 1, so completion tokens t-tc..t-1 are predicted by positions t-tc-1..t-2. With
    # tc == t the first column has no predictor; it is masked (checked above) and gets a zero hidden state.
    start = t - tc
    h = hidden[:, max(start - 1, 0):t - 1]
    if start == 0:
        h = torch.cat([h.new_zeros(b, 1, h.shape[-1]), h], 1)
    targets = input_ids[:, start:].masked_fill(~mask, ignore_index)
    weight, bias, scale = lm_head(model)
    return CompletionHidden(h.to(weight.dtype), targets, weight, bias, scale)


def completion_logprobs(model, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, *,
                        temperature: float = 1.0, return_entropy: bool = False, chunk_size: int | None = None,
                        backend: str = "auto", **model_kwargs):
    """Log-probs (and the entropy, with `return_entropy`) of the completion tokens, shaped like completion_mask.

    fp32, differentiable w.r.t. the model's parameters, 0 where completion_mask is false. `temperature` divides
    the logits (use the sampling temperature for PPO ratios against the sampler's log-probs). `model_kwargs` go to
    the decoder (e.g. position_ids).
    """
    c = completion_hidden(model, input_ids, attention_mask, completion_mask, **model_kwargs)
    return linear_logprobs(c.hidden, c.weight, c.targets, bias=c.bias, temperature=temperature / c.logit_scale,
                           return_entropy=return_entropy, chunk_size=chunk_size, backend=backend)

