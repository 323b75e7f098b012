"""The trainer against other CapsNet projects' own training steps, in one run on one machine.

    python bench/peer_ratio.py --peer readable="python PEERS/peer_step.py readable --device cpu \\
        --batch 128 --steps 4 --warmup 1" [--peer NAME=COMMAND ...] [--rounds 2]

Each round runs, one after the other on a quiet machine: the trainer as a user starts it
(`accelerate launch launch/train.py`, batch 128, each of --rows), then every peer command
(a peer's own code, kept outside this repository, printing one JSON line with
`images_per_second`). The trainer's figure is its own steady-state images/s (summary.json:
after the first steps, without evaluation and compilation); its wall time, compilation
included, is logged beside it. Rounds interleave, so that a drift of the machine
touches every row alike; the table takes each row's median. The log goes to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.record import machine  # noqa: E402
from capsfast.errors import UserError, run_main  # noqa: E402
from capsfast.provenance import git_commit, versions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def trainer_command(row: str, batch: int, steps: int, threads: int, out: Path) -> list:
    """A row is a precision (default: the CPU's choice; no; bf16), `:eager` for --no-compile."""
    precision, _, mode = row.partition(":")
    flags = ["--batch-size", batch, "--max-steps", steps, "--log-every", 5, "--val-size", 0,
             "--test-size", 100, "--checkpoint-every", 0, "--report-to", "none",
             "--output-dir", out]  # fmt: skip
    if precision != "default":
        flags += ["--mixed-precision", precision]
    if mode == "eager":
        flags += ["--no-compile"]
    return ["accelerate", "launch", "-q", "--num_processes", "1", "--num_machines", "1",
            "--dynamo_backend", "no", "--num_cpu_threads_per_process", threads,
            "launch/train.py", *flags]  # fmt: skip


def run_trainer(precision, batch, steps, threads) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(a) for a in trainer_command(precision, batch, steps, threads, Path(tmp))]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"the trainer failed: {proc.stderr.strip().splitlines()[-1:]}")
        summary = json.loads((Path(tmp) / "summary.json").read_text())
    return {"images_per_second": summary["images_per_second"],
            "wall_seconds": summary["wall_seconds"],
            "mixed_precision": summary["mixed_precision"],
            "precision_reason": summary["precision_reason"],
            "compile": summary["compile"], "compile_reason": summary["compile_reason"],
            "command": " ".join(cmd)}  # fmt: skip


def run_peer(command: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(shlex.split(command), capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise UserError(f"peer command failed ({command}): {proc.stderr.strip()[-300:]}")
    return {**json.loads(lines[-1]), "command": command}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", action="append", default=[], metavar="NAME=COMMAND")
    parser.add_argument("--rows", default="default,default:eager,no:eager",
                        help="trainer rows: a precision (default: the CPU's choice; no; bf16), "
                             "`:eager` added for --no-compile")  # fmt: skip
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=25, help="trainer steps per run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench/results/cpu"))
    args = parser.parse_args(argv)
    peers = dict(p.split("=", 1) for p in args.peer if "=" in p)
    if len(peers) != len(args.peer):
        parser.error("--peer takes NAME=COMMAND")
    rows: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for row in args.rows.split(","):
            name = f"capsfast ({row})"
            rows.setdefault(name, []).append(run_trainer(row, args.batch, args.steps, args.threads))
            print(f"round {r + 1}: {name}: {rows[name][-1]['images_per_second']:.1f} img/s",
                  flush=True)  # fmt: skip
        for name, command in peers.items():
            rows.setdefault(name, []).append(run_peer(command, args.threads))
            print(f"round {r + 1}: {name}: {rows[name][-1]['images_per_second']:.1f} img/s",
                  flush=True)  # fmt: skip
    median = {
        n: statistics.median(x["images_per_second"] for x in runs) for n, runs in rows.items()
    }
    best_peer = max((n for n in median if n in peers), key=median.get, default=None)
    ratios = {n: median[n] / median[best_peer] for n in median if best_peer and n not in peers}
    stamp = datetime.now(timezone.utc)
    log = {"date": stamp.strftime("%Y-%m-%dT%H:%M:%SZ"), "commit": git_commit(), **versions(),
           "machine": machine(), "threads": args.threads, "batch": args.batch,
           "rounds": args.rounds, "median_images_per_second": median, "best_peer": best_peer,
           "over_best_peer": ratios, "runs": rows}  # fmt: skip
    out = Path(args.out) / f"peers_{stamp:%Y-%m-%d}_{log['commit']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(log, indent=2) + "\n")
    for n, v in median.items():
        extra = f"  ({ratios[n]:.2f}x {best_peer})" if n in ratios else ""
        print(f"{n:<28} {v:8.1f} img/s{extra}")
    print(f"peer_ratio: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "peer_ratio"))
