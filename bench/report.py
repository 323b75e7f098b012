"""Turn results into README tables and a chart.

    python bench/report.py bench/results/cpu/*.json --markdown OUT.md --chart OUT.png
    python bench/report.py --records bench/results/records --markdown OUT.md
    python bench/report.py --gpu-check bench/results/gpu/DIR --markdown OUT.md
    python bench/report.py --paper bench/results/paper --markdown OUT.md

Benchmark JSONs are pytest-benchmark's `--benchmark-json` files written by bench/; every row's
speedup is the baseline's median over its own, within its benchmark group (same device, subject,
batch and, for routing, dtype). Record logs are bench/record.py's one-JSON-per-run files. A
gpu_check directory (bench/gpu_check.py) holds both, plus environment.json and steps.json: its
report is the environment, every step with its command and outcome, and the tables. Paper logs
are bench/paper.py's (the paper's tables: `paper_table`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


# --------------------------------------------------------------------------- benchmarks
def load_benchmarks(paths) -> list[dict]:
    """One row per benchmark that ran timed, with the speedup over its group's baseline."""
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        run = data.get("machine_info", {}).get("capsfast", {})
        for b in data.get("benchmarks", []):
            info = b.get("extra_info", {})
            if "impl" not in info:
                continue  # not one of ours
            rows.append(
                {
                    "file": str(path),
                    "device": info.get("device", run.get("device", "?")),
                    "commit": info.get("commit", run.get("commit", "unknown")),
                    "group": b["group"],
                    "subject": info["subject"],
                    "impl": info["impl"],
                    "dtype": info["dtype"],
                    "batch": info["batch"],
                    "baseline": bool(info.get("baseline")),
                    "median": info.get("median_s", b["stats"]["median"]),
                    "images_per_second": info.get("images_per_second"),
                    "gb_per_second": info.get("gb_per_second"),
                    "tflop_per_second": info.get("tflop_per_second"),
                    "matmul_fraction": info.get("matmul_fraction"),
                    "peak_memory_gb": info.get("peak_memory_gb"),
                }
            )
    base = {(r["file"], r["group"]): r["median"] for r in rows if r["baseline"]}
    for r in rows:
        b = base.get((r["file"], r["group"]))
        r["speedup"] = b / r["median"] if b else None
    return rows


def _time(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def _rate(r: dict) -> str:
    if r["images_per_second"] is not None:
        text = f"{r['images_per_second']:,.0f} img/s"
        if r["tflop_per_second"] is not None:
            text += f" ({r['tflop_per_second']:.3g} TFLOP/s"
            if r.get("matmul_fraction") is not None:
                text += f", {100 * r['matmul_fraction']:.3g}% of matmul"
            text += ")"
        return text
    if r["gb_per_second"] is not None:
        return f"{r['gb_per_second']:.3g} GB/s"
    return ""


def benchmark_table(rows: list[dict]) -> str:
    head = "| device | subject | impl | dtype | batch | median | throughput | speedup |"
    lines = [head, "|---|---|---|---|---:|---:|---:|---:|"]
    subjects = list(dict.fromkeys(r["subject"] for r in rows))  # order of first appearance
    key = lambda r: (r["device"], subjects.index(r["subject"]), r["batch"], r["dtype"], r["group"])
    for r in sorted(rows, key=lambda r: (*key(r), not r["baseline"], r["median"])):
        speedup = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(
            f"| {r['device']} | {r['subject']} | {r['impl']} | {r['dtype']} | {r['batch']} | "
            f"{_time(r['median'])} | {_rate(r)} | {speedup} |"
        )
    return "\n".join(lines) + "\n"


def speedup_chart(rows: list[dict], out: Path) -> None:
    """One panel per (device, subject): bars = paths, grouped by batch size; 1.0 = eager."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = defaultdict(list)
    for r in rows:
        if r["speedup"] is not None and not r["baseline"]:
            panels[(r["device"], r["subject"])].append(r)
    if not panels:
        raise SystemExit("report.py: no benchmark with a baseline to chart")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), squeeze=False)
    for ax, ((device, subject), rs) in zip(axes[:, 0], panels.items(), strict=True):
        batches = sorted({r["batch"] for r in rs})
        paths = list(dict.fromkeys(f"{r['impl']} {r['dtype']}" for r in rs))
        width = 0.8 / len(paths)
        for k, path in enumerate(paths):
            xs, ys = [], []
            for r in rs:
                if f"{r['impl']} {r['dtype']}" == path:
                    xs.append(batches.index(r["batch"]) + (k - (len(paths) - 1) / 2) * width)
                    ys.append(r["speedup"])
            ax.bar(xs, ys, width, label=path)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_ylabel("speedup over eager")
        ax.set_title(f"{subject} on {device}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- records
def load_records(directory) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))]


def spread(values: list[float]) -> dict:
    """mean, std (sample; 0 for one value), min, max, n."""
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def stats_table(records: list[dict], metrics=("test_accuracy", "wall_seconds")) -> str:
    """Mean, std, min and max over runs (seeds) of each metric, as a markdown table."""
    lines = ["| metric | n | mean | std | min | max |", "|---|---:|---:|---:|---:|---:|"]
    for m in metrics:
        values = [r[m] for r in records if r.get(m) is not None]
        if values:
            s = spread(values)
            lines.append(
                f"| {m} | {s['n']} | {s['mean']:.4g} | {s['std']:.2g} | {s['min']:.4g} | "
                f"{s['max']:.4g} |"
            )
    return "\n".join(lines) + "\n"


def records_table(records: list[dict]) -> str:
    """README's records table: one row per (preset, device, precision, routing, world size)."""
    groups = defaultdict(list)
    for r in records:
        key = (r["preset"], r["device"], r["mixed_precision"], r["routing"], r["world_size"])
        groups[key].append(r)
    lines = [
        "| preset | device | precision | routing | processes | seeds | test accuracy: mean ± std "
        "(min–max) | wall s: mean ± std (min–max) | commit |",
        "|---|---|---|---|---:|---:|---|---|---|",
    ]
    for (preset, device, mp, routing, world), rs in sorted(groups.items(), key=str):
        acc = spread([r["test_accuracy"] for r in rs])
        wall = spread([r["wall_seconds"] for r in rs])
        commits = ", ".join(sorted({r["commit"] for r in rs}))
        lines.append(
            f"| {preset} | {device} | {mp} | {routing} | {world} | {len(rs)} | "
            f"{100 * acc['mean']:.2f}% ± {100 * acc['std']:.2f} ({100 * acc['min']:.2f}–"
            f"{100 * acc['max']:.2f}) | {wall['mean']:.1f} ± {wall['std']:.1f} "
            f"({wall['min']:.1f}–{wall['max']:.1f}) | {commits} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- gpu_check directories
ENVIRONMENT_ROWS = (  # (label, environment.json key, format)
    ("device", "device", "{}"),
    ("driver", "driver_version", "{}"),
    ("compute capability", "compute_capability", "{}"),
    ("SMs", "sm_count", "{}"),
    ("memory", "memory_gb", "{:.1f} GB"),
    ("CUDA", "cuda", "{}"),
    ("cuDNN", "cudnn", "{}"),
    ("torch", "torch", "{}"),
    ("triton", "triton", "{}"),
    ("accelerate", "accelerate", "{}"),
    ("python", "python", "{}"),
    ("device copy (read + write)", "copy_gb_per_second", "{:,.0f} GB/s"),
    ("bf16 matmul", "bf16_matmul_tflop_per_second", "{:.3g} TFLOP/s"),
    ("fp32 matmul", "fp32_matmul_tflop_per_second", "{:.3g} TFLOP/s"),
    ("fp32 matmul precision", "fp32_matmul_precision", "{}"),
    ("date", "date", "{}"),
    ("commit", "commit", "{}"),
)


PROFILE_LINES = 16  # of profile.txt in the summary: its title and the top kernels


def environment_table(env: dict) -> str:
    lines = ["| | |", "|---|---|"]
    for label, key, fmt in ENVIRONMENT_ROWS:
        if env.get(key) is not None:
            lines.append(f"| {label} | {fmt.format(env[key])} |")
    if env.get("matmul_n"):
        n = env["matmul_n"]
        lines.append(
            f"| rates measured on | a {n}^3 matmul, a {env['copy_bytes'] / 1e6:,.0f} MB copy |"
        )
    return "\n".join(lines) + "\n"


def step_outcome(step: dict) -> str:
    """One cell: what a step found (counts, accuracy, epoch time) or why it did not."""
    r = step.get("results") or {}
    parts = []
    if "tests" in r:
        parts.append(
            f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, "
            f"{r['skipped']} skipped in {r['pytest_seconds']:.0f} s"
        )
    if "benchmarks" in r:
        parts.append(f"{r['benchmarks']} timed rows")
    if "unreadable" in r:
        parts.append(f"unreadable: {r['unreadable']}")
    if r.get("test_accuracy") is not None:
        parts.append(f"test accuracy {100 * r['test_accuracy']:.2f}% after {r['steps']} steps")
        parts.append(f"wall {r['wall_seconds']:.1f} s")
        if r.get("images_per_second"):
            parts.append(f"{r['images_per_second']:,.0f} img/s")
        if r.get("steady_epoch_seconds"):
            parts.append(f"epoch {r['steady_epoch_seconds']:.2f} s at that rate")
        if r.get("first_epoch_seconds") is not None:
            parts.append(f"first epoch {r['first_epoch_seconds']:.1f} s from process start")
    if step.get("reason"):
        parts.append(step["reason"])
    return "; ".join(parts)


def steps_table(steps: list[dict]) -> str:
    lines = [
        "| step | what | status | seconds (estimate) | outcome | command |",
        "|---|---|---|---:|---|---|",
    ]
    for s in steps:
        seconds = "" if s.get("seconds") is None else f"{s['seconds']:.0f}"
        lines.append(
            f"| {s['name']} | {s['what']} | {s['status']} | {seconds} ({s['estimate_s']:.0f}) | "
            f"{step_outcome(s)} | `{s['command']}` |"
        )
    return "\n".join(lines) + "\n"


def load_gpu_check(directory) -> dict:
    """steps.json, environment.json, the benchmark rows and the record logs of a directory."""
    d = Path(directory)
    if not (d / "steps.json").is_file():
        raise SystemExit(f"report.py: {d} holds no steps.json: not a bench/gpu_check.py result")
    run = json.loads((d / "steps.json").read_text())
    env_path = d / "environment.json"
    readable = [p for p in sorted(d.glob("bench_*.json")) if _is_json(p)]  # a step killed mid-write
    return {
        "run": run,
        "environment": json.loads(env_path.read_text()) if env_path.is_file() else None,
        "benchmarks": load_benchmarks(readable),
        "records": load_records(d / "records") if (d / "records").is_dir() else [],
    }


def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except json.JSONDecodeError:
        return False


def render_gpu_check(directory) -> str:
    """The directory's summary.md: what ran, what was skipped and why, every figure."""
    data = load_gpu_check(directory)
    run, env = data["run"], data["environment"]
    steps = run["steps"]
    device = (env or {}).get("device", "unknown device")
    dry = run["plan"] == "dry-run"
    title = "GPU check, dry run on CPU (its figures time tiny problems)" if dry else "GPU check"
    statuses = ("ok", "stopped", "skipped", "failed")
    by_status = {k: [s["name"] for s in steps if s["status"] == k] for k in statuses}
    parts = [
        f"# {title}: {device}, commit {run['commit']}\n",
        f"`{run['command']}`, started {run['started']}, {run['seconds']:.0f} s of a "
        f"{run['budget_s']:.0f} s budget"
        + (" (interrupted)" if run.get("interrupted") else "")
        + ".\n",
        "".join(f"- {k}: {', '.join(v)}\n" for k, v in by_status.items() if v),
        "## Environment\n",
        environment_table(env) if env else "environment.json missing: the step did not finish\n",
        "## Steps\n",
        "Each step's log is in logs/; estimates are the plan's guesses, seconds what it took.\n",
        steps_table(steps),
    ]
    ran = [s for s in steps if s["status"] != "skipped"]
    if data["benchmarks"]:
        commands = [s["command"] for s in ran if s["name"].startswith("bench_")]
        parts += [
            "## Benchmarks (median round)\n",
            "".join(f"`{c}`\n\n" for c in commands),
            benchmark_table(data["benchmarks"]),
        ]
    if data["records"]:
        commands = [s["command"] for s in ran if s["name"].startswith("record_")]
        parts += [
            "## Record runs\n",
            "".join(f"`{c}`\n\n" for c in commands),
            records_table(data["records"]),
        ]
    profile = Path(directory) / "profile.txt"
    if profile.is_file():
        head = profile.read_text().splitlines()[:PROFILE_LINES]
        parts += ["## Profile (the top of profile.txt)\n", "```\n" + "\n".join(head) + "\n```\n"]
    return "\n".join(parts)


# --------------------------------------------------------------------------- the paper's tables
def _paper_rows():
    try:  # imported as bench.report (tests) or as a script beside paper.py
        from bench.paper import ROWS
    except ImportError:
        from paper import ROWS
    return ROWS


def _percent(values: list[float]) -> str:
    s = spread(values)
    return (
        f"{100 * s['mean']:.2f}% ± {100 * s['std']:.2f}"
        if s["n"] > 1
        else f"{100 * s['mean']:.2f}%"
    )


def paper_table(logs: list[dict]) -> str:
    """README's "Paper reproduction" table: every row of bench/paper.py (Table 1's MNIST and
    MultiMNIST columns, section 5.2's affNIST), the paper's figure beside ours from the logs of
    bench/paper.py (test error, mean ± std over seeds; affNIST: accuracy, and the expanded-MNIST
    test accuracy it was reached at). Rows without logs say "not run"."""
    lines = [
        "| experiment | row | paper | ours | seeds | test images | steps (epochs) | training budget "
        "| device | commit |",
        "|---|---|---|---|---:|---:|---|---|---|---|",
    ]
    for row in _paper_rows():
        rs = [r for r in logs if r.get("experiment") == row.experiment and r.get("row") == row.name]
        if not rs:
            lines.append(f"| {row.experiment} | {row.name} | {row.paper} | not run | 0 | | | | | |")
            continue
        if row.experiment == "affnist":
            ours = (f"{_percent([r['affnist_accuracy'] for r in rs])} (at "
                    f"{_percent([r['test_accuracy'] for r in rs])})")  # fmt: skip
            sizes = f"{rs[0]['test_size']:,} + {rs[0]['affnist_size']:,}"
        else:
            ours = _percent([1 - r["test_accuracy"] for r in rs])
            sizes = f"{rs[0]['test_size']:,}"
        steps = spread([r["steps"] for r in rs])
        epochs = spread([r["epochs"] for r in rs])
        budgets = sorted({r.get("budget_s") for r in rs}, key=str)
        budget = ", ".join("none" if b is None else f"{b:g} s" for b in budgets)
        lines.append(
            f"| {row.experiment} | {row.name} | {row.paper} | {ours} | {len(rs)} | {sizes} | "
            f"{steps['mean']:,.0f} ({epochs['mean']:.2g}) | {budget} | "
            f"{', '.join(sorted({r['device'] for r in rs}))} | "
            f"{', '.join(sorted({r['commit'] for r in rs}))} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", help="pytest-benchmark JSON files from bench/")
    parser.add_argument("--records", help="directory of bench/record.py run logs")
    parser.add_argument("--gpu-check", help="a bench/gpu_check.py result directory")
    parser.add_argument("--paper", help="directory of bench/paper.py run logs (paper's tables)")
    parser.add_argument("--markdown", help="write the table(s) here (default: print)")
    parser.add_argument("--chart", help="PNG of each path's speedup over the eager baseline")
    args = parser.parse_args(argv)
    if not args.results and not args.records and not args.gpu_check and not args.paper:
        parser.error("give benchmark JSON files, --records DIR, --gpu-check DIR and/or --paper DIR")

    parts = []
    if args.gpu_check:
        parts.append(render_gpu_check(args.gpu_check))
    if args.results:
        rows = load_benchmarks(args.results)
        if not rows:
            parser.error("no timed capsfast benchmarks in those files (run with --benchmark-only)")
        parts.append(benchmark_table(rows))
        if args.chart:
            speedup_chart(rows, Path(args.chart))
    if args.records:
        records = load_records(args.records)
        if not records:
            parser.error(f"no record logs (*.json) in {args.records}")
        parts.append(records_table(records))
    if args.paper:
        parts.append(paper_table(load_records(args.paper)))
    text = "\n".join(parts)
    if args.markdown:
        Path(args.markdown).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
