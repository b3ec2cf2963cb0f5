"""Run configuration: the tree of dataclasses in `schema`, loaded from YAML plus `section.key=value` overrides.

Every field is typed; loading rejects unknown keys (with a suggestion), wrong types and impossible combinations
with a ValueError that names the key. The resolved config is printed once at start and saved as
`<run_dir>/config.yaml`, beside the checkpoints.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import logging
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from twofold.engine.rollout.correction import bounds as correction_bounds
from twofold.engine.data.loading import check_source, check_template, is_local_path
from twofold.engine.run.schema import Config, ObjectiveConfig
from twofold.objectives import AGGREGATIONS, KL_LOSSES, PROMPT_WEIGHTS, get_spec, names
from twofold.objectives.token_local import check_kl_loss

log = logging.getLogger("twofold")


class BadInput(ValueError):
    """Input found unusable after the config loaded (model files, data): the message names it and the fix."""


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Config from a YAML file (optional) and `section.key=value` overrides (values parsed as YAML), validated."""
    tree: dict = {}
    if path is not None:
        tree = _read_yaml(Path(path))
        if not isinstance(tree, dict):
            raise ValueError(f"config file {path} must hold a mapping, got {type(tree).__name__}")
    file_objective = dict(tree.get("objective") or {}) if isinstance(tree.get("objective"), dict) else {}
    for item in overrides:
        _apply_override(tree, item)
    _check_objective_override(file_objective, overrides)
    config = _build(Config, tree, prefix="")
    validate(config)
    warn_unread(tree, config)
    return config


def warn_unread(tree: dict, config: Config) -> None:
    """A warning for each key set (to other than its default) that this run never reads: the online sections in
    an offline run, data.batch_size in an online one."""
    default = Config()
    unread = []
    if config.train.mode == "offline":
        unread += [(f"{section}.{key}", "offline runs (train.mode=offline) do not read it")
                   for section in ONLINE_SECTIONS if isinstance(tree.get(section), dict) for key in tree[section]
                   if getattr(getattr(config, section), key) != getattr(getattr(default, section), key)]
    elif config.data.batch_size != default.data.batch_size:
        unread.append(("data.batch_size", "online runs train on rollout.prompts_per_step prompts per step"))
    for key, why in unread:
        log.warning("config %s has no effect: %s", key, why)
    warn_unread_by_objective(tree, config, default)


def warn_unread_by_objective(tree: dict, config: Config, default: Config) -> None:
    """One warning naming every key set (to other than its default) that some objectives read (their specs'
    `reads`) and this run's objective does not, with the objectives that do."""
    name = config.objective.name
    readers: dict[str, list[str]] = {}
    for other in names(config.train.mode):
        for key in get_spec(other).reads:
            readers.setdefault(key, []).append(other)
    unread = []
    for key, objectives in readers.items():
        section, field = key.split(".")
        if (name not in objectives and field in (tree.get(section) or {})
                and getattr(getattr(config, section), field) != getattr(getattr(default, section), field)):
            unread.append(f"{key} (read by {', '.join(objectives)})")
    if unread:
        log.warning("config %s: objective.name=%s does not read %s, so %s no effect", "; ".join(unread), name,
                    "them" if len(unread) > 1 else "it", "they have" if len(unread) > 1 else "it has")


def _check_objective_override(file_objective: dict, overrides: list[str]) -> None:
    """objective.name=X on the command line over a file whose objective.kwargs were written for another objective:
    those kwargs would be passed to X (or, worse, silently mean something else there, e.g. NFT's eps), so the
    command line must say what X's kwargs are."""
    pairs = [(key.strip(), value.strip()) for key, _, value in (item.partition("=") for item in overrides)]
    keys = [key for key, _ in pairs]
    names = [value for key, value in pairs if key == "objective.name"]
    if not names or not file_objective.get("kwargs"):
        return
    before = file_objective.get("name", ObjectiveConfig.name)
    if yaml.safe_load(names[-1]) != before and not any(k == "objective.kwargs" or k.startswith("objective.kwargs.")
                                                       for k in keys):
        raise ValueError(f"objective.name={names[-1]} on the command line replaces the file's objective {before!r}, "
                         f"but objective.kwargs {file_objective['kwargs']} were written for {before!r}; pass "
                         f"objective.kwargs=... (or objective.kwargs={{}}) on the command line too")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (plain YAML keeps the last one silently: a second
    `optim:` section would drop the first one's keys). Merge keys (<<) still override as YAML defines."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (line {seen[key] + 1} and line "
                    f"{key_node.start_mark.line + 1}); the second would silently replace the first: merge them",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_value(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  a SafeLoader subclass


def _read_yaml(path: Path):
    if not path.is_file():
        raise ValueError(f"config file {path} " + ("is not a file" if path.exists() else "does not exist"))
    try:
        return _yaml_value(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text (byte {err.start})") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or err}{where}"


def _apply_override(tree: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} must look like section.key=value")
    *parents, leaf = key.strip().split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {part!r} is not a section")
    try:
        node[leaf] = _yaml_value(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)})") from None


def _build(cls, tree: dict, prefix: str):
    if not isinstance(tree, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {tree!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in tree.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
            raise ValueError(f"unknown config key '{prefix}{key}'{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(f"{prefix}{key}", value, hint)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"config {prefix.rstrip('.')} needs {', '.join(prefix + m for m in missing)}")
    return cls(**kwargs)


def _check_type(name: str, value, hint):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            try:
                return _check_type(name, value, arm)
            except ValueError:
                pass
        names = " or ".join(_type_name(a) for a in typing.get_args(hint))
        raise ValueError(f"config {name} must be {names}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{name}.")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"config {name} must be one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if hint is float:
        return _check_float(name, value)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ValueError(f"config {name} must be a list of {_type_name(item)}, got {value!r}")
        return [_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config {name} must be a mapping, got {value!r}")
        return {k: _check_float(f"{name}.{k}", v) if isinstance(v, float) else v for k, v in value.items()}
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"config {name} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _type_name(hint) -> str:
    if typing.get_origin(hint) is list:
        return f"list[{_type_name(typing.get_args(hint)[0])}]"
    return getattr(hint, "__name__", str(hint))


def _check_float(name: str, value) -> float:
    """A finite float; YAML 1.1 reads 3e-4 (no dot) as a string, and .inf / .nan as floats."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ValueError(f"config {name} must be float, got {type(value).__name__} {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"config {name} must be a finite number, got {value!r}")
    return float(number)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def validate_paths(config: Config) -> None:
    """Files and directories the run reads, checked before anything loads."""
    model = config.model
    if model.path and Path(model.path).is_dir():
        directory = Path(model.path)
        if not (directory / "config.json").is_file():
            raise ValueError(f"model.path {model.path!r} has no config.json: not a Hugging Face model directory")
        if not model.tokenizer and not any((directory / f).is_file() for f in TOKENIZER_FILES):
            raise ValueError(f"model.path {model.path!r} has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                             "set model.tokenizer to a tokenizer directory")


def validate(config: Config) -> None:
    """Reject impossible combinations, naming the keys involved."""
    model, data, optim, train, ckpt = config.model, config.data, config.optim, config.train, config.checkpoint
    if bool(model.path) == bool(model.preset):
        raise ValueError("set exactly one of model.path (a local HF checkpoint) and model.preset, "
                         f"got path={model.path!r}, preset={model.preset!r}")
    for key in ("path", "tokenizer"):
        value = getattr(model, key)
        if value and is_local_path(value) and not Path(value).is_dir():
            state = "is not a directory" if Path(value).exists() else "does not exist"
            raise ValueError(f"model.{key} {value!r} {state}: it is a local path, not a Hub id (owner/name, e.g. "
                             "Qwen/Qwen2.5-0.5B); check the path")
    if not data.path:
        raise ValueError("data.path is required (a JSONL or Parquet file, a list of them, a datasets directory or "
                         "a Hub dataset name)")
    check_source("data.path", data.path)
    if config.eval.path:
        check_source("eval.path", config.eval.path)
    for option, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if getattr(config.log, option) and importlib.util.find_spec(package) is None:
            raise ValueError(f"log.{option}=true needs the {package} package: pip install 'twofold[tracking]' "
                             f"(or set log.{option}=false)")
    if train.mode not in get_spec(config.objective.name).modes:
        raise ValueError(f"objective.name {config.objective.name!r} does not run with train.mode={train.mode}; "
                         f"{train.mode} objectives: {', '.join(names(train.mode))}")
    config.objective.kwargs = check_objective_kwargs(config.objective.name, config.objective.kwargs)
    if problem := check_template(data.prompt_template):
        raise ValueError(f"config data.prompt_template {problem}")
    _require(train.steps >= 1, "train.steps", ">= 1", train.steps)  # first: other bounds are stated in steps
    validate_rollout(config)
    validate_paths(config)
    _require(data.batch_size >= 1, "data.batch_size", ">= 1", data.batch_size)
    _require(data.max_tokens_per_microbatch >= 2, "data.max_tokens_per_microbatch", ">= 2",
             data.max_tokens_per_microbatch)
    _require(optim.lr > 0, "optim.lr", "> 0", optim.lr)
    _require(optim.weight_decay >= 0, "optim.weight_decay", ">= 0", optim.weight_decay)
    _require(optim.eps > 0, "optim.eps", "> 0", optim.eps)
    _require(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas), "optim.betas", "two values in [0, 1)",
             optim.betas)
    updates = optimizer_steps(config)
    bound = f"train.steps={train.steps}" if train.mode == "offline" else f"optimizer steps={updates}"
    _require(optim.warmup_steps >= 0, "optim.warmup_steps", ">= 0", optim.warmup_steps)
    if optim.warmup_steps > updates:  # a recipe shortened on the command line: warm up over the whole run
        log.warning("optim.warmup_steps=%d is longer than the run (%s): warming up over all %d steps",
                    optim.warmup_steps, bound, updates)
        optim.warmup_steps = updates
    _require(0 <= optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "in [0, 1]", optim.min_lr_ratio)
    _require(optim.max_grad_norm >= 0, "optim.max_grad_norm", ">= 0", optim.max_grad_norm)
    _require(train.stop_after_steps >= 0, "train.stop_after_steps", ">= 0", train.stop_after_steps)
    _require(train.collective_timeout_s > 0, "train.collective_timeout_s", "> 0", train.collective_timeout_s)
    _require(ckpt.every >= 0, "checkpoint.every", ">= 0", ckpt.every)
    _require(ckpt.keep_last >= 1, "checkpoint.keep_last", ">= 1", ckpt.keep_last)
    if ckpt.resume not in ("auto", "never") and not Path(ckpt.resume).is_dir():
        raise ValueError(f"checkpoint.resume must be auto, never or a checkpoint directory, got {ckpt.resume!r}")


def updates_per_step(config: Config) -> int:
    """Optimizer steps per train step: 1 offline, ppo_epochs * mini_batches online."""
    if config.train.mode == "offline":
        return 1
    return config.rollout.ppo_epochs * config.rollout.mini_batches


def optimizer_steps(config: Config) -> int:
    """Length of the learning-rate schedule (OREAL's frozen-actor steps make no update)."""
    actor_steps = config.train.steps - (config.rollout.freeze_actor_steps if config.train.mode == "online" else 0)
    return max(1, actor_steps) * updates_per_step(config)


def learns_from_reference(objective: str) -> bool:
    """The objective's loss reads the likelihood of a teacher-forced reference answer (an `answer_mask`): JEPO."""
    return "answer_mask" in inspect.signature(get_spec(objective).loss).parameters


def answers_mode(config: Config) -> str:
    """data.answers with `auto` resolved (mixed for an objective that learns from the reference likelihood)."""
    mode = config.data.answers
    if mode != "auto":
        return mode
    return "mixed" if learns_from_reference(config.objective.name) else "verifiable"


def likelihood_eval(config: Config) -> bool:
    """eval.likelihood with null resolved: on for reference or mixed answers."""
    on = config.eval.likelihood
    return answers_mode(config) in ("reference", "mixed") if on is None else on


def correction_mode(config: Config) -> str:
    """rollout.correction with `auto` resolved: token_tis when either side computes in bf16, else none."""
    mode = config.rollout.correction
    if mode != "auto":
        return mode
    return "token_tis" if "bfloat16" in (config.model.dtype, config.sampler.dtype) else "none"


def group_size_needed(config: Config) -> tuple[int, str]:
    """The fewest samples per prompt an online run can learn from, and why: a one-sample group has a zero
    group-relative advantage and never holds both outcomes, so it would train nothing."""
    spec, name = get_spec(config.objective.name), config.objective.name
    if spec.min_group_size > 1:
        return spec.min_group_size, f"{name} (it compares the samples of a prompt)"
    if spec.advantage is not None:
        return 2, f"{name} (its advantages are relative to the prompt's group)"
    if config.rollout.dynamic_sampling and spec.group_filter == "dynamic":
        return 2, f"rollout.dynamic_sampling=true (it keeps groups with both outcomes; or set it to false for {name})"
    return 1, name


def validate_correction(config: Config) -> None:
    r, mode = config.rollout, correction_mode(config)
    for name in ("correction_c_low", "correction_c_high"):
        value = getattr(r, name)
        _require(value is None or value >= 0, f"rollout.{name}", ">= 0 or null (the mode's default)", value)
    if mode == "none":
        return
    low, high = correction_bounds(mode, r.correction_c_low, r.correction_c_high)
    _require(low < high, "rollout.correction_c_low", f"< the upper bound {high} of {mode}", low)


def validate_rollout(config: Config) -> None:
    r, ev = config.rollout, config.eval
    for name in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "max_gen_batches", "mini_batches",
                 "ppo_epochs"):
        _require(getattr(r, name) >= 1, f"rollout.{name}", ">= 1", getattr(r, name))
    _require(r.gen_batch_prompts >= 0, "rollout.gen_batch_prompts", ">= 0", r.gen_batch_prompts)
    _require(r.temperature > 0, "rollout.temperature", "> 0", r.temperature)
    _require(0 < r.top_p <= 1, "rollout.top_p", "in (0, 1]", r.top_p)
    _require(r.top_k >= 0, "rollout.top_k", ">= 0 (0: no top-k)", r.top_k)
    _require(r.negative_reward in (0.0, -1.0), "rollout.negative_reward", "0 or -1", r.negative_reward)
    _require(0 <= r.overlong_buffer <= r.max_new_tokens, "rollout.overlong_buffer",
             f"in [0, rollout.max_new_tokens={r.max_new_tokens}]", r.overlong_buffer)
    _require(0 <= r.freeze_actor_steps < config.train.steps, "rollout.freeze_actor_steps",
             f"in [0, train.steps={config.train.steps})", r.freeze_actor_steps)
    _require(r.token_rm_lr > 0, "rollout.token_rm_lr", "> 0", r.token_rm_lr)
    _require(r.format_penalty >= 0, "rollout.format_penalty", ">= 0", r.format_penalty)
    _require(bool(r.answer_start), "rollout.answer_start", "a non-empty delimiter", r.answer_start)
    sampler = config.sampler
    _require(sampler.kv_cache_gib is None or sampler.kv_cache_gib >= 0, "sampler.kv_cache_gib",
             ">= 0 (0: gpu_memory_utilization decides) or null (sized from max_num_seqs x max_model_len)",
             sampler.kv_cache_gib)
    for name in ("max_model_len", "max_num_seqs", "sync_bucket_mb"):
        _require(getattr(sampler, name) >= 1, f"sampler.{name}", ">= 1", getattr(sampler, name))
    for i, stop in enumerate(sampler.stop):
        _require(isinstance(stop, str) and stop != "", f"sampler.stop[{i}]", "a non-empty string", stop)
    _require(0 < sampler.gpu_memory_utilization <= 1, "sampler.gpu_memory_utilization", "in (0, 1]",
             sampler.gpu_memory_utilization)
    validate_correction(config)
    s = config.sampler
    for name in ("canary_every", "canary_prompts", "canary_tokens"):
        _require(getattr(s, name) >= (0 if name == "canary_every" else 1), f"sampler.{name}",
                 ">= 0" if name == "canary_every" else ">= 1", getattr(s, name))
    _require(0 < s.canary_warn <= s.canary_stop, "sampler.canary_warn", f"in (0, sampler.canary_stop={s.canary_stop}]",
             s.canary_warn)
    _require(r.mini_batches <= r.prompts_per_step, "rollout.mini_batches",
             f"<= rollout.prompts_per_step={r.prompts_per_step} (mini-batches split whole groups)", r.mini_batches)
    if config.train.mode == "online":
        least, why = group_size_needed(config)
        _require(r.samples_per_prompt >= least, "rollout.samples_per_prompt", f">= {least} for {why}",
                 r.samples_per_prompt)
    for name in ("every", "samples", "max_prompts", "max_new_tokens"):
        _require(getattr(ev, name) >= 0, f"eval.{name}", ">= 0", getattr(ev, name))
    _require(config.verifier.workers >= 1, "verifier.workers", ">= 1", config.verifier.workers)
    _require(config.verifier.timeout > 0, "verifier.timeout", "> 0", config.verifier.timeout)
    _require(config.verifier.memory_mb >= 0, "verifier.memory_mb", ">= 0", config.verifier.memory_mb)
    if config.verifier.check == "math_verify" and importlib.util.find_spec("math_verify") is None:
        raise ValueError("verifier.check=math_verify needs the math-verify package: pip install 'twofold[math]'")
    for i, fn in enumerate(config.reward.functions):
        module, sep, name = fn.name.rpartition(":")
        if not (module and sep and name.isidentifier()):
            raise ValueError(f"config reward.functions[{i}].name must look like package.module:function or "
                             f"path/to/file.py:function, got {fn.name!r}")
    _require(0 <= config.reward.max_error_frac <= 1, "reward.max_error_frac", "in [0, 1]",
             config.reward.max_error_frac)
    names = [fn.name for fn in config.reward.functions]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"config reward.functions[{i}] repeats reward.functions[{names.index(name)}] "
                             f"({name}); give it one entry with the summed weight")
    if config.train.mode == "online":
        reward = config.reward
        if not reward.functions:  # the reward is the verifier's 0/1 verdict times its weight
            _require(reward.verifier_weight != 0, "reward.verifier_weight", "!= 0 without reward.functions "
                     "(every reward would be 0 and nothing would train)", reward.verifier_weight)
            top = max(reward.verifier_weight, 0.0)
            _require(min(reward.verifier_weight, 0.0) < reward.positive_threshold <= top,
                     "reward.positive_threshold", f"in ({min(reward.verifier_weight, 0.0):g}, {top:g}] (the rewards "
                     f"are 0 and reward.verifier_weight={reward.verifier_weight:g}: outside it every sample is "
                     "positive or none is)", reward.positive_threshold)
    _require(0 <= config.verifier.numeric_tolerance < 1, "verifier.numeric_tolerance", "in [0, 1)",
             config.verifier.numeric_tolerance)


def _require(ok: bool, name: str, expected: str, actual) -> None:
    if not ok:
        raise ValueError(f"config {name} must be {expected}, got {actual!r}")


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def save_config(config: Config, run_dir: str | Path) -> Path:
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(config))
    return path


# ---- objective kwargs ------------------------------------------------------------------------------------------

# string hyperparameters with a closed set of values
KWARG_CHOICES = {"agg": AGGREGATIONS, "kl": KL_LOSSES, "prompt_weight": tuple(PROMPT_WEIGHTS)}
# supplied by the engine, never by objective.kwargs
ENGINE_ARGUMENTS = ("validate",)


def objective_hyperparameters(name: str) -> dict[str, Any]:
    """{parameter: type hint} of the loss's hyperparameters: keyword arguments with a default whose type admits no
    tensor (tensors are batch data, per-token or per-sequence, and the mini-batch totals)."""
    fn = get_spec(name).loss
    hints = typing.get_type_hints(fn)
    return {k: hints[k] for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty and k not in ENGINE_ARGUMENTS
            and "Tensor" not in str(hints.get(k, "Tensor"))}


def check_objective_kwargs(name: str, kwargs: dict) -> dict:
    """objective.kwargs checked against the loss `name` takes (unknown keys, types, closed value sets); returns
    them with numbers coerced (an int where a float is expected, a list where a tuple is)."""
    allowed = objective_hyperparameters(name)
    out = {}
    for key, value in kwargs.items():
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"config objective.kwargs.{key} is not a hyperparameter of {name!r}{hint} "
                             f"({name} takes: {', '.join(allowed)})")
        out[key] = _kwarg_value(f"objective.kwargs.{key}", value, allowed[key])
        if key == "kl":
            try:
                check_kl_loss(out[key])
            except ValueError as err:
                raise ValueError(f"config objective.kwargs.kl: {err}") from None
        elif key in KWARG_CHOICES and out[key] not in KWARG_CHOICES[key]:
            raise ValueError(f"config objective.kwargs.{key} must be one of {list(KWARG_CHOICES[key])}, "
                             f"got {out[key]!r}")
    return out


def _kwarg_value(name: str, value, hint):
    """`value` as the type `hint` (float, int, str, bool, X | None, tuple[float, float]) or a ValueError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(hint)
        if value is None and type(None) in arms:
            return None
        errors = []
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return _kwarg_value(name, value, arm)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"config {name} must be {_hint_name(hint)}, got "
                         f"{type(value).__name__} {value!r}")
    if origin is tuple:
        items = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ValueError(f"config {name} must be a list of {len(items)} values, got {value!r}")
        return tuple(_kwarg_value(f"{name}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, items)))
    if hint is float:
        return _check_float(name, value)  # finite; YAML 1.1 reads 3e-4 as a string
    if not isinstance(value, hint) or (hint in (int, float) and isinstance(value, bool)):
        raise ValueError(f"config {name} must be {_hint_name(hint)}, got {type(value).__name__} {value!r}")
    return value


def _hint_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def objective_kwargs(config: Config) -> dict:
    """The loss's kwargs as a run passes them: objective.kwargs plus what the engine derives from the config
    (Dr. GRPO's constant, whose default is unset: the generation budget rollout.max_new_tokens, as the paper and
    TRL)."""
    kwargs = dict(config.objective.kwargs)
    params = inspect.signature(get_spec(config.objective.name).loss).parameters
    unset = "constant" in params and kwargs.get("constant", params["constant"].default) is None
    if config.train.mode == "online" and unset:
        kwargs["constant"] = float(config.rollout.max_new_tokens)
    return kwargs


# ---- the config, explained: `--help` and the console dump ------------------------------------------------------

ONLINE_SECTIONS = ("rollout", "sampler", "eval", "verifier", "reward")
"""Sections that only online runs read (the console dump of an offline run leaves them out)."""


def field_docs(cls) -> dict[str, str]:
    """{field: docstring} from the string literal under each field of a dataclass (the source is the one place
    the docs live; --help and docs/ read them from here)."""
    import ast
    import inspect
    import textwrap
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body, docs = tree.body[0].body, {}
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return yaml.safe_dump(f.default, default_flow_style=True).strip().removesuffix("...").strip()
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if not dataclasses.is_dataclass(value):
            return yaml.safe_dump(value, default_flow_style=True).strip()
    return "required"


def config_reference(cls=None, prefix: str = "", width: int = 116) -> str:
    """Every config key with its type, default and docstring, section by section (the text of --help)."""
    import textwrap
    cls = cls or Config
    hints, docs, lines = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            lines += ["", f"{prefix}{f.name}:"] + [config_reference(hint, f"{prefix}{f.name}.", width)]
            continue
        kind = (" | ".join(map(repr, typing.get_args(hint))) if typing.get_origin(hint) is Literal
                else _type_name(hint).replace("typing.", ""))
        if typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            item = typing.get_args(hint)[0]
            kind = f"list of {{{', '.join(x.name for x in dataclasses.fields(item))}}}"
        lines.append(f"  {prefix}{f.name}  ({kind}, default {_default_text(f)})")
        doc = docs.get(f.name, "")
        if "choices" in f.metadata:
            doc += f" One of: {f.metadata['choices']()}."
        if typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            item_docs = field_docs(typing.get_args(hint)[0])
            doc += "".join(f" [{k}: {v}]" for k, v in item_docs.items())
        if doc:
            lines += textwrap.wrap(doc, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def console_yaml(config: Config) -> str:
    """The resolved config, one line per section (flow style), without the sections this mode never reads; the
    full block-style dump is run_dir/config.yaml."""
    tree = dataclasses.asdict(config)
    if config.train.mode == "offline":
        for section in ONLINE_SECTIONS:
            tree.pop(section)
    lines = []
    for name, value in tree.items():
        text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=116).strip().removesuffix("...").strip()
        lines.append(f"{name}: {text}")
    return "\n".join(lines) + "\n"
