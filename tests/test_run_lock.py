"""A run owns its output directory (capsfast/run_lock.py): a second run meets the lock and names
its holder; a run that died leaves no lock behind; a new run over another run's results is
refused and touches nothing; --resume auto takes only checkpoints of the directory's own run;
--overwrite starts over. Real runs of the trainer (the tiny model: one primary capsule type), a
real second process, real signals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capsfast.checkpoint import MARKER, list_checkpoints, verify
from capsfast.run_lock import LOCK, RunLock
from tests.test_train import small_cfg, synthetic_mnist
from tests.test_train_faults import run_train

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(primary_types=1, compile=False, checkpoint_every=4, keep_checkpoints=5, cpu_threads=1)


def cfg(out, **kw):
    return small_cfg(out, **{**TINY, **kw})


def run_to_the_test(config, data, capsys, monkeypatch):
    """A run, stopped (a real SIGTERM, exit code 3) once its test result is in summary.json:
    every file of a run but the figures, which take seconds of matplotlib."""
    with monkeypatch.context() as m:
        m.setenv("CAPSFAST_TEST_SIGNAL_AT", "summary")
        return run_train(config, data, capsys)


@pytest.fixture(scope="module")
def data():
    return synthetic_mnist()


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` (the lock file aside) and the SHA-256 of its bytes."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != LOCK
    }


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("capsfast: error: "), err
    return lines[0]


def test_a_second_run_meets_the_lock_and_a_dead_holder_leaves_none(tmp_path, data, capsys,
                                                                   monkeypatch):  # fmt: skip
    out = tmp_path / "run"
    # The first run: a real trainer process, on real MNIST, long enough to be running.
    holder = subprocess.Popen(
        [sys.executable, str(ROOT / "launch" / "train.py"), "--output-dir", str(out),
         "--primary-types", "1", "--batch-size", "16", "--max-steps", "100000", "--no-compile",
         "--mixed-precision", "no", "--report-to", "none", "--checkpoint-every", "0",
         "--cpu-threads", "1", "--val-size", "64", "--test-size", "32"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:  # until the holder has taken the lock and written who it is
            assert holder.poll() is None, holder.communicate()[1][-2000:]
            assert time.time() < deadline, "the first run never took the lock"
            try:
                if json.loads((out / LOCK).read_text()).get("pid") == holder.pid:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        # The second run, with another seed, as in the issue: refused before it writes anything.
        code, _, err = run_train(cfg(out, seed=1), data, capsys)
        assert code == 2
        line = one_error_line(err)
        assert f"--output-dir {out} is in use by another run" in line
        assert f"PID {holder.pid} on {socket.gethostname()}" in line
        assert f"kill {holder.pid}" in line and "choose another --output-dir" in line
        assert holder.poll() is None  # the holder was not disturbed
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no chance to clean up
        holder.wait(timeout=60)
    # The dead run's lock holds nothing back: the directory's run starts over (no checkpoint).
    code, stdout, err = run_to_the_test(cfg(out, max_steps=2, resume="auto"), data, capsys,
                                        monkeypatch)  # fmt: skip
    assert code == 3, err
    assert "no usable checkpoint" in stdout and (out / "summary.json").is_file()
    # And the finished run let go of it too.
    RunLock(out).release()


def test_a_run_never_mixes_with_another_runs_results(tmp_path, data, capsys, monkeypatch):
    out, other = tmp_path / "run", tmp_path / "other"
    code, _, err = run_to_the_test(cfg(out, max_steps=4), data, capsys, monkeypatch)
    assert code == 3, err
    before = snapshot(out)
    first_run = json.loads((out / "config.json").read_text())["run_id"]

    # A new run (another learning rate) in the directory: refused, one line, nothing touched.
    code, _, err = run_train(cfg(out, max_steps=8, lr=4e-3), data, capsys)
    assert code == 2
    line = one_error_line(err)
    assert f"--output-dir {out} holds another run" in line and "step" in line
    assert "--resume auto" in line and "--overwrite" in line
    assert snapshot(out) == before

    # A checkpoint of another run (same model and data flags) lands in the directory, newer
    # than the directory's own: --resume auto leaves it out, by name, and resumes its own run.
    code, _, err = run_to_the_test(cfg(other, max_steps=8, lr=4e-3), data, capsys, monkeypatch)
    assert code == 3, err
    foreign = out / "checkpoints" / "step-00000008"
    shutil.copytree(other / "checkpoints" / "step-00000008", foreign)
    code, stdout, err = run_to_the_test(cfg(out, max_steps=8, resume="auto"), data, capsys,
                                        monkeypatch)  # fmt: skip
    assert code == 3, err
    assert f"skipping checkpoint {foreign}: it belongs to another run" in stdout
    assert f"resumed from {out / 'checkpoints' / 'step-00000004'} at step 4" in stdout
    assert json.loads((out / "config.json").read_text())["run_id"] == first_run

    # --overwrite starts over there: the earlier run's files go, the new run's come.
    code, stdout, err = run_to_the_test(cfg(out, max_steps=4, lr=4e-3, overwrite=True), data,
                                        capsys, monkeypatch)  # fmt: skip
    assert code == 3, err
    assert f"--overwrite: removed the earlier run in {out}" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 4e-3 and config["run_id"] != first_run
    assert [p.name for p in list_checkpoints(out)] == ["step-00000004"]
    marker = json.loads((list_checkpoints(out)[0] / MARKER).read_text())
    assert marker["run_id"] == config["run_id"]
    verify(list_checkpoints(out)[0])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 4  # none of the earlier run's 8 steps


def test_overwrite_and_resume_together_are_refused():
    with pytest.raises(ValueError, match="--overwrite starts the run over and --resume"):
        small_cfg("unused", overwrite=True, resume="auto")
