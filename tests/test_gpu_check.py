"""scripts/gpu-check.sh: its dry run on the CPU, its failure handling, and its helpers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load(path: str):
    """A module of scripts/ or benchmarks/ (not packages) by its path."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = load("scripts/gpu_check.py")
bench_gpu = load("benchmarks/bench_gpu.py")


def script_env() -> dict[str, str]:
    """This interpreter for the script (FCN_PYTHON), its directory first on PATH."""
    env = dict(os.environ)
    env["FCN_PYTHON"] = sys.executable
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("OUT", None)
    return env


@pytest.mark.slow
def test_dry_run_passes_and_writes_every_figure(tmp_path):
    out = tmp_path / "gpu-check.json"
    run = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--dry-run", "--json", str(out)],
        cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "img/s" in run.stdout and "data wait" in run.stdout
    report = json.loads(out.read_text())
    assert report["schema"] == "fcn-gpu-check/1" and report["mode"] == "dry-run"
    assert report["failed"] == [] and any("DDP" in line for line in report["todo"])
    assert report["environment"]["python"] and report["environment"]["torch"]
    assert set(report["parts"]) == {"tests", "benchmark", "kernels", "train"}
    for part in report["parts"].values():
        assert part["status"] == "passed" and Path(part["log"]).is_file()

    tests = report["parts"]["tests"]["counts"]
    assert tests["passed"] == tests["failed"] == 0 and tests["skipped"] >= 16
    assert any("needs a CUDA GPU" in reason for reason in tests["skip_reasons"])

    bench = report["parts"]["benchmark"]["results"]
    cases = {(case["batch"], case["config"]): case for case in bench["cases"]}
    assert set(cases) == {(b, c) for b in (1, 2) for c in ("fp32-nchw", "fp32-cl")}
    for case in cases.values():
        assert case["status"] == "ok" and case["steps"] >= 1
        assert case["images_per_second"] > 0 and case["ms_per_step"] > 0
        assert case["flops_per_step"] > 0 and case["tflops"] > 0
        assert case["share_of_bf16_peak"] is None  # a CPU has no bf16 peak in the table
    assert cases[(1, "fp32-nchw")]["speedup_vs_baseline"] == 1.0
    # The FLOP count grows with the batch.
    assert cases[(2, "fp32-cl")]["flops_per_step"] == 2 * cases[(1, "fp32-cl")]["flops_per_step"]

    kernels = report["parts"]["kernels"]["results"]
    assert kernels["settings"]["images"] == 8 and kernels["step_images_per_second"] > 0
    cases = [case["case"] for case in kernels["kernels"]]
    assert cases[0].startswith("before") and cases[-1].startswith("now") and len(cases) == 5
    assert [case["loss_check_steps"] for case in kernels["kernels"]] == [1, 1, 32, 32, 32]
    assert [case["flips"] for case in kernels["kernels"]] == ["host"] * 3 + ["device"] * 2
    assert [case["fused"] for case in kernels["kernels"]] == [False] * 4 + [True]
    assert kernels["kernels"][0]["speedup_vs_before"] == 1.0
    assert all(case["images_per_second"] > 0 for case in kernels["kernels"])

    train = report["parts"]["train"]["results"]
    assert train["dvc_rc"] == 0 and train["targets"] == ["train@fcn32s"]
    # Only what this run trained: the copy also holds the committed reference run's
    # DVCLive files of FCN-16s and FCN-8s, which are not this run's figures.
    assert set(train["variants"]) == {"fcn32s"}
    assert train["variants"]["fcn32s"]["test_mean_iu"] is None  # evaluate did not run
    fcn32s = train["variants"]["fcn32s"]
    assert 0.0 <= fcn32s["data_wait_share"] <= 1.0 and fcn32s["images_per_second"] > 0
    assert fcn32s["epochs"] == 1


def test_a_bare_directory_named_like_a_module_is_not_that_module(tmp_path, monkeypatch):
    """The repository's own DVCLive logs (dvclive/) made a GPU machine without the
    dvclive package look ready; a namespace package must count as missing."""
    (tmp_path / "fcn_probe_pkg").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.util.find_spec("fcn_probe_pkg") is not None  # what fooled the probe
    assert not gpu_check._importable("fcn_probe_pkg")
    assert not gpu_check._importable("fcn_no_such_module")
    assert gpu_check._importable("json") and gpu_check._importable("yaml")


@pytest.mark.slow
def test_a_part_without_time_is_recorded_as_failed(tmp_path):
    """With no time left every part is skipped, named in `failed`, and the exit is 1."""
    out = tmp_path / "check.json"
    run = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--dry-run", "--budget", "1", "--json", str(out)],
        cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    report = json.loads(out.read_text())
    failed = [line.split(":")[0] for line in report["failed"]]
    assert failed == ["tests", "benchmark", "kernels", "train"]
    assert all("no time left" in part["reason"] for part in report["parts"].values())
    assert "FAILED" in run.stdout


def test_bf16_peak_is_looked_up_from_the_device_name():
    assert bench_gpu.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert bench_gpu.bf16_peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert bench_gpu.bf16_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert bench_gpu.bf16_peak_tflops("NVIDIA GeForce RTX 4090") is None


def test_benchmark_options_are_checked():
    args = bench_gpu.parse_args(["--size", "64x80", "--batches", "1,4"])
    assert args.size == (64, 80) and args.batches == [1, 4]
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--configs", "bf16-cl"])  # the baseline must come first
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--size", "375"])


def junit(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "junit.xml"
    path.write_text(f'<testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    return path


def test_junit_counts_and_skipped_cuda_tests_fail_a_gpu_run(tmp_path):
    path = junit(
        tmp_path,
        '<testcase classname="t" name="a"/>'
        '<testcase classname="t" name="b"><skipped message="needs a CUDA GPU"/></testcase>'
        '<testcase classname="t" name="c"><failure message="assert 0.2 &lt;= 0.03"/></testcase>',
    )
    counts = gpu_check.junit_counts(path)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1)
    assert counts["skip_reasons"] == ["needs a CUDA GPU"]
    assert counts["failures"] == ["t::c: assert 0.2 <= 0.03"]

    for mode, expected in (("dry-run", "passed"), ("gpu", "failed")):
        record = {"status": "passed", "counts": counts}
        gpu_check.check_part("tests", record, mode, [])
        assert record["status"] == expected


def test_a_benchmark_without_a_measured_case_fails(tmp_path):
    warnings: list[str] = []
    oom = {
        "batch": 8,
        "config": "fp32-nchw",
        "status": "out of memory: ...",
        "images_per_second": None,
    }
    record = {"status": "passed", "results": {"cases": [oom]}}
    gpu_check.check_part("benchmark", record, "gpu", warnings)
    assert record["status"] == "failed" and "out of memory" in warnings[0]
