"""The kernel benchmarks run end to end on CPU at a tiny shape and report what they claim to measure.

Each runs its `main` in this process (no fresh interpreter to start); the memory probes are fresh processes of
their own (`python -m bench.kernels --_memory-probe ...`), as from the command line."""
import importlib
import json

import pytest


def run_bench(module, *args, tmp_path):
    out = tmp_path / f"{module}.json"
    importlib.import_module(module).main([*args, "--out", str(out)])
    return json.loads(out.read_text())


def test_bench_kernels_reports_time_memory_and_ratios(tmp_path):
    # Two cases keep the memory probes (a fresh process each) to four; every case runs in the test below.
    report = run_bench("bench.kernels", "--n", "256", "--h", "32", "--v", "4000", "--repeats", "1",
                       "--cases", "eager,ours", tmp_path=tmp_path)
    rows = {(r["case"], r["mode"]): r for r in report["rows"]}
    assert set(rows) == {(c, m) for c in ("eager", "ours") for m in ("fwd", "fwd+bwd")}
    assert all(r["time_ms"] > 0 and r["gflops"] > 0 for r in rows.values())
    # Eager materialises at least the fp32 logits (256 x 4000 x 4 B = 3.9 MiB); the probe must see that.
    assert rows[("eager", "fwd")]["peak_extra_mib"] >= 3.5
    assert "VmHWM" in report["memory_method"]
    assert report["ratios_vs_eager"]["ours/fwd+bwd"]["time"] == pytest.approx(
        rows[("ours", "fwd+bwd")]["time_ms"] / rows[("eager", "fwd+bwd")]["time_ms"])


def test_bench_fused_reports_both_cases(tmp_path):
    report = run_bench("bench.fused", "--n", "256", "--h", "32", "--v", "4000", "--repeats", "1", tmp_path=tmp_path)
    assert [r["case"] for r in report["rows"]] == ["eager", "fused", "ideal"]
    assert report["rows"][0]["peak_extra_mib"] >= 3.5 and report["fused_vs_eager"]["time"] > 0
    assert report["fused_vs_ideal"]["time"] > 0


# bench.anchors on CPU (`--device cpu --quick`, reached through `bench.kernels --anchors`) is the GPU campaign's
# kernels stage: tests/test_gpu_campaign.py runs it and checks every case's time and output size.


def test_bench_cross_entropy_reports_wall_and_cpu_time_of_the_three_cases(tmp_path):
    report = run_bench("bench.cross_entropy", "--n", "64", "--h", "16", "--v", "300", "--repeats", "1",
                       "--warmup", "0", tmp_path=tmp_path)
    assert [r["case"] for r in report["rows"]] == ["eager", "logprobs", "ours"]
    assert all(r["wall_ms"]["median"] > 0 and r["cpu_ms"]["median"] > 0 for r in report["rows"])
    assert report["rows"][0]["cpu_vs_eager"]["median"] == 1.0


def test_bench_modules_compares_the_module_with_liger_on_equal_values(tmp_path):
    report = run_bench("bench.modules", "--batch", "2", "--seq", "16", "--h", "32", "--v", "300", "--warmup", "0",
                       "--repeats", "1", "--liger-eager", tmp_path=tmp_path)
    assert set(report["seconds"]) == {"twofold", "twofold_unfused", "liger"}
    assert report["liger_over_twofold"]["median"] > 0
    assert max(report["max_abs_diff"].values()) < 1e-5  # same loss and gradients as Liger's on the same inputs


def test_bench_kernels_every_case_without_memory_probes(tmp_path):
    report = run_bench("bench.kernels", "--n", "64", "--h", "16", "--v", "500", "--repeats", "1", "--warmup", "0",
                       "--no-memory", tmp_path=tmp_path)
    rows = {(r["case"], r["mode"]): r for r in report["rows"]}
    assert set(rows) == {(c, m) for c in ("eager", "torch_native", "ours", "ideal") for m in ("fwd", "fwd+bwd")}
    assert all(r["time_ms"] > 0 and r["peak_extra_mib"] is None for r in rows.values())
    assert report["ratios_vs_ideal"]["ours/fwd+bwd"]["time"] > 0
    assert report["ratios_vs_eager"]["ours/fwd"]["memory"] is None and report["ratios_vs_eager"]["ours/fwd"]["time"] > 0


def test_kept_set_bench_runs_at_a_tiny_shape(tmp_path):
    report = run_bench("bench.kept", "--n", "8", "--h", "16", "--vocabs", "300", "--kept", "1,20", "--repeats", "1",
                       "--no-memory", tmp_path=tmp_path)
    rows = {(r["K"], r["mode"]) for r in report["rows"]}
    assert rows == {(k, m) for k in (300, 1, 20) for m in ("fwd", "fwd+bwd")}
    assert all(r["wall_ms"] > 0 and r["cpu_ms"] >= 0 and r["head_gflop"] > 0 for r in report["rows"])


def test_bench_gemm_rate_reports_both_dtypes_and_both_policies(capsys, monkeypatch):
    """The head's three tile GEMMs in fp32 and bf16, and the bf16 head under each forced policy against eager."""
    from bench.gemm_rate import head_times, main
    from twofold.kernels import chunked

    monkeypatch.setenv(chunked.GEMM_PRECISION_ENV, "auto")
    main(["--h", "32", "--repeats", "1", "--head", "16", "32", "64"])
    out = capsys.readouterr().out
    assert "the head takes" in out and all(f" {g} " in out for g in ("logits", "dX", "dW"))
    assert "ours native" in out and "ours fp32-upcast" in out and "eager bf16" in out
    times = head_times(16, 32, 64, repeats=1)
    assert len(times) == 6 and all(cpu > 0 and wall > 0 for cpu, wall in times.values())
    assert chunked.gemm_precision() == "auto"  # the policies it forced do not leak out
