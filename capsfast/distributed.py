"""Many processes: a stop request every rank agrees on within a bounded time, a launcher that
dies, a peer that fails or hangs.

- `StopPoll`: the ranks agree on a pending stop request (SIGTERM or SIGINT to one rank or to
  all) at least every `STOP_POLL_SECONDS` of wall time, or after every step when a step takes
  longer, whatever --log-every is: one all-reduce of two numbers per poll, timed so that polls
  are STOP_POLL_SECONDS apart.
- `watch_launcher`: a worker started by a launcher (torchrun, `accelerate launch`) stops when its
  launcher dies, as if it had been sent SIGTERM (every rank agrees, saves, exits), and exits at
  once if that has not happened within `LAUNCHER_GONE_EXIT_SECONDS`.
- `peer_failure`: a collective that failed because another process died, closed its connection
  or did not answer within --peer-timeout, in one line (`PeerFailed`), instead of a traceback.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from datetime import timedelta

import torch

from capsfast.errors import UserError

STOP_POLL_SECONDS = 2.0  # the ranks agree on a pending stop at least this often (or every step)
LAUNCHER_POLL_SECONDS = 1.0  # how often a worker looks at its parent
LAUNCHER_GONE_EXIT_SECONDS = 12.0  # after the launcher's death: the orderly stop, or exit at once
EXIT_LAUNCHER_GONE = 128 + signal.SIGTERM  # as if killed by SIGTERM


class PeerFailed(UserError):
    """Another process of the run failed, closed its connection or stopped answering."""


class StopPoll:
    """When to ask every rank whether one of them has a stop request, and the asking.

    The interval is in steps, so every rank polls at the same step (a collective): after each
    poll it is set to STOP_POLL_SECONDS over the seconds per step since the previous poll
    (averaged over the ranks by the poll itself, so every rank computes the same interval), at
    least 1. With one process there is nothing to agree on: the loop stops at the next step."""

    def __init__(self, accelerator, step: int, seconds: float = STOP_POLL_SECONDS):
        self.accelerator, self.seconds = accelerator, seconds
        self.enabled = accelerator.num_processes > 1
        self.next = step + 1
        self.last_step, self.last_time = step, time.perf_counter()
        self.polls = 0

    def stop_agreed(self, step: int, requested: bool) -> bool:
        """At step `step` (every rank calls this after every step): True on every rank when a
        poll is due and any rank has a stop request."""
        if not self.enabled or step < self.next:
            return False
        acc = self.accelerator
        per_step = (time.perf_counter() - self.last_time) / max(1, step - self.last_step)
        flags = torch.tensor([float(requested), per_step], device=acc.device)
        total, seconds = acc.reduce(flags, reduction="sum").tolist()
        per_step = seconds / acc.num_processes
        self.next = step + max(1, int(self.seconds / max(per_step, 1e-9)))
        self.last_step, self.last_time = step, time.perf_counter()
        self.polls += 1
        return total > 0


def launched_by_launcher() -> bool:
    """A worker of torchrun / a multi-process `accelerate launch` (TORCHELASTIC_RUN_ID), or the
    trainer of a single-process `accelerate launch`: a process whose parent exists to watch it.
    A trainer started from a shell is not one: `nohup python launch/train.py &` must outlive its
    shell."""
    from capsfast.runtime import under_single_process_launcher

    return "TORCHELASTIC_RUN_ID" in os.environ or under_single_process_launcher()


def watch_launcher(
    poll: float = LAUNCHER_POLL_SECONDS, deadline: float = LAUNCHER_GONE_EXIT_SECONDS
) -> threading.Thread | None:
    """Under a launcher, a daemon thread that notices the launcher's death (this process is
    given to another parent) within `poll` seconds: it sends this process SIGTERM (the run
    saves a checkpoint once every rank agrees, then exits), and exits at once if the process
    is still alive `deadline` seconds later (a peer gone as well, say). Without this, the
    workers of a launcher killed outright (SIGKILL, OOM killer) train on as orphans, and a
    relaunch writes into the same directory beside them."""
    if not launched_by_launcher():
        return None
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os.write(2, (f"capsfast: the launcher (pid {parent}) has died: stopping this process "
                     f"(a checkpoint if every process agrees within {deadline:g} s)\n").encode())  # fmt: skip
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(deadline)
        os.write(2, f"capsfast: still running {deadline:g} s after the launcher died: exiting "
                    "now; the last complete checkpoint is kept\n".encode())  # fmt: skip
        os._exit(EXIT_LAUNCHER_GONE)

    thread = threading.Thread(target=watch, name="capsfast-launcher-watch", daemon=True)
    thread.start()
    return thread


def init_restarted_group(timeout: timedelta, backend: str) -> bool:
    """After an elastic restart (TORCHELASTIC_RESTART_COUNT > 0), join the process group through
    a store prefix of this attempt's own; returns whether it did. Under torchrun's static
    rendezvous (`accelerate launch`'s default) the workers use the launcher's store, which keeps
    the keys of the previous attempt: the restarted ranks would read the dead ranks' addresses
    and fail with "connectFullMesh failed ... Connection refused". (The c10d rendezvous makes a
    new store per attempt; the prefix changes nothing there.) Accelerate then finds the group
    initialised and uses it."""
    import torch.distributed as dist

    env = os.environ
    attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0 or dist.is_initialized() or "MASTER_ADDR" not in env:
        return False
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)  # fmt: skip
    store = dist.PrefixStore(f"capsfast/attempt_{attempt}", store)
    if backend == "nccl":
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return True


# What a collective raises when a peer is gone: gloo's and NCCL's words for a closed connection
# or a timeout (raised as DistError subclasses or as plain RuntimeErrors, by backend and version).
_PEER_WORDS = re.compile(
    r"connection (closed|reset|refused)|broken pipe|timed out|timeout|socket|peer|"
    r"nccl (error|communicator)|ncclRemoteError|ncclSystemError|wait_for_workers|clients joined",
    re.IGNORECASE,
)


def peer_failure(error: BaseException) -> str | None:
    """The first line of `error`, without its C++ source location, when it is a collective that
    failed because of another process; else None (a bug: keep the traceback)."""
    import torch.distributed as dist

    if not isinstance(error, RuntimeError):
        return None
    text = str(error).strip()
    lowered = text.lower()
    backend = "gloo" in lowered or "nccl" in lowered
    if not (isinstance(error, dist.DistError) or (backend and _PEER_WORDS.search(text))):
        return None  # not a collective's failure: a bug
    first = text.splitlines()[0] if text else type(error).__name__
    first = re.sub(r"\[[^\]]*/[^\]]*\]\s*", "", first)  # C++ source paths: "[.../pair.cc:538] "
    first = first.split(". ")[0].rstrip(".")  # gloo goes on: "This is typically caused by ..."
    return first[:200]


def peer_failed_message(detail: str, newest_checkpoint, resume_hint: str,
                        peer_timeout: float) -> str:  # fmt: skip
    """The one line a surviving rank ends with."""
    kept = (f"the last complete checkpoint is {newest_checkpoint}" if newest_checkpoint
            else "no checkpoint had been written yet")  # fmt: skip
    return (f"another process of this run failed or stopped answering ({detail}; a silent one "
            f"is given up after --peer-timeout {peer_timeout:g} s); {kept}: find the first "
            f"error in the output above, fix it, then {resume_hint}")  # fmt: skip
