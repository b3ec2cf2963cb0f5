"""The run configuration's schema: one dataclass per section, one docstring per field (`twofold-train --help`
prints them). Parsing, validation and the help text live in `config`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from twofold.engine.data.loading import PLACEHOLDER
from twofold.engine.rollout.sampler import SamplerConfig
from twofold.objectives import DEFAULT_OBJECTIVE, SPECS


def objective_choices() -> str:
    """The registered objectives with their modes (--help reads it when it runs, so a registered spec shows)."""
    return ", ".join(f"{n} ({'/'.join(s.modes)})" for n, s in SPECS.items())


@dataclass(kw_only=True)
class ModelConfig:
    path: str = ""
    """Hugging Face causal LM (Qwen2/2.5/3, Llama): a local checkpoint directory or a Hub id (`Qwen/Qwen2.5-0.5B`),
    resolved through the local HF cache (downloaded when missing and online). Exactly one of path / preset."""
    preset: str = ""
    """Named random-init model from twofold.engine.train.tiny.PRESETS (tests, CPU demo, benchmarks)."""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Compute dtype of parameters in forward/backward. Master weights, optimizer state and the gradient
    reduction stay fp32 either way (FSDP2 MixedPrecisionPolicy)."""
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "flex_attention", "eager"] = "auto"
    """auto: flash_attention_2 (varlen) on CUDA when flash-attn is installed, else sdpa. sdpa attends per sequence of
    a packed row (similar-length sequences batched, no [N, N] mask), except in models with sliding-window layers."""
    activation_checkpointing: bool = True
    """Recompute each decoder layer in backward."""
    tokenizer: str = ""
    """Tokenizer directory or Hub id; defaults to model.path, or the built-in char tokenizer for presets."""


@dataclass(kw_only=True)
class DataConfig:
    path: str | list[str] = ""
    """The rows: a JSONL or Parquet file, a list of such files, a directory written by `datasets`' save_to_disk,
    or a Hub dataset name (loaded with `datasets`, from its cache when offline). Layouts read as they are:
    prompt/response (or TRL prompt/completion), TRL messages, preference pairs (prompt/chosen/rejected) and, for
    online prompts, verl rows (chat prompt, reward_model.ground_truth); see docs/data.md."""
    split: str = "train"
    """Split of a `datasets` directory or Hub dataset (ignored for files)."""
    batch_size: int = 8
    """Rows per optimizer step over all ranks (the mini-batch): sequences, or pairs for pair rows."""
    max_tokens_per_microbatch: int = 4096
    """Token budget of one packed micro-batch on one rank; a longer sequence is skipped and logged."""
    shuffle: bool = True
    on_bad_row: Literal["error", "skip"] = "error"
    """Malformed row (bad JSON, missing or mistyped field): stop with the row id, or log it and skip it.
    Empty responses and sequences over the budget are always skipped and logged with their row id."""
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    """File format; auto: by file suffix (.parquet is Parquet, anything else JSONL)."""
    prompt_field: str = "prompt"
    """Prompt column: a string or a list of chat messages. Field names may be dotted paths into nested fields."""
    response_field: str = "response"
    """Response column (TRL's `completion` is used when the default is absent)."""
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    answer_field: str = "answer"
    """Online runs: the gold answer of each prompt row (a string or a number); verl's
    `reward_model.ground_truth` is used when the default is absent."""
    answers: Literal["auto", "verifiable", "reference", "mixed"] = "auto"
    """Online runs and twofold-eval: what the answer field holds (docs/objectives.md §7.5).
    verifiable: answers the verifier checks; a row whose answer it cannot parse is skipped and counted.
    reference: reference answers nothing can verify (proofs, essays): no row is verified; only an objective that
    learns from the reference answer's likelihood (JEPO) trains on them, and evaluation reports that likelihood.
    mixed (semi-verifiable data): rows whose answer the verifier parses are verified (rollout/accuracy, held-out
    pass rates); the others are kept as reference rows.
    auto: mixed for an objective that learns from the reference answer's likelihood (JEPO), else verifiable."""
    prompt_template: str = PLACEHOLDER
    """How a string prompt becomes text (offline and online alike): a text in which {prompt} is replaced by the
    prompt (plain replacement, not str.format: braces such as \\boxed{} are literal, write them once), or `chat`:
    the prompt as a user message through the tokenizer's chat template. Chat-message prompts always use the
    tokenizer's chat template."""
    precompute_ref_logp: bool = True
    """DPO: score every sequence once with the initial policy (no grad) before training, stored per row."""


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of lr."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""


@dataclass(kw_only=True)
class ObjectiveConfig:
    name: str = field(default=DEFAULT_OBJECTIVE, metadata={"choices": objective_choices})
    """A registered objective (`twofold.objectives.SPECS`: its loss and its `ObjectiveSpec`) that runs in
    train.mode."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Hyperparameters of the loss (eps, beta, agg, entropy_coef, ...): keyword arguments of
    `twofold.objectives.OBJECTIVES[name]` that are not batch data. Checked at load: an unknown key or a wrong type
    is an error naming it. Changing objective.name on the command line needs objective.kwargs there too."""


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 10
    """Optimizer steps of the whole run (the schedule's length)."""
    stop_after_steps: int = 0
    """End this invocation after this many steps (job time slots); 0 = run to `steps`. Resume continues."""
    seed: int = 0
    collective_timeout_s: float = 600.0
    """Multi-rank runs: a collective that waits longer than this ends the job with a message naming the rank that
    stopped answering (gloo's own default is 30 minutes). Long enough for the slowest step, checkpoint save and
    weight sync."""
    mode: Literal["offline", "online"] = "offline"
    """offline: train on data.path rows; online: sample from the policy on data.path prompts and verify
    (then `steps` counts rollout steps, each `rollout.ppo_epochs * rollout.mini_batches` optimizer steps)."""
    head: Literal["fused", "logprobs"] = "fused"
    """LM head of the training step. fused: token-local objectives (`ObjectiveSpec.token_local`; the table in
    docs/objectives.md) form loss and gradient in one `fused_linear_loss` pass (6NHV); the others take log-probs
    forward only, then one fused pass with their dL/dlogp (8NHV). logprobs: `linear_logprobs` + the
    objective through autograd (8NHV), the reference path. Both give the same gradient."""


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 0
    """Save a sharded checkpoint every N steps (0: only at the end of the invocation)."""
    keep_last: int = 2
    resume: str = "auto"
    """auto: newest complete checkpoint in run_dir if any; never; or a checkpoint directory."""
    export_hf: bool = True
    """Write <run_dir>/hf (safetensors + tokenizer) when the run reaches train.steps."""
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"


@dataclass(kw_only=True)
class LogConfig:
    progress_bar: bool = True
    """A progress line per step on a terminal; at most one every 30 s when the output is a file or a CI log."""
    verbose: bool = False
    """Also show the INFO lines of vLLM's engine start and of the data loading internals."""
    tensorboard: bool = False
    """Write TensorBoard events to run_dir/tensorboard (pip install 'twofold[tracking]'; a config error if
    tensorboard is missing)."""
    wandb: bool = False
    """Log to Weights & Biases (pip install 'twofold[tracking]'; a config error if wandb is missing)."""
    wandb_project: str = "twofold"
    plot: bool = True
    """PNG of the main curves at the end (needs matplotlib; a warning otherwise)."""


@dataclass(kw_only=True)
class RolloutConfig:
    """Online runs: one rollout step = sample, verify, build the batch, `ppo_epochs * mini_batches` updates."""
    prompts_per_step: int = 8
    """Prompts (groups) trained on per rollout step."""
    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k. With top_k > 0 or top_p < 1 the sampler records each token's kept set and every trainer
    log-prob (policy, old, reference) is renormalised to it: the sampled distribution, replayed exactly
    (docs/objectives.md, "Sampling-mask replay")."""
    replay_kept_set: bool = True
    """false: the sampler still draws with top_k / top_p, but records no kept sets and the trainer scores the full
    softmax, a biased ratio (each token's log-ratio is the log of its kept mass): for measuring what replay fixes."""
    max_new_tokens: int = 256
    dynamic_sampling: bool = True
    """Keep only groups whose rewards differ (0 < correct < n), refilling with new prompts (DAPO, NFT, OREAL)."""
    gen_batch_prompts: int = 0
    """Prompts drawn per generation batch (0: prompts_per_step); DAPO draws 3x."""
    max_gen_batches: int = 10
    """Cap on generation batches per step; the step trains on the informative groups found so far."""
    mini_batches: int = 1
    """Optimizer steps per epoch over the rollout batch (DAPO: 16)."""
    ppo_epochs: int = 1
    negative_reward: float = 0.0
    """Reward of a wrong answer: 0 (0/1 rewards) or -1 (the +-1 of DAPO, NFT, OREAL code)."""
    overlong_buffer: int = 0
    """DAPO soft overlong punishment: L_cache (L_max = max_new_tokens); 0 disables it."""
    format_penalty: float = 10.0
    """JEPO: a sample without the answer delimiter (`answer_start`) gets the format reward -format_penalty (paper:
    10), whose leave-one-out advantage the loss normalises like the main one (std over the mini-batch, clip to
    [-1, 1])."""
    answer_start: str = "\\boxed{"
    """JEPO and the held-out likelihood: where a sample's answer starts. The chain of thought is the sample up to
    and including its last `answer_start`; the reference answer + `answer_end` + EOS follows it. A sample without
    one fails the format check and is followed by answer_start + reference + answer_end + EOS."""
    answer_end: str = "}"
    """What closes the answer (may be empty, e.g. with answer_start "Answer:")."""
    mask_truncated: bool = False
    """Truncated samples (no EOS within max_new_tokens) leave the loss and its normalisers after the group
    statistics are computed (TRL mask_truncated_completions, DAPO overlong filtering)."""
    freeze_actor_steps: int = 0
    """OREAL: rollout steps at the start that train only the token reward model (paper code: 10)."""
    token_rm_lr: float = 2e-6
    """OREAL: learning rate of the token reward model (its own AdamW)."""
    correction: Literal["auto", "none", "token_tis", "seq_tis", "icepop", "seq_icepop", "token_mask", "seq_mask",
                        "geo_mask"] = "auto"
    """Rollout correction of the sampler/trainer mismatch, from rho_t = e^(log p_trainer - log p_sampler) of each
    sampled token (trainer log-probs under the weights that sampled; this adds that no-grad pass when the step
    would not compute old log-probs anyway); rho_seq = the product over the sequence. Formulas, defaults and the
    equivalent verl/TRL/OpenRLHF settings: docs/objectives.md §0.4.
    Importance weights w_t on the objective's policy-gradient term only (KL and entropy terms unweighted, every
    token stays in the normalisers): token_tis clamp(rho_t, c_low, c_high); seq_tis clamp(rho_seq, ...);
    icepop rho_t inside [c_low, c_high], 0 outside (IcePop); seq_icepop the same on rho_seq (TRL sequence_mask).
    Rejection masks (a rejected token leaves the loss and every normaliser, verl rollout_rs): token_mask on rho_t,
    seq_mask on rho_seq, geo_mask on the geometric mean e^(mean_t log rho_t), each keeping [c_low, c_high].
    auto (default): token_tis when the trainer or the sampler computes in bf16, none when both are fp32 (in fp32
    the mismatch is ~1e-13 and a correction would only add a pass)."""
    correction_c_high: float | None = None
    """Upper bound; null takes the mode's default (token_tis/seq_tis 2, icepop 5, seq_icepop 3, token_mask 5,
    seq_mask 3, geo_mask 1.01)."""
    correction_c_low: float | None = None
    """Lower bound; null takes the mode's default (token_tis/seq_tis/seq_icepop 0: none, icepop 0.5,
    token_mask 0.5, seq_mask 1/3, geo_mask 0.99)."""
    token_rm: bool = True
    """OREAL: train the token reward model and weight tokens by it; false gives OREAL without it (w+ = w- = 1)."""


@dataclass(kw_only=True)
class EvalConfig:
    path: str = ""
    """Held-out prompts with gold answers (same fields as data); empty: no evaluation."""
    every: int = 0
    """Evaluate every N rollout steps (0: only before and after training)."""
    samples: int = 4
    """k of sampled avg@k (pass@1 estimated from k samples at rollout.temperature); 0 skips it."""
    max_prompts: int = 0
    """Use at most this many held-out prompts (0: all)."""
    max_new_tokens: int = 0
    """0: rollout.max_new_tokens."""
    likelihood: bool | None = None
    """Also report the held-out log-likelihood of each row's reference answer after the model's own chain of
    thought (eval/ref_logp_per_token, eval/ref_logp_per_answer, eval/ref_logp_bound; max(eval.samples, 1) chains
    per prompt, cut at rollout.answer_start). null: on when data.answers resolves to reference or mixed."""


@dataclass(kw_only=True)
class VerifierConfig:
    workers: int = 2
    """Worker processes that check answers (and run reward.functions)."""
    timeout: float = 5.0
    """Wall-clock limit of one answer check (seconds); an overrun scores 0 and is counted. Gold answers are parsed
    under the same limit at load; one that takes longer is skipped and counted."""
    numeric_tolerance: float = 0.0
    """0: a decimal is the exact number it spells (3.14159 is not pi). > 0: a decimal also equals any value it
    matches to this relative tolerance (1e-6 accepts 3.141593 for pi)."""
    memory_mb: int = 1024
    """Address-space cap of each worker process (0: none); a check that exceeds it scores 0."""
    check: Literal["twofold", "math_verify"] = "twofold"
    """Answer equivalence: twofold (the built-in sympy verifier) or math_verify (Hugging Face's Math-Verify,
    pip install 'twofold[math]'; its own timeouts are off, `verifier.timeout` applies)."""


@dataclass(kw_only=True)
class RewardFunction:
    name: str
    """"package.module:function", called as function(response, gold) -> float (response: the full sampled text;
    gold: the row's answer field)."""
    weight: float = 1.0


@dataclass(kw_only=True)
class RewardConfig:
    """Online runs: reward = verifier_weight * correct (0/1) + sum of weight * function(response, gold)."""
    functions: list[RewardFunction] = field(default_factory=list)
    """Extra reward terms, each run inside the verifier's worker processes (same timeout and memory cap); name:
    "package.module:function" or "path/to/file.py:function". A call that raises, exits, hangs past
    verifier.timeout, prints more than 64 KiB or returns anything but one finite number adds 0 to that sample's
    reward (its other terms and the verifier's verdict stand) and is counted in reward/<function>/errors."""
    max_error_frac: float = 0.05
    """Stop the run, naming the function and its first error, once a reward function has failed on more than this
    fraction of its calls in this invocation (1: never stop)."""
    verifier_weight: float = 1.0
    """Weight of the verifier's 0/1 correctness (0: the reward comes from `functions` alone)."""
    positive_threshold: float = 0.5
    """A sample whose reward is >= this counts as positive: the 0/1 reward of the binary objectives (NFT, RFT,
    OREAL), dynamic sampling of theirs, rollout/positive_frac and held-out pass rates (rollout/accuracy is the
    verifier's verdict alone). GRPO, DAPO and Dr. GRPO use the reward itself when it is not 0/1."""


@dataclass(kw_only=True)
class Config:
    run_dir: str = "runs/default"
    """Checkpoints, config.yaml, metrics.jsonl, plots and the HF export go here."""
    run_dir_policy: Literal["error", "overwrite", "new"] = "error"
    """A fresh run (nothing to resume) into a run_dir that already holds files: error (stop, naming it),
    overwrite (delete its contents first) or new (use the first free sibling run_dir-1, run_dir-2, ...)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
