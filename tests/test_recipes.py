"""Every shipped recipe (configs/*.yaml) runs one step, as shipped, on a tiny model and a tiny dataset of the
recipe's own layout and file format. The overrides are the paths (model, data, run_dir) and sizes only: step and
prompt counts, samples per prompt, generated tokens, verifier workers; everything else (objective and its kwargs,
dtypes, templates, optimizer, KV-cache and context settings, checkpointing and export) is the recipe's.

Online recipes sample with the real in-process vLLM engine and verify with the real verifier. One engine and one
verifier pool serve all of them (an engine start is most of an online test's time): the engine is built from the
NFT recipe's own `sampler` section, fitted to the tiny model as a run fits it (max_model_len 4096 -> the model's
1024 positions; kv_cache_gib: 0, a GPU setting, sized from the workload on CPU), and receives each run's weights by
sync. Two-stage recipes (the CPU demo, REDI) run their first stage into the second's model.path."""
import json
import math
from pathlib import Path

import pytest
import yaml

from twofold.engine.run.config import load_config
from twofold.engine.train.model import load_hf_config
from twofold.engine.rollout.backends import build_sampler
from twofold.engine.rollout.sampler import fit_to_model
from twofold.engine.data.tasks import write_addition_data
from twofold.engine.run.train import run
from twofold.engine.verifier import build_pool

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {p.stem: p for p in sorted(ROOT.glob("configs/*.yaml"))}
MODEL = "tiny-qwen2-vllm"  # the smallest model vLLM's CPU attention serves
# the first stage of a two-stage recipe, whose export the second stage reads as model.path
STAGES = {"demo_nft": "demo_sft", "redi-qwen2.5-math-1.5b": "redi-qwen2.5-math-1.5b-stage1-sft"}
SIZES = ["train.steps=1", "log.progress_bar=false", "log.plot=false"]
OFFLINE_SIZES = ["data.batch_size=2"]
ONLINE_SIZES = ["verifier.workers=1", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "rollout.gen_batch_prompts=0",
                "rollout.max_gen_batches=1", "rollout.mini_batches=1", "rollout.max_new_tokens=16", "eval.max_prompts=2",
                "eval.samples=1"]


def recipe_tree(name: str) -> dict:
    return yaml.safe_load(RECIPES[name].read_text())


def is_online(name: str) -> bool:
    return (recipe_tree(name).get("train") or {}).get("mode") == "online"


def write_rows(path: Path, rows: list[dict]) -> Path:
    """The rows in the format the recipe's own data.path names (Parquet or JSONL)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_data(name: str, root: Path) -> dict[str, Path]:
    """data.path (and eval.path) for recipe `name`: its layout, its field names, its file suffix."""
    tree = recipe_tree(name)
    data = tree.get("data") or {}
    shipped = data.get("path", "")
    if shipped.startswith("configs/"):  # the tiny recipes ship their data
        return {"data": ROOT / shipped}
    if name.startswith("demo_"):
        files = write_addition_data(root / "demo_data", sft_rows=8, rl_prompts=8, eval_prompts=4, forget_carry=0.6)
        return {"data": files["sft"]} if name == "demo_sft" else {"data": files["prompts"], "eval": files["eval"]}
    target = root / name / Path(shipped).name
    problems = [(f"{a}+0=", str(a)) for a in range(4)]
    if is_online(name):
        prompt, answer = data.get("prompt_field", "prompt"), data.get("answer_field", "answer")
        rows = [{prompt: p, answer: a} for p, a in problems]
        out = {"data": write_rows(target, rows)}
        if "eval" in tree:
            out["eval"] = write_rows(root / name / "eval.jsonl", rows)
        return out
    if (tree.get("objective") or {}).get("name") in ("redi", "dpo", "simpo"):
        return {"data": write_rows(target, [{"prompt": p, "chosen": a, "rejected": a + "1"} for p, a in problems])}
    # SFT: TRL's prompt/completion layout for the plain recipe, prompt/response for REDI's first stage
    response = "completion" if name == "qwen2.5-1.5b_sft" else "response"
    return {"data": write_rows(target, [{"prompt": p, response: f"\\boxed{{{a}}}"} for p, a in problems])}


def overrides(name: str, root: Path) -> list[str]:
    files = tiny_data(name, root)
    tree = recipe_tree(name)
    out = [f"run_dir={root / 'runs' / name}", f"data.path={files['data']}", *SIZES]
    model = tree.get("model") or {}
    if name in STAGES:
        out.append(f"model.path={root / 'runs' / STAGES[name] / 'hf'}")
    elif is_online(name):
        out += [f"model.path={warm_model(root)}"]
    elif model.get("path"):
        out += ["model.path=", f"model.preset={MODEL}"]
    out += OFFLINE_SIZES if not is_online(name) else []
    if is_online(name):
        out += ONLINE_SIZES + ([f"eval.path={files['eval']}"] if "eval" in files else [])
        rollout = tree.get("rollout") or {}
        if rollout.get("overlong_buffer"):
            out.append("rollout.overlong_buffer=4")  # within the 16 generated tokens
        if rollout.get("freeze_actor_steps"):
            out.append("rollout.freeze_actor_steps=0")  # within the 1-step run
    return out


def warm_model(root: Path) -> Path:
    """The online recipes' initial policy: the tiny model after 80 SFT steps on the recipes' ChatML prompts with
    `\\boxed{}` answers that are right half the time, so that its groups have mixed rewards and the objectives
    update (a random model is always wrong, and dynamic sampling then skips the step)."""
    out = root / "warm" / "hf"
    if out.is_dir():
        return out
    template = recipe_tree("nft-qwen2.5-math-7b")["data"]["prompt_template"]
    rows = write_rows(root / "warm.jsonl", [{"prompt": f"{a}+0=", "response": f"\\boxed{{{(a + c) % 10}}}"}
                                            for a in range(10) for c in (0, 1)])
    config = load_config(None, [f"run_dir={root / 'warm'}", f"model.preset={MODEL}", "model.dtype=float32",
                                "model.attn_implementation=sdpa", "model.activation_checkpointing=false",
                                f"data.path={rows}", "data.batch_size=20", "data.max_tokens_per_microbatch=1024",
                                "optim.lr=3e-3", "optim.warmup_steps=5", "train.steps=80", "log.progress_bar=false", "log.plot=false"])
    config.data.prompt_template = template  # as is: a command-line value would be read as YAML
    run(config)
    return out


@pytest.fixture(scope="module")
def engine(workdir):
    """One vLLM engine and one verifier pool for every online recipe (module docstring)."""
    config = load_config(RECIPES["nft-qwen2.5-math-7b"], overrides("nft-qwen2.5-math-7b", workdir))
    pool = build_pool(config)  # before the engine, as a run starts them
    sampler_cfg = fit_to_model(config.sampler, load_hf_config(config.model), config.model.path)
    sampler = build_sampler(sampler_cfg, config.model.path)
    yield {"sampler": sampler, "pool": pool}
    sampler.close()
    pool.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("recipes")


HISTORIES: dict[str, list[dict]] = {}


def run_recipe(name: str, root: Path, request) -> list[dict]:
    """The recipe's metrics rows (a first stage runs once, before its second stage or its own test)."""
    if name in HISTORIES:
        return HISTORIES[name]
    if name in STAGES:
        run_recipe(STAGES[name], root, request)
    config = load_config(RECIPES[name], overrides(name, root))
    kwargs = {}
    if is_online(name):
        shared = request.getfixturevalue("engine")
        kwargs = {"sampler": shared["sampler"], "pool": shared["pool"]}
    HISTORIES[name] = run(config, **kwargs)
    return HISTORIES[name]


def test_every_recipe_is_covered():
    assert len(RECIPES) >= 14 and {"nft-qwen2.5-math-7b", "dapo-qwen2.5-32b", "tiny_sft"} <= set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_recipe_runs_one_step_as_shipped(name, workdir, request):
    history = run_recipe(name, workdir, request)
    assert len(history) == 1
    row = history[0]
    assert math.isfinite(row["loss"]), row
    if is_online(name) and name not in STAGES:  # (the demo's second stage starts from a 1-step SFT: all wrong)
        if name.startswith("nft"):  # NFT's curves beside its loss, which is 0 on-policy (docs/objectives.md §7.1)
            assert row["pos_nll"] > 0 and row["neg_nll"] > 0, json.dumps(row)
        assert 0 < row["rollout/accuracy"] < 1 and not row.get("skipped"), json.dumps(row)  # mixed groups: an update ran
    run_dir = workdir / "runs" / name
    assert (run_dir / "complete.json").is_file() and (run_dir / "hf" / "config.json").is_file()
    (checkpoint,) = (run_dir / "checkpoints").iterdir()  # saved at the end of the run, with what export needs
    assert (checkpoint / "model" / "config.json").is_file() and (checkpoint / "config.yaml").is_file()
