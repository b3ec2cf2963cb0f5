"""twofold: fused LM-head kernels, negative-aware RL objectives and a training engine, in one namespace.

    import twofold
    logp = twofold.linear_logprobs(hidden, lm_head.weight, targets)        # [N] fp32, never [N, V] logits
    loss, metrics = twofold.nft_loss(logp, old_logp, rewards, group_ids, mask)

Other trainers: `twofold.completion_logprobs` (completion log-probs of any HF causal LM), `twofold.nn` (drop-in
fused policy-loss modules), `twofold.integrations.trl` and `twofold.integrations.verl`, and `twofold.verifier`
(torch-free math rewards for TRL's reward_funcs and verl's compute_score).
Subpackages: `twofold.kernels` (log-probs, entropy and fused losses from hidden states and the head weight),
`twofold.objectives` (every loss as a function of per-token log-probs), `twofold.engine` (the training system;
imported on demand, it loads transformers and, online, vLLM).
"""
import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it, imported on first use: a process that only needs a subpackage (a
# verifier worker imports sympy, not torch) does not pay for the others.
_EXPORTS = {
    "nn": "twofold.nn",  # the subpackage itself
    "completion_hidden": "twofold.completion", "completion_logprobs": "twofold.completion",
    "verify_batch": "twofold.engine.verifier",
    "linear_cross_entropy": "twofold.kernels", "linear_logprobs": "twofold.kernels",
    "fused_linear_loss": "twofold.kernels.fused",
    **{name: "twofold.objectives" for name in (
        "OBJECTIVES", "TOKEN_LOCAL", "dapo_loss", "dpo_loss", "drgrpo_loss", "group_advantages", "grpo_loss",
        "jepo_loss", "nft_loss", "oreal_loss", "r_hat", "redi_loss", "rft_loss", "sft_loss", "simpo_loss")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'twofold' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if _EXPORTS[name] == f"twofold.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
