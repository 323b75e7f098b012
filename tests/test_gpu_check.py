"""bench/gpu_check.py end to end on CPU: `--dry-run` takes the GPU plan at tiny sizes under its
budget of 165 s (the interpreter runs the kernels, the trainer 3 steps a run), and
bench/report.py renders the directory it writes. A budget too small for any step skips every
one with the reason. Cost: the dry run, at most 3 minutes, plus about 10 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.report import load_benchmarks, render_gpu_check
from bench.report import main as report_main

ROOT = Path(__file__).resolve().parent.parent
PLAN = (  # every step of the plan, in priority order (more fast seeds if the budget allows)
    "environment",
    "kernel_tests",
    "bench_routing",
    "bench_train_step",
    "record_fast_seed0",
    "record_paper",
    "profile",
)
PYTEST_STEPS = ("kernel_tests", "bench_routing", "bench_train_step")
ENV = {**os.environ, "CAPSFAST_COMMIT": "abc1234", "WANDB_MODE": "disabled"}


def gpu_check(*args: str, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, time.monotonic() - t0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "result"  # does not exist yet
    proc, seconds = gpu_check("--dry-run", "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run = json.loads((out / "steps.json").read_text())
    return out, run, {s["name"]: s for s in run["steps"]}, seconds


def test_dry_run_stays_within_its_budget(dry_run):
    _, run, _, seconds = dry_run
    assert run["plan"] == "dry-run" and run["budget_s"] == 165 and run["commit"] == "abc1234"
    assert run["seconds"] <= run["budget_s"]
    assert seconds < 180, f"the dry run took {seconds:.0f} s"


def test_every_step_ran_or_says_why_not(dry_run):
    out, _, steps, _ = dry_run
    assert set(PLAN) <= set(steps), f"steps missing: {set(PLAN) - set(steps)}"
    for name, s in steps.items():
        assert s["status"] in ("ok", "stopped", "skipped"), f"{name}: {s['status']} {s['reason']}"
        if s["status"] != "ok":
            assert s["reason"], f"{name} is {s['status']} without a reason"
        if s["status"] == "skipped":
            assert s["seconds"] is None and s["reason"].startswith("needs about")
        else:
            assert s["seconds"] > 0 and s["seconds"] <= s["limit_s"] + 10  # stopped, then killed
            assert (out / "logs" / f"{name}.log").is_file()
        if s["status"] == "ok":
            missing = [p for p in s["outputs"] if not (out / p).is_file()]
            assert not missing, f"{name} is ok but wrote no {missing}"
    # The first steps always fit: the environment, and the kernel tests, which the interpreter
    # cannot finish in their limit (stopped, with the counts of what ran). How far the rest gets
    # depends on the machine's load: on an idle one everything runs.
    assert steps["environment"]["status"] == "ok"
    assert steps["kernel_tests"]["status"] in ("ok", "stopped")
    for name in PYTEST_STEPS:
        r, status = steps[name]["results"], steps[name]["status"]
        if status == "ok":
            assert r["tests"] >= 1 and r["passed"] == r["tests"] - r["skipped"], (name, r)
        elif (
            status == "stopped" and "tests" in r
        ):  # pytest wrote its report: its last test may fail
            assert r["failed"] + r["errors"] <= 1, (name, r)


def test_environment_report(dry_run):
    out, _, _, _ = dry_run
    env = json.loads((out / "environment.json").read_text())
    assert env["commit"] == "abc1234" and env["device"].startswith("cpu") and env["tiny"]
    for rate in ("copy_gb_per_second", "bf16_matmul_tflop_per_second"):
        assert env[rate] > 0, rate
    assert env["fp32_matmul_tflop_per_second"] > 0 and env["fp32_matmul_precision"]


def test_benchmarks_are_timed_rows_with_their_rates(dry_run):
    out, _, steps, _ = dry_run
    for name in ("bench_routing", "bench_train_step"):
        if steps[name]["status"] == "ok":
            assert steps[name]["results"]["benchmarks"] == steps[name]["results"]["passed"] >= 1
    rows = load_benchmarks(sorted(out.glob("bench_*.json")))
    assert all(r["median"] > 0 for r in rows)
    for r in rows:
        assert r["commit"] == "abc1234"
        if r["subject"] == "train_step":
            # achieved TFLOP/s over the matmul rate measured in the same session
            assert r["matmul_fraction"] > 0 and r["images_per_second"] > 0
        else:
            assert r["gb_per_second"] > 0
    if steps["bench_train_step"]["status"] == "ok":
        train = [r for r in rows if r["subject"] == "train_step"]
        assert {r["impl"] for r in train} == {"eager/torch", "compiled/torch"}
        (baseline,) = [r for r in train if r["baseline"]]
        assert baseline["speedup"] == 1.0


def test_record_runs_are_logged(dry_run):
    out, _, steps, _ = dry_run
    ran = [s for s in steps.values() if s["name"].startswith("record_") and s["status"] == "ok"]
    logs = sorted((out / "records").glob("*.json"))
    assert len(logs) >= len(ran)
    for s in ran:
        r = s["results"]
        assert r["steps"] == 3 and 0 <= r["test_accuracy"] <= 1 and r["wall_seconds"] > 0
        assert r["first_epoch_seconds"] > 0
        (log,) = [p for p in s["outputs"] if p.startswith("records/")]
        record = json.loads((out / log).read_text())
        assert record["preset"] == ("paper" if s["name"] == "record_paper" else "fast")
        assert s["name"] == "record_paper" or s["name"] == f"record_fast_seed{record['seed']}"
    for log in logs:
        assert json.loads(log.read_text())["commit"] == "abc1234"


def test_summary_names_each_step_and_report_renders_it(dry_run, tmp_path):
    out, _, steps, _ = dry_run
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check, dry run on CPU")
    for name, s in steps.items():
        row = next(line for line in summary.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {s['status']} |" in row and s["command"] in row
    assert "/work/" not in summary and str(out) not in summary, "absolute paths in the summary"
    md = tmp_path / "report.md"
    assert report_main(["--gpu-check", str(out), "--markdown", str(md)]) == 0
    assert md.read_text() == render_gpu_check(out) == summary
    assert "| bf16 matmul |" in summary and "| commit | abc1234 |" in summary
    for r in load_benchmarks(sorted(out.glob("bench_*.json"))):
        assert f"| {r['subject']} | {r['impl']} | {r['dtype']} | {r['batch']} |" in summary
    if list((out / "records").glob("*.json")):
        assert "## Record runs" in summary and "| fast | cpu |" in summary


def test_out_with_an_earlier_result_is_refused(dry_run):
    out, _, _, _ = dry_run
    proc, _ = gpu_check("--dry-run", "--out", str(out), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"gpu_check: error: {out} already holds a gpu_check result: choose another --out"
    )


def test_a_budget_too_small_skips_every_step_with_the_reason(tmp_path):
    proc, _ = gpu_check("--dry-run", "--budget-s", "8", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((tmp_path / "steps.json").read_text())
    names = [s["name"] for s in run["steps"]]
    assert names == list(PLAN)  # seed 0 is tried (and skipped); no further seed
    for s in run["steps"]:
        assert s["status"] == "skipped" and s["reason"].startswith("needs about"), s
    summary = (tmp_path / "summary.md").read_text()
    assert "- skipped: " + ", ".join(PLAN) in summary
    assert "environment.json missing" in summary


def test_report_shows_the_matmul_fraction(tmp_path):
    """A train-step row's throughput names its share of the matmul rate; rows without one
    (older JSON, routing rows) render as before."""
    info = {"device": "d", "subject": "train_step", "impl": "eager/torch", "dtype": "bf16"}
    info.update(batch=128, baseline=True, images_per_second=1000.0, tflop_per_second=1.2)
    info.update(matmul_tflop_per_second=9.6, matmul_fraction=0.125, some_new_key=[1, 2])
    bench = {
        "group": "train_step B=128",
        "name": "t",
        "extra_info": info,
        "stats": {"median": 0.128},
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": [bench]}))
    (row,) = load_benchmarks([path])
    assert row["matmul_fraction"] == 0.125
    md = tmp_path / "t.md"
    assert report_main([str(path), "--markdown", str(md)]) == 0
    assert "| 128 ms | 1,000 img/s (1.2 TFLOP/s, 12.5% of matmul) | 1.00x |" in md.read_text()
