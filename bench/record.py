"""Record runs: train a preset for seeds 0..N-1 (or K..K+N-1 with --first-seed K), each in a
fresh process as a user starts it, and keep one JSON log per run.

    python bench/record.py --preset fast --seeds 5 [trainer flags, passed through]

Each log (in --out, default bench/results/records/) holds every key of the run's summary.json at
top level (wall_seconds is the trainer's own, up to the end of the test evaluation), plus
`metrics` (metrics.jsonl: a train record per logged step, an epoch record per epoch end), `date`, `compile_cache_warm` (was the inductor
cache directory non-empty before the run: a warm cache hides compile time), `command` and
`process_seconds` (the whole process as seen from here, launcher included). That directory holds
logs only; tables come from `python bench/report.py --records DIR`.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# Run as a script: this checkout first, so that its bench/ and capsfast/ are imported (and not
# a capsfast installed from another copy, whose commit would be recorded).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import stats_table  # noqa: E402
from capsfast.config import PRESETS  # noqa: E402
from capsfast.errors import UserError, run_main  # noqa: E402
from capsfast.provenance import git_commit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OWNED = ("--seed", "--output-dir", "--preset")  # record.py sets these for every run


def compile_cache_dir() -> Path:
    """Where inductor caches compiled code: TORCHINDUCTOR_CACHE_DIR, else torch's default
    <tmp>/torchinductor_<user>."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    user = re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser())
    return Path(tempfile.gettempdir()) / f"torchinductor_{user}"


def machine() -> dict:
    """The host the record ran on: processor model, cores, and the bf16/AMX instructions that
    decide a CPU run's default precision."""
    import platform

    info = {"host_machine": platform.machine(), "cpu_count": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    info["cpu_model"] = model.group(1).strip() if model else None
    info["cpu_flags"] = [f for f in wanted if flags and f in flags.group(1).split()]
    return info


def is_warm(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def parse_args(argv):
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # else the trainer's --seed would be taken for an abbreviated --seeds
        description="Train a preset for seeds 0..N-1 in fresh processes; one JSON log per run.",
        epilog="Unknown flags go to launch/train.py (e.g. --epochs 2 --report-to none).",
    )
    parser.add_argument("--preset", default="fast", choices=list(PRESETS))
    parser.add_argument("--seeds", type=int, default=5, help="run N seeds: K..K+N-1")
    parser.add_argument("--first-seed", type=int, default=0, help="K, the first seed (0)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/records"), help="log directory")
    parser.add_argument("--runs-dir", default=str(ROOT / "runs/record"), help="trainer outputs")
    parser.add_argument(
        "--launcher",
        default="accelerate",
        choices=["accelerate", "python"],
        help="accelerate: `accelerate launch launch/train.py`; python: `python launch/train.py`",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="go on with each seed's interrupted run in --runs-dir (the trainer's --resume auto); "
        "the log adds up the time of every attempt",
    )
    args, passthrough = parser.parse_known_args(argv)
    for flag in passthrough:
        if flag.split("=")[0] in OWNED:
            parser.error(f"{flag.split('=')[0]} is set by record.py for each run")
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.first_seed < 0:
        parser.error(f"--first-seed must be >= 0, got {args.first_seed}")
    return args, passthrough


def record_run(args, passthrough: list[str], seed: int, sha: str) -> dict:
    # One directory per preset and seed, so that an interrupted record goes on (--resume).
    run_dir = Path(args.runs_dir) / f"{args.preset}-seed{seed}"
    attempts_file = run_dir / "record-attempts.json"
    if run_dir.exists() and any(run_dir.iterdir()) and not args.resume:
        raise UserError(
            f"{run_dir} holds an earlier record run: pass --resume to go on with it, or remove "
            "the directory to start over"
        )
    attempts = json.loads(attempts_file.read_text()) if attempts_file.is_file() else []
    launcher = ["accelerate", "launch"] if args.launcher == "accelerate" else [sys.executable, "-u"]
    command = [
        *launcher,
        "launch/train.py",
        *("--preset", args.preset, "--seed", str(seed), "--output-dir", str(run_dir)),
        *(["--resume", "auto"] if args.resume else []),
        *passthrough,
    ]
    cache = compile_cache_dir()
    warm = is_warm(cache)
    print(f"record: seed {seed}: compile cache {'warm' if warm else 'cold'} ({cache})", flush=True)
    print("record: " + " ".join(command), flush=True)
    t0 = time.time()
    # The trainer records CAPSFAST_COMMIT, so a copy without .git still names its commit.
    proc = subprocess.run(command, cwd=ROOT, env={**os.environ, "CAPSFAST_COMMIT": sha})
    seconds = time.time() - t0
    run_dir.mkdir(parents=True, exist_ok=True)
    attempts.append({"process_seconds": seconds, "exit_code": proc.returncode,
                     "ended": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})  # fmt: skip
    attempts_file.write_text(json.dumps(attempts, indent=2) + "\n")
    if proc.returncode != 0 or not (run_dir / "summary.json").is_file():
        raise SystemExit(
            f"record: seed {seed} ended without a summary (exit code {proc.returncode}); to go "
            "on, run the same command with --resume"
        )
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {
        **summary,
        "metrics": [json.loads(line) for line in lines if line.strip()],
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "compile_cache_warm": warm,
        "machine": machine(),
        "command": command,
        "process_seconds": sum(a["process_seconds"] for a in attempts),
        "attempts": attempts,
    }


def main(argv: list[str] | None = None) -> int:
    args, passthrough = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sha = git_commit()
    records = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        rec = record_run(args, passthrough, seed, sha)
        path = out / f"{args.preset}_seed{seed}_{rec['date'].replace(':', '')}.json"
        # A log is committed: paths inside this checkout are written relative to it.
        path.write_text(json.dumps(rec, indent=2).replace(str(ROOT) + "/", "") + "\n")
        print(f"record: wrote {path}", flush=True)
        records.append(rec)
    print(f"\n{args.preset}: {len(records)} seed(s), commit {sha}, {records[0]['device']}")
    print(stats_table(records), end="")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "record"))  # a signal or a bad path: one line, no traceback
