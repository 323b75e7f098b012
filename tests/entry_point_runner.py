"""Run many `python launch/NAME.py ARGS` processes without paying for `import torch` in each.

    python tests/entry_point_runner.py JOBS.json

JOBS.json is a list of {"script", "args", "cwd", "stdout", "stderr"}. This process imports torch
and capsfast once, then forks one child per job: the child runs the launch script as __main__
(runpy), with the job's argv, working directory and stdout/stderr files, and exits with the
script's exit status, so each job is a process of its own, as a user's command is, with its own
exit status and stderr; only the imports are shared. A few children run at a time; one that
runs past TIMEOUT seconds (a server that started instead of refusing) is killed, with a line on its
stderr. The exit statuses are written to JOBS.json.status as a list. (tests/test_entry_points.py uses it: about
2 s of CPU per `import torch` times forty rows was most of that test's time.)
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARALLEL = 4
TIMEOUT = 120  # seconds a job may run


def _child(job: dict) -> None:
    """In the forked child: become `python SCRIPT ARGS` and never return."""
    code = 1
    try:
        for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
            f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.chdir(job["cwd"])
        script = str(ROOT / job["script"])
        sys.argv = [script, *job["args"]]
        sys.path.insert(0, str(Path(script).parent))  # as `python SCRIPT` does
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()  # as the interpreter would: the test looks for it
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(jobs_file: str) -> None:
    sys.path.insert(0, str(ROOT))
    import capsfast.app  # noqa: F401  (the imports every child would repeat)
    import capsfast.cli  # noqa: F401
    import capsfast.figures  # noqa: F401
    import capsfast.infer  # noqa: F401

    jobs = json.loads(Path(jobs_file).read_text())
    status: list[int | None] = [None] * len(jobs)
    running: dict[int, tuple[int, float]] = {}  # pid -> (job index, start time)
    pending = list(range(len(jobs)))
    while pending or running:
        while pending and len(running) < PARALLEL:
            i = pending.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(jobs[i])
            running[pid] = (i, time.monotonic())
        pid, wait_status = os.waitpid(-1, os.WNOHANG)
        if pid:
            status[running.pop(pid)[0]] = os.waitstatus_to_exitcode(wait_status)
            continue
        for pid, (i, start) in running.items():
            if time.monotonic() - start > TIMEOUT:
                os.kill(pid, signal.SIGKILL)
                with open(jobs[i]["stderr"], "a") as f:
                    f.write(f"\nentry_point_runner: killed after {TIMEOUT} s\n")
                running[pid] = (i, float("inf"))  # killed once; reaped by waitpid above
        time.sleep(0.05)
    Path(jobs_file + ".status").write_text(json.dumps(status))


if __name__ == "__main__":
    main(sys.argv[1])
