"""Records, judges and prints a GPU campaign (bench/gpu_campaign.sh); standard library only, so it never waits on
torch and runs between the stages in a fraction of a second.

    python -m bench.gpu_campaign env DIR [--dry-run]       # start DIR/campaign.json: versions, GPU, Liger
    python -m bench.gpu_campaign record DIR STAGE --rc RC --seconds S --limit L [--junit X] [--command C]
    python -m bench.gpu_campaign summary DIR               # print the tables (stages, kernels, fused, step, targets)
    python -m bench.gpu_campaign pytest ARGS...            # pytest, with SIGTERM as an interrupt (see run_pytest)

DIR/campaign.json holds the environment, each stage (status, seconds against its limit, exit code, the stage's own
JSON or its test counts) and the targets, each met / not met / not measured. It is rewritten after every stage
(atomically), so a campaign stopped at any point leaves a valid file with everything that finished. A target
counts as measured only from a stage that ran on a CUDA device: the CPU dry run measures nothing.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

CAMPAIGN = "campaign.json"
STAGE_FILES = {"kernels": "kernels.json", "fused-nft": "fused-nft.json", "fused-grpo": "fused-grpo.json",
               "step": "step.json"}  # stage -> the JSON its bench module writes into DIR
PACKAGES = ("torch", "triton", "transformers", "liger-kernel", "flash-attn", "vllm")

QUACK_S3_MS = 17.33  # QuACK chunked_linear_cross_entropy, fwd+bwd, H200, N=4096 H=4096 V=128256 (Liger's SM90 note)
TARGET_FWD_ROOFLINE = 0.70  # forward log-probs (+ entropy), no grad, fraction of the measured bf16 matmul rate
TARGET_QUACK_RATIO = 1.3
TARGET_EXTRA_MIB = 256
TARGET_VS_LIGER_GRPO = 3.0
TARGET_MFU = 0.45
OURS_CASES = ("ours_fwd", "ours", "ours_ce", "ours_fused_dapo")
MEMORY_SHAPES = ("S1", "S2", "S3")


# ---- campaign.json ----

def load(directory: str) -> dict:
    path = os.path.join(directory, CAMPAIGN)
    if not os.path.exists(path):
        return {"stages": []}
    with open(path) as f:
        return json.load(f)


def save(directory: str, campaign: dict) -> None:
    campaign["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    campaign["targets"] = judge(campaign)
    path = os.path.join(directory, CAMPAIGN)
    with open(path + ".tmp", "w") as f:
        json.dump(campaign, f, indent=1)
    os.replace(path + ".tmp", path)  # a campaign killed mid-write still leaves the previous complete file


def environment(dry_run: bool) -> dict:
    """Versions from package metadata and the GPU from nvidia-smi: nothing here imports torch."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    gpu = None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        gpu = done.stdout.strip() or done.stderr.strip() or None
    except (OSError, subprocess.TimeoutExpired) as e:
        gpu = f"no nvidia-smi: {type(e).__name__}"
    return {"dry_run": dry_run, "python": sys.version.split()[0], "packages": versions, "gpu": gpu,
            "liger_importable": importlib.util.find_spec("liger_kernel") is not None,
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


def stage_status(rc: int | None, seconds: float, limit: float) -> str:
    if rc is None:
        return "not run (no time left)"
    if rc == 0:
        return "ok"
    if rc in (124, 137):  # GNU timeout: 124, or 137 when it had to KILL
        return f"timed out at {limit:.0f} s"
    return f"failed (exit {rc})"


def pytest_counts(junit_path: str) -> dict:
    """Counts and the failing tests (first line of each message) from pytest's JUnit XML."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    if not os.path.exists(junit_path):
        return {**counts, "error": f"no JUnit XML at {junit_path}"}
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        if case.get("name") is None:  # the test a timeout interrupted: pytest leaves it nameless and unjudged
            continue
        test = f"{case.get('classname', '')}::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
            continue
        key = {"failure": "failed", "error": "errors", "skipped": "skipped"}[outcome.tag]
        counts[key] += 1
        if outcome.tag != "skipped":
            message = (outcome.get("message") or outcome.text or "").strip().splitlines()
            counts["failures"].append({"test": test, "message": (message or [""])[0][:300]})
    return counts


def record(directory: str, stage: str, rc: int | None, seconds: float, limit: float, junit: str | None,
           command: str | None) -> dict:
    campaign = load(directory)
    entry = {"stage": stage, "status": stage_status(rc, seconds, limit), "rc": rc, "seconds": round(seconds, 1),
             "limit_s": limit, "command": command}
    if junit:
        entry["tests"] = pytest_counts(junit)
    elif stage in STAGE_FILES:
        path = os.path.join(directory, STAGE_FILES[stage])
        entry["file"] = STAGE_FILES[stage]
        if os.path.exists(path):
            with open(path) as f:
                entry["result"] = json.load(f)
    campaign["stages"] = [s for s in campaign["stages"] if s["stage"] != stage] + [entry]
    save(directory, campaign)
    return entry


# ---- targets ----

def stage_result(campaign: dict, stage: str):
    entry = next((s for s in campaign.get("stages", []) if s["stage"] == stage), None)
    return None if entry is None else entry.get("result")


def kernels_on_gpu(campaign: dict) -> dict | None:
    """bench.anchors' report if it ran on CUDA (only then does it measure a bf16 matmul peak)."""
    report = stage_result(campaign, "kernels")
    return report if report and report.get("bf16_matmul_peak_tflops") else None


def case(report: dict, shape: str, name: str) -> dict | None:
    row = report.get("shapes", {}).get(shape, {}).get("cases", {}).get(name)
    return row if row and "error" not in row else None


def verdict(target: str, ok: bool | None, measured: str) -> dict:
    status = "not measured" if ok is None else ("met" if ok else "not met")
    return {"target": target, "status": status, "measured": measured}


def target_forward_roofline(campaign):
    name = f"forward log-probs >= {TARGET_FWD_ROOFLINE:.0%} of the 2NHV bf16 roofline at S1 (N=8192 H=4096 V=128256)"
    report = kernels_on_gpu(campaign)
    row = report and case(report, "S1", "ours_fwd")
    if not row:
        return verdict(name, None, "no GPU run of bench.kernels at S1")
    gemm = case(report, "S1", "gemm1")
    also = f"; bare logits GEMM {gemm['frac_of_peak']:.1%}" if gemm and gemm.get("frac_of_peak") else ""
    return verdict(name, row["frac_of_peak"] >= TARGET_FWD_ROOFLINE,
                   f"{row['frac_of_peak']:.1%} ({row['tflops']:.0f} of {report['bf16_matmul_peak_tflops']:.0f} "
                   f"TFLOP/s measured, {row['time_ms']:.2f} ms){also}")


def target_quack(campaign):
    bound = TARGET_QUACK_RATIO * QUACK_S3_MS
    name = f"fwd+bwd <= {TARGET_QUACK_RATIO}x QuACK's {QUACK_S3_MS} ms at S3 (N=4096), mean CE: <= {bound:.1f} ms"
    report = kernels_on_gpu(campaign)
    row = report and case(report, "S3", "ours_ce")
    if not row:
        return verdict(name, None, "no GPU run of bench.kernels at S3")
    full = case(report, "S3", "ours")
    also = f"; log-probs + entropy {full['time_ms']:.2f} ms" if full else ""
    return verdict(name, row["time_ms"] <= bound, f"{row['time_ms']:.2f} ms{also}")


def target_memory(campaign):
    name = f"extra memory <= {TARGET_EXTRA_MIB} MiB beyond inputs and outputs (ours, S1-S3)"
    report = kernels_on_gpu(campaign)
    rows = [(shape, c, row["peak_extra_mib"] - row["output_mib"]) for shape in MEMORY_SHAPES for c in OURS_CASES
            if report and (row := case(report, shape, c)) and row.get("peak_extra_mib") is not None]
    if not rows:
        return verdict(name, None, "no GPU run of bench.kernels at S1-S3")
    shape, c, worst = max(rows, key=lambda r: r[2])
    return verdict(name, worst <= TARGET_EXTRA_MIB, f"worst {worst:.0f} MiB ({c} at {shape}, {len(rows)} runs)")


def target_liger_grpo(campaign):
    name = f"fused objective >= {TARGET_VS_LIGER_GRPO:.0f}x faster than Liger's fused GRPO loss (S1-S3)"
    report = kernels_on_gpu(campaign)
    if not report:
        return verdict(name, None, "no GPU run of bench.kernels")
    ratios = [(shape, lg["time_ms"] / ours["time_ms"]) for shape in report.get("shapes", {})
              if (ours := case(report, shape, "ours_fused_dapo")) and (lg := case(report, shape, "liger_grpo"))]
    if not ratios:
        errors = {s: v["cases"].get("liger_grpo", {}).get("error") for s, v in report["shapes"].items()}
        why = next((e for e in errors.values() if e), "liger_grpo was not run")
        return verdict(name, None, f"no Liger GRPO time: {why}")
    shape, worst = min(ratios, key=lambda r: r[1])
    return verdict(name, worst >= TARGET_VS_LIGER_GRPO,
                   f"worst {worst:.2f}x (at {shape}); " + ", ".join(f"{s} {r:.2f}x" for s, r in ratios))


def target_mfu(campaign):
    name = f"MFU >= {TARGET_MFU:.0%} on the 1.5B shape (bench.step, fused head, bf16)"
    rows = stage_result(campaign, "step") or []
    row = next((r for r in rows if r.get("head") == "fused" and str(r.get("device", "")).startswith("cuda")
                and r.get("preset") == "qwen2.5-1.5b-shape" and "mfu" in r), None)
    if not row:
        return verdict(name, None, "no GPU run of bench.step on qwen2.5-1.5b-shape")
    return verdict(name, row["mfu"] >= TARGET_MFU,
                   f"{row['mfu']:.1%} ({row['tokens_per_s']:.0f} tokens/s, {row.get('attn')}, datasheet peak)")


TARGETS = (target_forward_roofline, target_quack, target_memory, target_liger_grpo, target_mfu)


def judge(campaign: dict) -> list[dict]:
    return [target(campaign) for target in TARGETS]


# ---- the printed summary ----

def stage_line(entry: dict) -> str:
    if "tests" in entry:
        t = entry["tests"]
        info = t.get("error") or (f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                                  f"{t['skipped']} skipped")
    elif "result" in entry:
        info = f"wrote {entry['file']}"
    else:
        info = f"no {entry['file']}" if "file" in entry else ""
    return f"  {entry['stage']:<13} {entry['status']:<24} {entry['seconds']:>6.0f} / {entry['limit_s']:<4.0f} {info}"


def kernel_lines(report: dict) -> list[str]:
    shapes = list(report.get("shapes", {}))
    peak = report.get("bf16_matmul_peak_tflops")
    head = f"bench.kernels on {report['device']}" + (f", bf16 matmul peak {peak:.0f} TFLOP/s" if peak else "")
    lines = [head, "  " + f"{'case':<17}" + "".join(f"{s + ' ms (% peak, extra MiB)':>30}" for s in shapes)]
    names = list(dict.fromkeys(c for s in shapes for c in report["shapes"][s]["cases"]))
    for name in names:
        cells = []
        for s in shapes:
            row = report["shapes"][s]["cases"].get(name, {})
            if "error" in row or not row:
                cells.append((row.get("error", "-").split(":")[0])[:28])
                continue
            frac = f"{row['frac_of_peak']:.0%}" if row.get("frac_of_peak") is not None else "-"
            extra = (f"{row['peak_extra_mib'] - row['output_mib']:.0f}" if row.get("peak_extra_mib") is not None
                     else "-")
            cells.append(f"{row['time_ms']:.2f} ({frac}, {extra})")
        lines.append("  " + f"{name:<17}" + "".join(f"{c:>30}" for c in cells))
    return lines


def summary(directory: str) -> str:
    campaign = load(directory)
    env = campaign.get("env", {})
    pk = env.get("packages", {})
    lines = [f"GPU campaign{' (DRY RUN on CPU: measures nothing)' if env.get('dry_run') else ''}: "
             f"{env.get('gpu') or 'no GPU'}; torch {pk.get('torch')}, triton {pk.get('triton')}, "
             f"transformers {pk.get('transformers')}, liger-kernel {pk.get('liger-kernel')}; {env.get('date')}",
             f"  {'stage':<13} {'status':<24} {'s':>6} / limit"]
    lines += [stage_line(entry) for entry in campaign.get("stages", [])]
    for entry in campaign.get("stages", []):
        for failure in entry.get("tests", {}).get("failures", [])[:10]:
            lines.append(f"  FAILED {failure['test']}: {failure['message'][:150]}")
    kernels = stage_result(campaign, "kernels")
    if kernels:
        lines += kernel_lines(kernels)
    for stage in ("fused-nft", "fused-grpo"):
        report = stage_result(campaign, stage)
        if report:
            rows = {r["case"]: r for r in report["rows"]}
            q = report["fused_vs_eager"]
            mib = {c: "n/a" if rows[c]["peak_extra_mib"] is None else f"{rows[c]['peak_extra_mib']:.0f} MiB"
                   for c in ("eager", "fused")}  # the dry run leaves out the CPU-only memory probes
            memory = "n/a" if q["memory"] is None else f"{q['memory']:.3f}x"
            lines.append(f"bench.fused {report['objective']} N={report['shape']['N']} V={report['shape']['V']} "
                         f"{report['shape']['dtype']}: eager {rows['eager']['time_ms']:.1f} ms {mib['eager']}, "
                         f"fused {rows['fused']['time_ms']:.1f} ms {mib['fused']}: time {q['time']:.2f}x, "
                         f"memory {memory}")
    for row in stage_result(campaign, "step") or []:
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "n/a"
        lines.append(f"bench.step {row['head']:<6} {row['preset']} {row['dtype']} {row.get('attn')}: "
                     f"{row['tokens_per_s']:.0f} tokens/s, {row['step_time_s']:.3f} s/step, "
                     f"{row['peak_mem_gib']:.2f} GiB, MFU {mfu}")
    lines.append("targets")
    for t in campaign.get("targets") or judge(campaign):
        lines.append(f"  {t['status']:<13} {t['target']}: {t['measured']}")
    return "\n".join(lines)


def run_pytest(args: list[str]) -> int:
    """pytest writes its JUnit XML when interrupted (KeyboardInterrupt) but not when killed: a stage cut by
    `timeout` (SIGTERM) must still report the tests that ran before the cut."""
    import signal

    import pytest
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return int(pytest.main(args))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pytest"]:
        sys.exit(run_pytest(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    env = sub.add_parser("env", help="start DIR/campaign.json with the environment")
    env.add_argument("dir")
    env.add_argument("--dry-run", action="store_true")
    rec = sub.add_parser("record", help="add one finished (or skipped) stage and re-judge the targets")
    rec.add_argument("dir")
    rec.add_argument("stage")
    rec.add_argument("--rc", type=int, help="exit status; leave out for a stage that was not run")
    rec.add_argument("--seconds", type=float, default=0.0)
    rec.add_argument("--limit", type=float, default=0.0)
    rec.add_argument("--junit", help="pytest's JUnit XML, for a test stage")
    rec.add_argument("--command", help="the stage's command line, kept for the record")
    summ = sub.add_parser("summary", help="print the tables")
    summ.add_argument("dir")
    args = p.parse_args(argv)
    if args.verb == "env":
        os.makedirs(args.dir, exist_ok=True)
        save(args.dir, {"env": environment(args.dry_run), "stages": []})
    elif args.verb == "record":
        record(args.dir, args.stage, args.rc, args.seconds, args.limit, args.junit, args.command)
    else:
        print(summary(args.dir))


if __name__ == "__main__":
    main()
