"""One run owns its output directory.

While a run runs, its main process holds an exclusive `flock` on `OUT/.capsfast-lock`, a file that
names the holder (host, PID, start time, command). A second run on the same directory meets the
lock and stops at once with one line that names the holder. The kernel drops the lock when the
holder's process ends in any way (SIGKILL and crashes included), so a dead run never blocks the
next one; the file stays, and only ever says who held the lock last.

Before writing anything, a run also looks at what the directory holds. A directory that holds
another run's results (checkpoints, summary.json, model/, metrics) is refused unless the command
continues that run (`--resume`) or says to start over there (`--overwrite`, which deletes that
run's files and nothing else). `--resume auto` takes only checkpoints of the directory's own run
(capsfast.checkpoint.resume).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from capsfast.checkpoint import list_checkpoints
from capsfast.errors import UserError, describe_os_error

LOCK = ".capsfast-lock"
# What a run writes into its output directory: what --overwrite removes, and nothing else.
RUN_FILES = ("checkpoints", "model", "figures", "summary.json", "metrics.jsonl", "config.json",
             "curves.png")  # fmt: skip


class DirectoryInUse(UserError):
    """Another live run holds the output directory."""


class DirectoryHoldsAnotherRun(UserError):
    """The output directory holds results of a run this command would not continue."""


class RunLock:
    """The lock on `directory` (creating the directory), held until `release()`; raises
    DirectoryInUse naming the holder when another process holds it."""

    def __init__(self, directory: str | Path):
        import fcntl

        self.directory = Path(directory)
        self.path = self.directory / LOCK
        self.fd: int | None = None
        self.warning: str | None = None  # set when the file system cannot lock
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _read_holder(fd)
                os.close(fd)
                raise DirectoryInUse(in_use_message(self.directory, holder)) from None
            # A file system without locks (some network mounts): go on unprotected, and say so.
            self.warning = (
                f"cannot lock {self.path} ({describe_os_error(e)}): nothing stops a second run "
                "from writing into this directory at the same time"
            )
        self.fd = fd
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "command": [sys.executable, *sys.argv]}  # fmt: skip
        try:  # who holds it, for the next run's message
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError:  # a full disk: let go, and let the caller say so
            self.release()
            raise

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    __del__ = release


def _read_holder(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def in_use_message(directory: Path, holder: dict) -> str:
    pid, host = holder.get("pid"), holder.get("host")
    if not pid:
        return (f"--output-dir {directory} is in use by another run that is just starting: "
                "wait for it to end, or choose another --output-dir")  # fmt: skip
    since = ""
    if isinstance(holder.get("started"), (int, float)):
        since = time.strftime(", started %Y-%m-%d %H:%M:%S UTC", time.gmtime(holder["started"]))
    here = host == socket.gethostname()
    stop = f"kill {pid}" if here else f"kill {pid} on {host}"
    return (f"--output-dir {directory} is in use by another run (PID {pid} on {host}{since}): "
            f"wait for it to end, stop it ({stop}), or choose another --output-dir")  # fmt: skip


def directory_run(directory: str | Path) -> str | None:
    """The run id of the run whose results `directory` holds (config.json), or None."""
    try:
        run_id = json.loads((Path(directory) / "config.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) else None


def earlier_results(directory: str | Path) -> list[str]:
    """What of an earlier run `directory` holds, in words (empty: nothing worth keeping)."""
    directory = Path(directory)
    found = []
    checkpoints = list_checkpoints(directory)
    if checkpoints:
        steps = [int(p.name.split("-")[1]) for p in checkpoints]
        found.append(f"checkpoints of steps {', '.join(map(str, sorted(steps)))}")
    if (directory / "summary.json").is_file():
        found.append("summary.json")
    if (directory / "model").is_dir() and any((directory / "model").iterdir()):
        found.append("model/")
    metrics = directory / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    return found


def check_ownership(directory: Path, resume: str | None, overwrite: bool, say) -> None:
    """Refuse to start a new run over another run's results (DirectoryHoldsAnotherRun), unless
    `resume` continues it or `overwrite` says to start over there: then remove that run's files
    (RUN_FILES only) and say so with `say`."""
    found = earlier_results(directory)
    if not found:
        return
    what = ", ".join(found)
    if overwrite:
        for name in RUN_FILES:
            path = directory / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        say(f"--overwrite: removed the earlier run in {directory} ({what})")
        return
    if resume is None:
        raise DirectoryHoldsAnotherRun(
            f"--output-dir {directory} holds another run ({what}): to continue that run, run its "
            "command with --resume auto; to start over there, add --overwrite (deletes those "
            "files); or choose another --output-dir"
        )
    if (
        resume == "auto"
        and not list_checkpoints(directory)
        and ("summary.json" in found or "model/" in found)
    ):
        raise DirectoryHoldsAnotherRun(
            f"--output-dir {directory} holds a run's results ({what}) but no checkpoint to "
            "resume from: add --overwrite to start over there (deletes those files), or choose "
            "another --output-dir"
        )
