"""Many processes, for real: a 2-process gloo group (one `accelerate launch`, or two launchers
as two nodes on localhost) on real MNIST, stopped by real signals sent to real processes.

- a SIGTERM to the launcher (how Slurm and Kubernetes pre-empt) stops every rank within a
  bounded time and saves a checkpoint, whatever --log-every is;
- a launcher killed outright: its worker notices, every rank saves and exits (no orphans);
- a worker killed outright under `--max_restarts`: the survivor says so in one line, the group
  restarts by itself from the last checkpoint and ends with the weights of an uninterrupted run;
- a node that never comes: the launcher's rendezvous gives up after the stated timeout.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from capsfast.checkpoint import list_checkpoints, verify
from capsfast.distributed import peer_failure

ROOT = Path(__file__).resolve().parent.parent
CPU_2PROC = str(ROOT / "launch" / "configs" / "cpu_2proc.yaml")
# The tiny model (2 primary capsule types), fp32, eager, one thread per process (2 cores).
TINY = ["--batch-size", "16", "--primary-types", "2", "--val-size", "32", "--test-size", "32",
        "--eval-batch-size", "64", "--report-to", "none", "--mixed-precision", "no",
        "--no-compile", "--cpu-threads", "1"]  # fmt: skip
LONG = ["--max-steps", "100000", "--log-every", "100000", "--checkpoint-every", "0"]  # never syncs
# Rank 0's progress bar shows a rate: a step is done, so every rank is in the step loop (DDP
# all-reduces every step) with its signal handlers in place.
TRAINING = r"epoch 1: .*[0-9]img/s"
STOP_BOUND = 15.0  # seconds from the signal to the launcher's exit (README: the stop bound)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """One `accelerate launch` of launch/train.py; its output goes to files (read while it runs)."""

    def __init__(self, tmp: Path, name: str, launcher_args: list[str], train_args: list[str]):
        self.stdout, self.stderr = tmp / f"{name}.out", tmp / f"{name}.err"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_2PROC,
               *launcher_args, str(ROOT / "launch" / "train.py"), *TINY, *train_args]  # fmt: skip
        env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env=env)

    def text(self) -> tuple[str, str]:
        return self.stdout.read_text(), self.stderr.read_text()

    def workers(self) -> list[psutil.Process]:
        found = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "train.py" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.Error:  # gone, or a zombie the launcher has not reaped yet
                pass
        return found

    def wait_for(self, needle: str, timeout: float = 300) -> None:
        """Until `needle` (a regular expression) is in the output."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if re.search(needle, self.stdout.read_text() + self.stderr.read_text()):
                return
            assert self.proc.poll() is None, self.text()[1][-3000:]
            time.sleep(0.1)
        raise TimeoutError(f"no {needle!r} in the output: {self.text()[1][-3000:]}")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)


def wait_gone(processes: list[psutil.Process], timeout: float) -> float:
    """Seconds until every process has exited (they may be orphans: nobody reaps them but init)."""
    t = time.time()
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for p in alive:
        p.kill()
    assert not alive, f"still running {timeout} s later: {[p.pid for p in alive]}"
    return time.time() - t


def stopped_step(stdout: str) -> int:
    line = next(x for x in stdout.splitlines() if "stopped on request at step" in x)
    return int(line.split("at step ")[1].split(";")[0])


def test_sigterm_to_the_launcher_stops_every_rank_in_bounded_time(tmp_path):
    """Pre-emption: SIGTERM to the launcher, which passes it to its workers and SIGKILLs them
    30 s later. The ranks never meet at a sync point (--log-every 100000): they agree on the
    stop through the time-based poll, save and exit well inside those 30 s."""
    out = tmp_path / "run"
    run = Launch(tmp_path, "launch", ["--main_process_port", str(free_port())],
                 [*LONG, "--output-dir", str(out)])  # fmt: skip
    run.wait_for(TRAINING)
    t = time.time()
    run.proc.send_signal(signal.SIGTERM)
    run.wait(timeout=60)
    elapsed = time.time() - t
    stdout, stderr = run.text()
    print(f"\n[stop] SIGTERM to the launcher -> every process exited in {elapsed:.1f} s")
    assert elapsed < STOP_BOUND, stderr[-3000:]
    saved = list_checkpoints(out)
    assert len(saved) == 1, stderr[-3000:]
    verify(saved[0])
    assert saved[0].name == f"step-{stopped_step(stdout):08d}"
    assert "Traceback" not in stderr, stderr[-3000:]


def test_a_dead_launcher_stops_its_workers_and_the_other_node(tmp_path):
    """Two launchers as two nodes on localhost (--num_machines 2). SIGKILL to the second one's
    launcher: its worker, now an orphan, notices within a second and stops as if pre-empted;
    the first node's worker agrees; both save one checkpoint and exit within 15 s."""
    out, port = tmp_path / "run", free_port()
    node = ["--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--rdzv_conf", "timeout=120"]  # fmt: skip
    train = [*LONG, "--output-dir", str(out)]
    first = Launch(tmp_path, "node0", [*node, "--machine_rank", "0"], train)
    second = Launch(tmp_path, "node1", [*node, "--machine_rank", "1"], train)
    first.wait_for(TRAINING)
    workers = first.workers() + second.workers()
    assert len(workers) == 2
    second.proc.send_signal(signal.SIGKILL)
    second.wait(timeout=10)
    elapsed = wait_gone(workers, timeout=30)
    first.wait(timeout=30)
    print(f"\n[stop] launcher SIGKILLed -> both workers exited in {elapsed:.1f} s")
    assert elapsed < 15
    stdout, _ = first.text()
    _, orphan_err = second.text()
    assert "the launcher (pid" in orphan_err and "has died" in orphan_err, orphan_err[-3000:]
    saved = list_checkpoints(out)
    assert len(saved) == 1 and saved[0].name == f"step-{stopped_step(stdout):08d}"
    verify(saved[0])


def test_a_node_that_never_comes_fails_the_rendezvous_after_its_timeout(tmp_path):
    """Node 0 of a 2-node launch whose node 1 never starts: the launcher gives up after the
    --rdzv_conf timeout and says how many launchers came (README quotes these words)."""
    t = time.time()
    run = Launch(tmp_path, "alone", ["--num_machines", "2", "--num_processes", "2",
                 "--machine_rank", "0", "--main_process_ip", "127.0.0.1", "--main_process_port",
                 str(free_port()), "--rdzv_conf", "timeout=3"],
                 ["--output-dir", str(tmp_path / "run")])  # fmt: skip
    code = run.wait(timeout=120)
    elapsed = time.time() - t
    _, stderr = run.text()
    assert code != 0
    assert "DistStoreError" in stderr and "1/2 clients joined" in stderr, stderr[-3000:]
    assert elapsed < 60, elapsed
    assert not (tmp_path / "run").exists()  # no trainer ever ran


STEPS = 12
RESTART = ["--max-steps", str(STEPS), "--checkpoint-every", "4", "--log-every", "2",
           "--keep-checkpoints", "5", "--resume", "auto"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run = Launch(tmp, "launch", ["--main_process_port", str(free_port())],
                 [*RESTART, "--output-dir", str(tmp / "run")])  # fmt: skip
    assert run.wait(timeout=600) == 0, run.text()[1][-3000:]
    return tmp / "run"


def test_restart_after_a_killed_worker_resumes_and_ends_with_the_same_weights(
    uninterrupted, tmp_path
):
    """Elastic restart: `accelerate launch --max_restarts 1 ... --resume auto`. SIGKILL to
    rank 1 after the step-4 checkpoint: rank 0 ends with one line that says a peer failed and
    how to resume, the launcher restarts the group, which resumes from the checkpoint and ends
    with the weights of the uninterrupted run."""
    out = tmp_path / "run"
    run = Launch(tmp_path, "launch", ["--main_process_port", str(free_port()),
                 "--max_restarts", "1", "--monitor_interval", "0.5"],
                 [*RESTART, "--output-dir", str(out)])  # fmt: skip
    deadline = time.time() + 600
    while not list_checkpoints(out) and time.time() < deadline:
        assert run.proc.poll() is None, run.text()[1][-3000:]
        time.sleep(0.05)
    rank1 = next(p for p in run.workers() if p.environ().get("RANK") == "1")
    rank1.kill()
    assert run.wait(timeout=600) == 0, run.text()[1][-3000:]
    stdout, stderr = run.text()
    assert "resumed from" in stdout, stdout[-3000:]
    peer = [x for x in stderr.splitlines() if "another process of this run failed" in x]
    assert len(peer) == 1 and "run the same command again" in peer[0], stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    a = load_file(list_checkpoints(uninterrupted)[0] / "model.safetensors")
    b = load_file(list_checkpoints(out)[0] / "model.safetensors")
    assert list_checkpoints(out)[0].name == f"step-{STEPS:08d}"
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_a_peer_that_hangs_is_given_up_after_the_peer_timeout(tmp_path):
    """SIGSTOP to rank 1 (a hung process, or a node gone without closing its connections): rank
    0 gives up after --peer-timeout with one line, not after torch's 30 minutes."""
    run = Launch(tmp_path, "launch", ["--main_process_port", str(free_port())],
                 [*LONG, "--peer-timeout", "5", "--output-dir", str(tmp_path / "run")])  # fmt: skip
    run.wait_for(TRAINING)
    rank1 = next(p for p in run.workers() if p.environ().get("RANK") == "1")
    rank1.suspend()
    t = time.time()
    try:
        run.wait_for("another process of this run failed", timeout=120)
        elapsed = time.time() - t
    finally:
        rank1.kill()
    run.wait(timeout=60)
    _, stderr = run.text()
    peer = [x for x in stderr.splitlines() if "another process of this run failed" in x]
    assert len(peer) == 1 and "--peer-timeout 5" in peer[0], stderr[-3000:]
    assert 5 <= elapsed < 30, elapsed


@pytest.mark.parametrize(
    "error, line",
    [  # what gloo raised in these tests, then errors that are not a peer's
        (RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] "
                      "Read error [127.0.0.1]:52952: Connection reset by peer. This is typically "
                      "caused by a remote worker hanging"),
         "Read error [127.0.0.1]:52952: Connection reset by peer"),
        (torch.distributed.DistNetworkError("Timed out after 5 seconds. More"),
         "Timed out after 5 seconds"),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"), None),
        (RuntimeError("timed out waiting for a lock"), None),  # no backend named: ours, a bug
        (ValueError("gloo: Connection closed by peer"), None),
    ],
)  # fmt: skip
def test_only_a_peers_failure_becomes_one_line(error, line):
    assert peer_failure(error) == line
