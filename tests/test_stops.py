"""Stops and shortages outside the step loop: a Ctrl-C during the imports or while the run is set
up, a Ctrl-C during the final test evaluation, a summary kept when the test finished before the
stop, host memory running out. Each ends in one line (no traceback) and keeps what is on disk.
Real signals (to a real trainer process where the timing is the user's), a real allocator
failure (an address-space limit on a real trainer process)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capsfast.checkpoint import list_checkpoints, verify
from capsfast.run_lock import RunLock
from tests.test_train import small_cfg, synthetic_mnist
from tests.test_train_faults import run_train

ROOT = Path(__file__).resolve().parent.parent
TRAIN = [sys.executable, str(ROOT / "launch" / "train.py")]
TINY_FLAGS = ["--primary-types", "1", "--no-compile", "--mixed-precision", "no",
              "--report-to", "none", "--cpu-threads", "1"]  # fmt: skip
ENV = {**os.environ, "WANDB_MODE": "disabled"}


def test_ctrl_c_during_the_imports_is_one_line(tmp_path):
    proc = subprocess.Popen([*TRAIN, *TINY_FLAGS, "--output-dir", str(tmp_path / "run")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)  # fmt: skip
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.time() + 60
    while "libtorch" not in maps.read_text():  # torch's libraries are loading: mid-import
        assert time.time() < deadline, "torch was never loaded"
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().endswith("interrupted"), err
    assert not list_checkpoints(tmp_path / "run")


def test_a_stop_after_the_test_keeps_it_and_ctrl_c_during_setup_keeps_the_checkpoint(
    tmp_path, capsys, monkeypatch
):
    data = synthetic_mnist()
    out = tmp_path / "run"
    cfg = dict(primary_types=1, compile=False, max_steps=4, cpu_threads=1)
    # SIGTERM as the summary phase starts: the test evaluation had finished, so its result is
    # written (summary.json) before the run stops; the figures are left for the resume.
    with monkeypatch.context() as m:
        m.setenv("CAPSFAST_TEST_SIGNAL_AT", "summary")
        code, stdout, err = run_train(small_cfg(out, **cfg), data, capsys)
    assert code == 3, err
    assert "before its figures phase" in stdout and (out / "summary.json").is_file()
    assert not (out / "curves.png").exists()
    (checkpoint,) = list_checkpoints(out)

    # Ctrl-C while the resumed run is being set up (a single one): one line, code 130, and the
    # checkpoint stays as it was.
    with monkeypatch.context() as m:
        m.setenv("CAPSFAST_TEST_SIGNAL_AT", "setup")
        code, _, err = run_train(small_cfg(out, resume="auto", **cfg), data, capsys)
    assert code == 130
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert "interrupted while the run was being set up" in err and "second interrupt" not in err
    assert f"{checkpoint} is intact" in err and "--resume auto" in err
    assert list_checkpoints(out) == [checkpoint]
    verify(checkpoint)
    RunLock(out).release()  # the interrupted run let go of the directory


def test_ctrl_c_during_the_final_test_evaluation_ends_it(tmp_path):
    # 10,000 test images in batches of 20: the evaluation takes a while, and the stop must end
    # it at the next batch instead of running it to the end and throwing the result away.
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*TRAIN, *TINY_FLAGS, "--output-dir", str(out), "--batch-size", "16", "--max-steps", "2",
         "--val-size", "0", "--eval-batch-size", "20", "--checkpoint-every", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**ENV, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("capsfast: end of run: test"):
            break
    else:
        pytest.fail("".join(lines) + proc.communicate()[1][-2000:])
    time.sleep(0.3)  # into the evaluation
    proc.send_signal(signal.SIGINT)
    start = time.time()
    stdout, err = proc.communicate(timeout=300)
    seconds = time.time() - start
    assert proc.returncode == 3, err[-2000:]
    assert "Traceback" not in err
    assert "stopped on request at the end of the run, during its test phase (cut short)" in stdout
    assert seconds < 20, f"the stop took {seconds:.0f} s"
    assert not (out / "summary.json").exists()
    verify(list_checkpoints(out)[0])


def test_host_memory_running_out_is_one_line(tmp_path):
    # A real allocation failure: the trainer's address space is capped a little above what it
    # needs to start, and batch 2048 asks for far more in its first step.
    def limit():
        cap = 6 * 2**30
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    p = subprocess.run(
        [*TRAIN, *TINY_FLAGS, "--output-dir", str(tmp_path / "run"), "--batch-size", "8192",
         "--max-steps", "1", "--val-size", "0", "--test-size", "16"],
        cwd=ROOT, capture_output=True, text=True, env=ENV, preexec_fn=limit, timeout=300,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, p.stderr[-3000:]
    assert "out of host memory" in lines[0] and "lower --batch-size (now 8192)" in lines[0]


def test_the_readme_launches_quietly_and_the_error_comes_first(tmp_path):
    """Every `accelerate launch` command in the README carries -q, and through it an error is
    the trainer's one line, with no launcher traceback after it (the issue's example: cifar10
    without its files); the launcher's own exit status is 1."""
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in readme if line.startswith("accelerate launch ")]
    assert len(commands) >= 5
    assert all(line.startswith("accelerate launch -q ") for line in commands), commands
    p = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         str(ROOT / "launch" / "train.py"), "--dataset", "cifar10", "--data-dir",
         str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), "--report-to", "none"],
        cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "CalledProcessError" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("capsfast: error: "), p.stderr[-3000:]
    assert "data_batch_1" in errors[0] and "--download" in errors[0]
