"""The whole GPU record in one command, in priority order, under a wall-clock budget.

    python bench/gpu_check.py                         # on the GPU machine, 480 s by default
    python bench/gpu_check.py --dry-run --out DIR     # the same plan on CPU, tiny (CI)

Each step is one command, run as a subprocess in its own process group:
  environment       bench/environment.py: device, driver, versions, copy GB/s, matmul TFLOP/s
  kernel_tests      the kernel test modules, natively on CUDA: pass/fail counts and time
  bench_routing     bench/test_routing.py at B=512 bf16, fwd and fwd+bwd: eager, compiled,
                    triton, fused
  bench_train_step  bench/test_train_step.py at B=128 and 512: every bf16 path (eager, compiled,
                    triton, fused) and the eager fp32 baseline
  record_fast_seedK bench/record.py --preset fast, one seed a command, while the budget allows
  record_paper      bench/record.py --preset paper --epochs 1: the paper recipe's epoch time
  profile           bench/profile_step.py: top kernels of one compiled training step

The budget: before a step starts, its estimate is compared with what is left; a step that does
not fit is skipped and recorded with the reason. A running step is stopped when it reaches what
is left (or its own limit): SIGINT first, so pytest still writes its reports and the benchmark
JSON of what finished, SIGKILL after a grace period. The estimates are guesses until a GPU run
has been taken: steps.json records what each step really took.

Everything goes to --out (default bench/results/gpu/<date>_<device>_<commit>/), small enough to
commit: environment.json, kernel_tests.xml, bench_*.json (pytest-benchmark) and bench_*.xml,
records/ (bench/record.py logs), profile.txt, logs/ (each command's output, tail kept),
steps.json and summary.md (bench/report.py --gpu-check renders it). Trainer outputs (models,
checkpoints: tens of MB a run) go to a temporary directory, removed at the end.

--dry-run runs the same plan on CPU: the benchmarks time the tiny sizes of the disabled mode
(CAPSFAST_BENCH_TINY=1), the Triton kernels run under the interpreter, training takes 3 steps,
and each step has a tiny budget. Its figures mean nothing; it proves the command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: bench.report, capsfast

from bench.report import render_gpu_check  # noqa: E402
from capsfast.errors import UserError, run_main  # noqa: E402
from capsfast.provenance import git_commit  # noqa: E402

KERNEL_TESTS = ("tests/test_routing_triton.py", "tests/test_digit_caps_fused.py")
KERNEL_TESTS_IF_PRESENT = ("tests/test_kernel_compile.py",)
# bench/test_routing.py's ids are impl-pass-dtype-batch: `test_route[triton-fwd+bwd-bf16-512]`.
ROUTING_SELECTION = "bf16-{batch}]"
TRAIN_STEP_VARIANTS = (
    "eager-fp32-torch",  # the baseline every speedup divides by
    "eager-bf16-torch",
    "compiled-bf16-torch",
    "eager-bf16-triton",
    "compiled-bf16-triton",
    "eager-bf16-fused",
    "compiled-bf16-fused",
)
MAX_FAST_SEEDS = 5  # README's record: fast over 5 seeds
RESERVE_S = 3  # kept back for steps.json and summary.md
LOG_MAX_BYTES = 200_000  # a step's log keeps its first lines and this much of its tail


@dataclass
class Plan:
    """What differs between the GPU run and the dry run: sizes, selections, estimates."""

    budget_s: float
    batches: tuple[int, ...]  # of the train step benchmark
    routing_selection: str
    train_step_variants: tuple[str, ...]
    estimates_s: dict[str, float]  # guesses until a GPU run is recorded
    limit_factor: float  # a step may take this times its estimate (never more than is left)
    limits_s: dict[str, float]  # fixed limits instead, by step
    grace_s: float  # a stopped step's time from SIGINT (pytest writes its reports) to SIGKILL
    trainer_flags: tuple[str, ...]  # for every record run
    paper_flags: tuple[str, ...]
    max_fast_seeds: int
    profile_flags: tuple[str, ...]


GPU_PLAN = Plan(
    budget_s=480,
    batches=(128, 512),
    routing_selection=ROUTING_SELECTION.format(batch=512),
    train_step_variants=TRAIN_STEP_VARIANTS,
    estimates_s={
        "environment": 30,
        "kernel_tests": 90,
        "bench_routing": 90,
        "bench_train_step": 200,
        "record_fast": 120,  # the first seed; later seeds: what the one before took
        "record_paper": 90,
        "profile": 60,
    },
    limit_factor=2.5,
    limits_s={},
    grace_s=15,
    trainer_flags=("--report-to", "none"),
    paper_flags=("--epochs", "1"),
    max_fast_seeds=MAX_FAST_SEEDS,
    profile_flags=("--batch", "512", "--dtype", "bf16", "--routing", "triton"),
)
# CPU: the first CPU batch of each benchmark (bench/common.py's tiny sizes); fp32 and forward
# passes only where bf16 or a backward pass would add a minute (bf16 is emulated on many CPUs).
# The Triton rows of bench/test_routing.py are left out: that file times the full I=1152
# whenever timing is on, and under the interpreter that costs minutes a row (CI runs them
# untimed, at tiny size). The kernel tests and the profile run the interpreter.
DRY_RUN_PLAN = Plan(
    budget_s=165,
    batches=(8,),
    routing_selection=ROUTING_SELECTION.format(batch=8) + " and (eager-fwd- or compiled-fwd-)",
    train_step_variants=("eager-fp32-torch", "compiled-fp32-torch"),
    estimates_s={
        "environment": 10,
        "kernel_tests": 15,
        "bench_routing": 20,
        "bench_train_step": 20,
        "record_fast": 20,
        "record_paper": 20,
        "profile": 20,
    },
    # A loaded machine runs every step slower: better finish the first ones than stop them all.
    limit_factor=10,
    limits_s={"kernel_tests": 15},  # the interpreter needs 6 minutes for all: stopped here
    grace_s=5,
    trainer_flags=(
        *("--report-to", "none", "--max-steps", "3", "--batch-size", "8"),
        *("--val-size", "16", "--test-size", "16", "--cpu-threads", "2"),
        "--no-compile",  # the CPU default compiles: 15 s a run, for a dry run's 3 steps
    ),
    paper_flags=(),
    max_fast_seeds=2,
    profile_flags=("--batch", "2", "--dtype", "fp32", "--routing", "triton"),  # bf16: slow
)


@dataclass
class Step:
    name: str
    what: str
    command: list[str]
    estimate_s: float
    outputs: list[str] = field(default_factory=list)  # relative to --out
    status: str = "pending"  # ok | failed | stopped | skipped
    reason: str = ""
    seconds: float | None = None
    limit_s: float | None = None
    returncode: int | None = None
    results: dict = field(default_factory=dict)

    def record(self, show) -> dict:
        d = asdict(self)
        d["command"] = show(self.command)
        return d


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed() - RESERVE_S


# --------------------------------------------------------------------------- running a step
def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass  # already gone


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGINT to the whole group, so pytest stops and writes its reports; again halfway through
    the grace period (an interrupt that lands inside the Triton interpreter fails only the test
    it hit, and pytest goes on with the next); SIGKILL at its end."""
    for _ in range(2):
        _kill_group(proc, signal.SIGINT)
        try:
            proc.wait(timeout=grace_s / 2)
            break
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc, signal.SIGKILL)  # also whatever the command left behind
    proc.wait()


def shown(command: list[str], out: Path, runs: Path) -> str:
    """A command as the results show it: no absolute paths of this machine."""
    text = shlex.join(command).replace(sys.executable, "python").replace(str(runs), "$RUNS")
    return text.replace(str(out.resolve()), "$OUT").replace(str(ROOT) + os.sep, "")


def run_command(command: list[str], log: Path, timeout_s: float, grace_s: float, env, show):
    """(returncode, stopped): the command in its own process group, output to `log`."""
    with log.open("w") as f:
        f.write(f"$ {show(command)}\n")
        f.flush()
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=max(1.0, timeout_s))
            _kill_group(proc, signal.SIGKILL)  # stray children (compile workers) go too
            return proc.returncode, False
        except subprocess.TimeoutExpired:
            _stop(proc, grace_s)
            return proc.returncode, True
        except KeyboardInterrupt:
            _stop(proc, grace_s)
            raise


def trim_log(log: Path, head_lines: int = 20) -> None:
    """Keep a log small enough to commit: its first lines (the command) and its tail."""
    data = log.read_bytes()
    if len(data) <= LOG_MAX_BYTES:
        return
    head = b"".join(data.splitlines(keepends=True)[:head_lines])
    tail = data[-LOG_MAX_BYTES:]
    cut = len(data) - len(head) - len(tail)
    log.write_bytes(head + f"\n[... {cut} bytes cut ...]\n".encode() + tail)


def run_step(step: Step, out: Path, budget: Budget, plan: Plan, env: dict, show) -> Step:
    """Skip (with the reason) if the estimate does not fit; else run, stopped at its limit."""
    left = budget.left()
    if step.estimate_s > left:
        step.status = "skipped"
        step.reason = (
            f"needs about {step.estimate_s:.0f} s, {max(0.0, left):.0f} s of the budget left"
        )
        print(f"gpu_check: {step.name}: skipped: {step.reason}", flush=True)
        return step
    limit = plan.limits_s.get(step.name, plan.limit_factor * step.estimate_s)
    step.limit_s = min(left - plan.grace_s, limit)
    print(f"gpu_check: {step.name} (limit {step.limit_s:.0f} s): {show(step.command)}")
    sys.stdout.flush()
    log = out / "logs" / f"{step.name}.log"
    t0 = time.monotonic()
    try:
        step.returncode, stopped = run_command(
            step.command, log, step.limit_s, plan.grace_s, env, show
        )
    finally:
        step.seconds = time.monotonic() - t0
        trim_log(log)
    step.outputs.append(str(log.relative_to(out)))
    missing = [p for p in step.outputs if not (out / p).exists()]
    if stopped:
        step.status = "stopped"
        step.reason = f"reached its limit of {step.limit_s:.0f} s"
        if step.command[1:3] == ["-m", "pytest"]:
            step.reason += " (the test it stopped in may count as failed)"
    elif step.returncode != 0:
        step.status = "failed"
        step.reason = f"exit code {step.returncode}: see {log.relative_to(out)}"
    elif missing:
        step.status = "failed"
        step.reason = f"wrote no {', '.join(missing)}: see {log.relative_to(out)}"
    else:
        step.status = "ok"
    why = f": {step.reason}" if step.reason else ""
    print(f"gpu_check: {step.name}: {step.status} in {step.seconds:.0f} s{why}")
    sys.stdout.flush()
    return step


# --------------------------------------------------------------------------- what a step found
def junit_counts(path: Path) -> dict:
    """pytest's junit XML -> tests, passed, failed, errors, skipped, seconds."""
    if not path.exists():
        return {}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:  # killed while writing it
        return {"unreadable": f"{path.name}: {e}"}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {
        "tests": n["tests"],
        "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
        "failed": n["failures"],
        "errors": n["errors"],
        "skipped": n["skipped"],
        "pytest_seconds": float(suite.get("time", 0.0)),
    }


def pytest_step(name, what, paths, out, estimate, selection=None, benchmark=False) -> Step:
    xml = f"{name}.xml"
    command = [sys.executable, "-m", "pytest", *paths, "-q", "-p", "no:cacheprovider", "-rfE"]
    command += [f"--junitxml={out / xml}"]
    outputs = [xml]
    if selection:
        command += ["-k", selection]
    if benchmark:
        command += ["--benchmark-only", f"--benchmark-json={out / name}.json"]
        outputs.append(f"{name}.json")
    return Step(name, what, command, estimate, outputs=outputs)


def pytest_results(step: Step, out: Path) -> None:
    step.results = junit_counts(out / f"{step.name}.xml")
    bench_json = out / f"{step.name}.json"
    try:
        step.results["benchmarks"] = len(json.loads(bench_json.read_text())["benchmarks"])
    except FileNotFoundError:
        pass
    except (json.JSONDecodeError, KeyError) as e:  # killed while writing it
        step.results["unreadable"] = f"{bench_json.name}: {e}"
    if step.status == "failed" and step.results.get("tests") == 0:
        step.reason = "no tests ran (selection matched nothing?): " + step.reason


def record_step(preset: str, seed: int, plan: Plan, out: Path, runs: Path, estimate: float):
    name = f"record_{preset}" + (f"_seed{seed}" if preset == "fast" else "")
    flags = plan.paper_flags if preset == "paper" else ()
    command = [sys.executable, "bench/record.py", "--preset", preset, "--first-seed", str(seed)]
    command += ["--seeds", "1", "--launcher", "python", "--out", str(out / "records")]
    command += ["--runs-dir", str(runs), *plan.trainer_flags, *flags]
    what = f"bench/record.py --preset {preset}, seed {seed}" + (" (one epoch)" if flags else "")
    return Step(name, what, command, estimate)


def record_results(step: Step, out: Path, before: set[Path]) -> None:
    """The new log in records/: accuracy, wall time, images/s, epoch times."""
    new = sorted(set((out / "records").glob("*.json")) - before)
    if not new:
        return
    log = json.loads(new[-1].read_text())
    step.outputs.append(str(new[-1].relative_to(out)))
    ips = log.get("images_per_second")
    train_size = log.get("config", {}).get("resolved", {}).get("train_size")
    step.results = {
        "test_accuracy": log.get("test_accuracy"),
        "wall_seconds": log.get("wall_seconds"),
        "process_seconds": log.get("process_seconds"),
        "images_per_second": ips,
        "steps": log.get("steps"),
        "epochs": log.get("epochs"),
        # The first epoch's time counts from process start: imports, compilation, evaluation.
        "first_epoch_seconds": next(  # the first epoch record (train records come between)
            (m.get("epoch_seconds") for m in log.get("metrics") or [] if m.get("kind") == "epoch"),
            None,
        ),
        # An epoch at the steady rate (from step 3 on, evaluation excluded).
        "steady_epoch_seconds": train_size / ips if ips and train_size else None,
        "compile_cache_warm": log.get("compile_cache_warm"),
    }


# --------------------------------------------------------------------------- the plan
def default_out(dry_run: bool, commit: str) -> Path:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    if dry_run:
        return ROOT / "runs" / "gpu_check_dry_run" / f"{date}_{commit}"
    import torch

    device = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    return ROOT / "bench" / "results" / "gpu" / f"{date}_{device}_{commit}"


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="bench/gpu_check.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--budget-s", type=float, help="wall-clock budget in seconds (480; dry run 165)"
    )
    parser.add_argument("--out", help="result directory (may exist, must hold no earlier result)")
    parser.add_argument("--dry-run", action="store_true", help="the same plan on CPU, tiny")
    args = parser.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise UserError(
            "no CUDA device: this command takes the GPU record; on CPU pass --dry-run (tiny)"
        )
    plan = DRY_RUN_PLAN if args.dry_run else GPU_PLAN
    budget = Budget(args.budget_s or plan.budget_s)
    commit = git_commit()
    out = Path(args.out) if args.out else default_out(args.dry_run, commit)
    if (out / "steps.json").exists():
        raise UserError(f"{out} already holds a gpu_check result: choose another --out")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "records").mkdir(exist_ok=True)
    runs_dir = tempfile.TemporaryDirectory(prefix="capsfast-gpu-check-")
    runs = Path(runs_dir.name)
    show = lambda command: shown(command, out, runs)
    env = {
        **os.environ,
        "CAPSFAST_COMMIT": commit,  # a copy without .git still names its commit
        "WANDB_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
        "CAPSFAST_BENCH_TINY": "1" if args.dry_run else "0",
    }
    est = plan.estimates_s
    kernel_tests = [*KERNEL_TESTS, *(p for p in KERNEL_TESTS_IF_PRESENT if (ROOT / p).exists())]
    batch_ids = " or ".join(f"-{b}]" for b in plan.batches)
    variant_ids = " or ".join(plan.train_step_variants)
    steps: list[Step] = []
    header = {
        "plan": "dry-run" if args.dry_run else "gpu",
        "budget_s": budget.seconds,
        "commit": commit,
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": show(
            ["python", "bench/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    print(f"gpu_check: {header['plan']} plan, budget {budget.seconds:.0f} s, commit {commit}")
    print(f"gpu_check: results in {out}", flush=True)
    if commit == "unknown":
        print(
            "gpu_check: warning: commit unknown (no .git here): export "
            "CAPSFAST_COMMIT=$(git rev-parse --short HEAD) before copying the repository",
            flush=True,
        )

    def run(step: Step) -> Step:
        steps.append(step)
        return run_step(step, out, budget, plan, env, show)

    status = 0
    try:
        run(
            Step(
                "environment",
                "device, driver, versions; copy GB/s, bf16 and fp32 matmul TFLOP/s",
                [sys.executable, "bench/environment.py", "--out", str(out / "environment.json")],
                est["environment"],
                outputs=["environment.json"],
            )
        )
        for step in (
            pytest_step(
                "kernel_tests",
                "the kernel test modules: " + " ".join(kernel_tests),
                kernel_tests,
                out,
                est["kernel_tests"],
            ),
            pytest_step(
                "bench_routing",
                f"routing and DigitCaps benchmarks, -k '{plan.routing_selection}'",
                ["bench/test_routing.py"],
                out,
                est["bench_routing"],
                selection=plan.routing_selection,
                benchmark=True,
            ),
            pytest_step(
                "bench_train_step",
                f"training step benchmarks, batches {', '.join(map(str, plan.batches))}",
                ["bench/test_train_step.py"],
                out,
                est["bench_train_step"],
                selection=f"({variant_ids}) and ({batch_ids})",
                benchmark=True,
            ),
        ):
            if run(step).status != "skipped":
                pytest_results(step, out)

        # Record runs: fast for as many seeds as fit while leaving paper's epoch its estimate.
        seed_estimate = est["record_fast"]
        for seed in range(plan.max_fast_seeds):
            step = record_step("fast", seed, plan, out, runs, seed_estimate)
            reserve = est["record_paper"] if seed > 0 else 0  # seed 0 outranks paper
            if seed > 0 and seed_estimate + reserve > budget.left():
                step.status = "skipped"
                step.reason = (
                    f"needs about {seed_estimate:.0f} s and record_paper {reserve:.0f} s, "
                    f"{max(0.0, budget.left()):.0f} s of the budget left"
                )
                steps.append(step)
                break
            before = set((out / "records").glob("*.json"))
            run(step)
            record_results(step, out, before)
            if step.status != "ok":
                break
            seed_estimate = step.seconds  # a warm compile cache makes later seeds no slower
        step = record_step("paper", 0, plan, out, runs, est["record_paper"])
        before = set((out / "records").glob("*.json"))
        if run(step).status != "skipped":
            record_results(step, out, before)

        run(
            Step(
                "profile",
                "torch.profiler: top kernels of one compiled training step",
                [sys.executable, "bench/profile_step.py", "--out", str(out / "profile.txt")]
                + list(plan.profile_flags),
                est["profile"],
                outputs=["profile.txt"],
            )
        )
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (below): the running step was stopped
        if steps and steps[-1].status == "pending":
            steps[-1].status, steps[-1].reason = "stopped", "interrupted (SIGTERM or Ctrl-C)"
        header["interrupted"] = True
        print("gpu_check: interrupted; writing the summary of what ran", file=sys.stderr)
        status = 130
    finally:
        header["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        header["seconds"] = budget.elapsed()
        record = {**header, "steps": [s.record(show) for s in steps]}
        (out / "steps.json").write_text(json.dumps(record, indent=2) + "\n")
        (out / "summary.md").write_text(render_gpu_check(out))
        runs_dir.cleanup()
    failed = [s.name for s in steps if s.status == "failed"]
    print(f"gpu_check: done in {budget.elapsed():.0f} s; summary in {out / 'summary.md'}")
    if failed:
        print(f"gpu_check: failed: {', '.join(failed)} (see summary.md)")
    return status or (1 if failed else 0)


def _terminate(signum, frame):
    raise KeyboardInterrupt  # handled like Ctrl-C: stop the step, write the summary


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(run_main(main, "gpu_check"))
