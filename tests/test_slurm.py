"""launch/slurm/train.sbatch under a real Slurm: a two-node cluster on this host (munged,
slurmctld and two slurmd, started here with a configuration of their own in a temporary
directory; Debian's Slurm is built with --enable-multiple-slurmd, `scontrol show config` says
MULTIPLE_SLURMD = Yes, so two slurmd on one host are two Slurm nodes).

One CPU job on 2 nodes: one `accelerate launch` per node (machine ranks 0 and 1, one gloo
process each), the multi-node path of the script. It is pre-empted as Slurm does it two minutes
before its time limit (`--signal=B:TERM`: SIGTERM to the batch script, here sent by `scancel
--batch`): it saves a checkpoint, requeues itself, resumes from that checkpoint and finishes.

Needs Slurm (`apt-get install slurmctld slurmd slurm-client munge`, as `.ci/run` does) and
root (slurmd runs jobs as their user); skipped without them, except in CI, where it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capsfast.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parent.parent
DAEMONS = ("munged", "slurmctld", "slurmd")
NODES = ("capsfast0", "capsfast1")  # two Slurm nodes on this host
TOOLS = ("sbatch", "scancel", "scontrol")
# Seconds a job credential lives (Slurm's default 120). It is also how long Slurm holds a requeued
# job before it may start again: a requeued job keeps its id, and slurmd refuses ("Job credential
# revoked") a credential for it created in the same second as the revocation of the first run's.
# Forcing an earlier start (`scontrol update StartTime=now`) hit exactly that in 2 of 3 runs.
CRED_EXPIRE = 10


def _sbin(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _missing() -> str | None:
    absent = [n for n in DAEMONS + TOOLS if _sbin(n) is None]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} missing)"
    if os.geteuid() != 0:
        return "slurmd must run as root"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running two-node cluster; yields the environment its clients need (SLURM_CONF)."""
    reason = _missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: .ci/run installs it")
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("slurm")
    os.chmod(d, 0o700)
    for sub in ("state", "spool", "munge"):
        (d / sub).mkdir(mode=0o700)
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket_path = d / "munge" / "munge.socket"
    started: list[subprocess.Popen] = []

    def start(*cmd) -> None:
        started.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))

    # munged daemonizes unless -F; --force: the temporary directory's parents are world-writable
    start(_sbin("munged"), "-F", "--force", f"--key-file={key}", f"--socket={socket_path}",
          f"--pid-file={d / 'munge' / 'munged.pid'}", f"--log-file={d / 'munge' / 'munged.log'}",
          f"--seed-file={d / 'munge' / 'munged.seed'}")  # fmt: skip
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    base = 6817 + os.getpid() % 1000 * 3
    conf = d / "slurm.conf"
    nodes = "".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={base + 1 + i} CPUs=1 "
        "RealMemory=100\n"
        for i, name in enumerate(NODES)
    )
    conf.write_text(f"""\
ClusterName=capsfast
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={base}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path},cred_expire={CRED_EXPIRE}
StateSaveLocation={d / "state"}
SlurmdSpoolDir={d / "spool"}/%n
SlurmctldPidFile={d / "slurmctld.pid"}
SlurmdPidFile={d / "slurmd-%n.pid"}
SlurmctldLogFile={d / "slurmctld.log"}
SlurmdLogFile={d / "slurmd-%n.log"}
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
KillWait=30
MinJobAge=300
{nodes}PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # this python's accelerate
    deadline = time.time() + 30
    while not socket_path.exists() and time.time() < deadline:
        time.sleep(0.1)
    start(_sbin("slurmctld"), "-D", "-i", "-f", str(conf))
    for name in NODES:
        (d / "spool" / name).mkdir(mode=0o700)
        start(_sbin("slurmd"), "-D", "-N", name, "-f", str(conf))
    try:
        while True:
            info = subprocess.run(["scontrol", "show", "nodes"], env=env, capture_output=True,
                                  text=True)  # fmt: skip
            if len(re.findall(r"State=IDLE\s", info.stdout)) == len(NODES):
                break
            if time.time() > deadline:
                logs = "\n".join(f.read_text()[-2000:] for f in d.glob("*.log"))
                pytest.fail(f"the Slurm nodes did not come up: {info.stdout}{info.stderr}\n{logs}")
            time.sleep(0.2)
        yield env
    finally:
        # A job still running (a failed test) goes first: its processes must not outlive slurmd.
        subprocess.run(["scancel", "--full", "--signal=KILL", "--user=root"], env=env,
                       capture_output=True)  # fmt: skip
        deadline = time.time() + 20
        while time.time() < deadline and not nodes_idle(env):
            time.sleep(0.2)
        for p in reversed(started):
            p.send_signal(signal.SIGTERM)
        for p in reversed(started):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def nodes_idle(env) -> bool:
    info = subprocess.run(["scontrol", "show", "nodes"], env=env, capture_output=True, text=True)
    return len(re.findall(r"State=IDLE\s", info.stdout)) == len(NODES)


def cluster_report(env, job: str) -> str:
    """What Slurm says about the job, and the tails of its daemons' logs: a failure's evidence."""
    d = Path(env["SLURM_CONF"]).parent
    show = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True,
                          text=True).stdout  # fmt: skip
    logs = "".join(f"\n--- {f.name}\n{f.read_text(errors='replace')[-3000:]}"
                   for f in sorted(d.glob("*.log")))  # fmt: skip
    return f"\n--- scontrol show job {job}\n{show}{logs}"


def job_state(env, job: str) -> tuple[str, int]:
    info = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True,
                          text=True).stdout  # fmt: skip
    state = re.search(r"JobState=(\S+)", info)
    restarts = re.search(r"Restarts=(\d+)", info)
    return (state.group(1) if state else "?"), int(restarts.group(1)) if restarts else 0


STEPS = 60


def test_slurm_job_on_two_nodes_is_preempted_requeues_and_resumes(slurm, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    env = {**slurm, "OUTPUT_DIR": str(out), "MAIN_PORT": str(20000 + os.getpid() % 20000),
           "RDZV_TIMEOUT": "60", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
         "--time=10", f"--output={log}", f"--chdir={ROOT}", "launch/slurm/train.sbatch",
         "--batch-size", "16", "--primary-types", "2", "--val-size", "32", "--test-size", "32",
         "--eval-batch-size", "64", "--report-to", "none", "--mixed-precision", "no",
         "--no-compile", "--cpu-threads", "1", "--max-steps", str(STEPS),
         "--checkpoint-every", "10", "--keep-checkpoints", "10", "--log-every", "100000"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job = submit.stdout.strip().split(";")[0]

    def log_text() -> str:
        return log.read_text(errors="replace") if log.exists() else ""  # two tasks interleave

    def wait(condition, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not condition():
            state, _ = job_state(env, job)
            assert time.time() < deadline, (
                f"{what}: job {state}\n{log_text()[-4000:]}{cluster_report(env, job)}"
            )
            assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), (
                f"{what}: job {state}\n{log_text()[-4000:]}{cluster_report(env, job)}"
            )
            time.sleep(0.2)

    wait(lambda: list_checkpoints(out), "no first checkpoint")
    t = time.time()
    subprocess.run(["scancel", "--batch", "--signal=TERM", job], env=env, check=True)
    wait(lambda: "requeueing job" in log_text(), "no requeue after SIGTERM")
    stop_seconds = time.time() - t
    # Slurm holds the requeued job for CRED_EXPIRE seconds, then starts it by itself at its
    # next scheduling pass (sched_interval=1: every second, where the default is every minute).
    wait(lambda: job_state(env, job)[0] == "PENDING", "not pending after the requeue", 60)
    wait(lambda: (out / "summary.json").exists() and job_state(env, job)[0] == "COMPLETED",
         "the requeued job did not finish")  # fmt: skip
    text = log_text()
    print(f"\n[slurm] SIGTERM to the batch script -> checkpoint saved, requeued in "
          f"{stop_seconds:.1f} s")  # fmt: skip
    assert job_state(env, job)[1] == 1  # requeued once
    # The log says what ran, twice: the first start and the requeued one.
    assert f"capsfast: job {job} (restart 0)" in text and f"capsfast: job {job} (restart 1)" in text
    assert "2 launchers x 1 processes" in text
    stopped = re.search(r"stopped on request at step (\d+); checkpoint saved to (\S+)", text)
    assert stopped, text[-4000:]
    step = int(stopped.group(1))
    assert 10 <= step < STEPS
    assert f"resumed from {out}/checkpoints/step-{step:08d} at step {step}" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert (out / "model" / "model.safetensors").is_file()
    assert "Traceback" not in text, text[-4000:]
