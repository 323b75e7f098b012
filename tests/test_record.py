"""bench/record.py (fresh-process record runs, one JSON log each) and bench/report.py (README
tables and chart), end to end on CPU with tiny runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from bench.report import benchmark_table, load_benchmarks, spread
from bench.report import main as report_main

ROOT = Path(__file__).resolve().parent.parent
SUMMARY_KEYS = {
    "test_accuracy", "test_size", "best_val_accuracy", "final_train_loss", "steps", "epochs",
    "world_size", "wall_seconds", "images_per_second", "device", "mixed_precision", "routing",
    "preset", "seed", "config", "commit", "torch", "triton", "peak_memory_gb", "skipped_steps",
}  # fmt: skip
TINY = ["--max-steps", "3", "--batch-size", "8", "--val-size", "16", "--test-size", "16"]
TINY += ["--no-compile"]  # the CPU default compiles: 15 s a run
# What is recorded does not depend on the model's size: a small CapsNet, no figures (the
# precision stays the CPU's default, which the records table reports).
TINY += ["--primary-types", "2", "--no-figures"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Two seeds of a tiny `fast` run through `accelerate launch`, as a user would record them."""
    tmp = tmp_path_factory.mktemp("record")
    out, runs = tmp / "records", tmp / "runs"
    cmd = [sys.executable, "bench/record.py", "--preset", "fast", "--seeds", "2", "--out", str(out)]
    cmd += ["--runs-dir", str(runs), *TINY, "--report-to", "none", "--cpu-threads", "2"]
    env = {**os.environ, "CAPSFAST_COMMIT": "abc1234", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logs = sorted(out.glob("*.json"))
    return proc.stdout, [json.loads(p.read_text()) for p in logs], out, runs


def test_record_writes_one_well_formed_log_per_seed(recorded):
    _, records, out, runs = recorded
    assert sorted(r["seed"] for r in records) == [0, 1]
    assert len(list(out.iterdir())) == 2, "the log directory holds the run logs and nothing else"
    for r in records:
        assert SUMMARY_KEYS <= set(r), f"missing summary keys {SUMMARY_KEYS - set(r)}"
        assert r["preset"] == "fast" and r["steps"] == 3 and r["test_size"] == 16
        assert r["commit"] == "abc1234"  # from CAPSFAST_COMMIT, as on a copy without .git
        assert isinstance(r["compile_cache_warm"], bool)
        datetime.strptime(r["date"], "%Y-%m-%dT%H:%M:%SZ")
        epochs = [m for m in r["metrics"] if m["kind"] == "epoch"]
        assert epochs and all("val_accuracy" in m and "step" in m for m in epochs)
        assert epochs[-1]["step"] == 3 and r["metrics"][-1]["step"] == 3
        # The log is the run's summary.json plus metrics, not a second measurement.
        run_dir = runs / f"fast-seed{r['seed']}"  # one directory per preset and seed
        summary = json.loads((run_dir / "summary.json").read_text())
        assert {k: r[k] for k in summary} == summary
        assert 0 < r["wall_seconds"] <= r["process_seconds"]
        assert [a["exit_code"] for a in r["attempts"]] == [0]
        assert r["machine"]["cpu_count"] >= 1 and "cpu_flags" in r["machine"]


def test_record_refuses_an_earlier_run_and_goes_on_with_it_on_resume(recorded, tmp_path):
    """A record's directory is its preset and seed: a second start is refused (nothing of the
    first is touched); --resume goes on with it (the trainer's --resume auto) and the log adds
    up the time of every attempt."""
    _, _, out, runs = recorded
    cmd = [sys.executable, "bench/record.py", "--preset", "fast", "--seeds", "1",
           "--out", str(tmp_path), "--runs-dir", str(runs), *TINY, "--report-to", "none",
           "--cpu-threads", "2"]  # fmt: skip
    env = {**os.environ, "CAPSFAST_COMMIT": "abc1234", "WANDB_MODE": "disabled"}
    before = (runs / "fast-seed0" / "summary.json").read_text()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr
    assert "holds an earlier record run: pass --resume to go on with it" in proc.stderr
    assert (runs / "fast-seed0" / "summary.json").read_text() == before
    proc = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (log,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert "--resume" in log["command"] and len(log["attempts"]) == 2
    assert log["process_seconds"] == pytest.approx(
        sum(a["process_seconds"] for a in log["attempts"])
    )
    assert log["steps"] == 3  # the finished run was resumed, not trained again


def test_record_prints_the_spread_over_seeds(recorded):
    stdout, records, _, _ = recorded
    for metric in ("test_accuracy", "wall_seconds"):
        s = spread([r[metric] for r in records])
        row = re.search(
            rf"^\| {metric} \| (\d+) \| (\S+) \| (\S+) \| (\S+) \| (\S+) \|$", stdout, re.M
        )
        assert row, f"no {metric} row in:\n{stdout}"
        n, mean, std, lo, hi = row.groups()
        assert int(n) == 2
        assert float(mean) == pytest.approx(s["mean"], rel=1e-3)
        assert float(std) == pytest.approx(s["std"], rel=1e-1, abs=1e-9)
        assert (float(lo), float(hi)) == pytest.approx((s["min"], s["max"]), rel=1e-3)


def test_record_refuses_flags_it_owns():
    proc = subprocess.run(
        [sys.executable, "bench/record.py", "--seeds", "1", "--seed", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,  # a refusal, not a training run
    )
    assert proc.returncode == 2 and "--seed is set by record.py" in proc.stderr


def test_report_renders_the_records_table(recorded, tmp_path):
    _, records, out, _ = recorded
    md = tmp_path / "records.md"
    assert report_main(["--records", str(out), "--markdown", str(md)]) == 0
    lines = md.read_text().splitlines()
    assert len(lines) == 3, "header, rule, one row: both seeds share preset, device, precision"
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    acc = spread([r["test_accuracy"] for r in records])
    from capsfast.runtime import cpu_has_native_bf16

    precision = "bf16" if cpu_has_native_bf16() else "no"  # the CPU's default (no flag given)
    assert cells[:6] == ["fast", records[0]["device"], precision, "torch", "1", "2"]
    assert cells[6].startswith(f"{100 * acc['mean']:.2f}% ± {100 * acc['std']:.2f}")
    assert cells[-1] == "abc1234"


def fake_results(path: Path, device: str = "test-device") -> Path:
    """A pytest-benchmark JSON as bench/ writes it: one group, an eager baseline and a faster
    path, plus a routing row with GB/s."""

    def bench(group, impl, median, baseline, **rates):
        info = {"device": device, "subject": group.split(" B=")[0], "impl": impl, "dtype": "fp32"}
        info.update(batch=8, baseline=baseline, **rates)
        return {
            "group": group,
            "name": f"t[{impl}]",
            "extra_info": info,
            "stats": {"median": median},
        }

    data = {
        "machine_info": {"capsfast": {"device": device, "commit": "abc1234"}},
        "benchmarks": [
            bench("train_step B=8", "eager/torch", 0.2, True, images_per_second=40.0),
            bench("train_step B=8", "compiled/torch", 0.05, False, images_per_second=160.0),
            bench("route fwd B=8", "eager", 0.004, True, gb_per_second=2.5),
            {"group": None, "name": "someone_elses", "extra_info": {}, "stats": {"median": 1.0}},
        ],
    }
    path.write_text(json.dumps(data))
    return path


def test_report_renders_the_benchmark_table_and_chart(tmp_path):
    results = fake_results(tmp_path / "results.json")
    rows = load_benchmarks([results])
    assert len(rows) == 3  # the benchmark without our extra_info is not ours
    table = benchmark_table(rows)
    assert (
        "| test-device | train_step | compiled/torch | fp32 | 8 | 50 ms | 160 img/s | 4.00x |"
        in table
    )
    assert (
        "| test-device | train_step | eager/torch | fp32 | 8 | 200 ms | 40 img/s | 1.00x |" in table
    )
    assert "| test-device | route fwd | eager | fp32 | 8 | 4 ms | 2.5 GB/s | 1.00x |" in table
    md, png = tmp_path / "table.md", tmp_path / "chart.png"
    assert report_main([str(results), "--markdown", str(md), "--chart", str(png)]) == 0
    assert md.read_text() == table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_breakdown_times_every_row_against_the_matmul_rate(tmp_path):
    """bench/cpu_breakdown.py: one JSON with every row's rate as a fraction of the matmul rate
    measured in the same run (the matmul row itself is 1), and what measured it."""
    from bench.cpu_breakdown import main as breakdown

    out = tmp_path / "breakdown.json"
    # The compiled rows are left out here (a minute of inductor); their code is the same call.
    assert breakdown(["--batch", "2", "--repeats", "1", "--out", str(out), "--no-compile"]) == 0
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["matmul 4096^3"]["matmul_fraction"] == 1.0
    assert {
        "conv1 forward",
        "primarycaps forward+backward",
        "train step (whole model, Adam)",
        "train step, PrimaryCaps input channels_last",
        "train step, bf16 autocast",
        "train step, fused Adam",
    } <= set(rows)
    assert not any("compile" in name for name in rows)
    for r in report["rows"]:
        assert r["median_s"] > 0 and r["gflop"] > 0 and 0 < r["matmul_fraction"] < 10, r
    assert report["batch"] == 2 and report["commit"] and len(report["load_average"]) == 3


def _fake_record(tmp_path, test_accuracy: float) -> Path:
    """A record log as bench/record.py writes it, around an exported (untrained) model."""
    import torch

    from capsfast.export import save_model
    from capsfast.model import CapsNet

    torch.manual_seed(0)
    save_model(CapsNet(), tmp_path / "run" / "model", meta={"dataset": "mnist"})
    log = {"test_accuracy": test_accuracy, "test_size": 10000, "preset": "cpu-record", "seed": 0,
           "device": "cpu", "cpu_threads": 2, "mixed_precision": "bf16",
           "precision": "bf16 autocast", "steps": 40, "epochs": 0.1, "parameters": 8215728,
           "best_val_accuracy": 0.1, "commit": "abc1234", "torch": "2.x",
           "config": {"output_dir": str(tmp_path / "run"), "batch_size": 128, "epochs": 10},
           "metrics": [{"kind": "epoch", "epoch": e, "step": 429 * e,
                        "test_accuracy": 0.98 + e / 1000} for e in (1, 2, 3)],
           "command": ["python", "bench/record.py", "--preset", "cpu-record"],
           "machine": {"cpu_model": "a CPU", "cpu_count": 2}, "process_seconds": 600.0}  # fmt: skip
    path = tmp_path / "log.json"
    path.write_text(json.dumps(log))
    return path


def test_ship_model_stores_float16_measures_it_and_writes_the_card(tmp_path):
    """bench/ship_model.py: float16 weights, re-measured, refused when they fall below the
    record's own figure by more than --max-drop, a card from the log."""
    from safetensors import safe_open

    log = _fake_record(tmp_path, test_accuracy=0.0)  # an untrained model cannot fall below 0
    out = tmp_path / "shipped"
    cmd = [sys.executable, "bench/ship_model.py", str(log), "--name", "mnist", "--out", str(out),
           "--test-size", "200"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    meta = json.loads((out / "config.json").read_text())["meta"]
    card = (out / "README.md").read_text()
    assert 0 <= meta["test_accuracy"] <= 1 and meta["record_test_accuracy"] == 0.0
    assert "on 200 test images" in card and "--preset cpu-record" in card
    log.write_text(log.read_text().replace('"test_accuracy": 0.0', '"test_accuracy": 1.0', 1))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not shipped as is" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_record_plot_draws_our_epochs_beside_the_public_curves(tmp_path):
    from bench.record_plot import epoch_curve
    from bench.record_plot import main as plot_main

    log = _fake_record(tmp_path, test_accuracy=0.99)
    assert epoch_curve(json.loads(log.read_text())) == [(1, 98.1), (2, 98.2), (3, 98.3)]
    png = tmp_path / "curve.png"
    assert plot_main([str(log), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bare = json.loads(log.read_text())
    bare["metrics"] = [{"kind": "epoch", "epoch": 1, "step": 429, "val_accuracy": 0.9}]
    log.write_text(json.dumps(bare))
    from capsfast.errors import UserError

    with pytest.raises(
        UserError, match="no per-epoch test accuracy: train with --test-every-epoch"
    ):
        plot_main([str(log), "--out", str(png)])
