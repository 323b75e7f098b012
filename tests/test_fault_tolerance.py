"""Runs that are killed, stopped, corrupted or poisoned: no work lost, clear messages.

Every run here is a fresh `python launch/train.py` process on real MNIST, as a user starts it.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from capsfast.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parent.parent
STEPS = 12
FLAGS = [
    "--batch-size",
    "16",
    "--max-steps",
    str(STEPS),
    "--val-size",
    "64",
    "--test-size",
    "32",
    "--report-to",
    "none",
    "--checkpoint-every",
    "4",
    "--log-every",
    "2",
    "--keep-checkpoints",
    "5",
    "--cpu-threads",
    "2",
    "--mixed-precision",
    "no",  # fp32 and eager: tests of behaviour pin both (the CPU default is compiled bf16 where it can)
    "--no-compile",
    # A tiny CapsNet (2 primary capsule types on 20 px crops: 1.4M parameters, a quarter of the
    # step): the behaviour asserted here does not depend on the model's size.
    "--primary-types",
    "2",
    "--crop",
    "20",
    "--no-figures",  # no test here looks at them: half of a short run's time
]


def start(out, *extra):
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        *FLAGS,
        "--output-dir",
        str(out),
        *extra,
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )


def run(out, *extra, timeout=300):
    p = start(out, *extra)
    stdout, stderr = p.communicate(timeout=timeout)
    return p.returncode, stdout, stderr


def wait_for_checkpoint(out, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(p.name == f"step-{step:08d}" for p in list_checkpoints(out)):
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint step {step} in {out}")


def final_weights(out):
    return load_file(list_checkpoints(out)[0] / "model.safetensors")


def assert_same_run(a, b):
    wa, wb = final_weights(a), final_weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7, msg=k)
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    assert sa["steps"] == sb["steps"] == STEPS
    assert sa["test_accuracy"] == sb["test_accuracy"]
    assert sa["best_val_accuracy"] == sb["best_val_accuracy"]
    assert sa["final_train_loss"] == pytest.approx(sb["final_train_loss"], rel=1e-5)
    ra = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    # Epoch records: the same, every metric, including the epoch's running sums.
    ea, eb = ([r for r in rs if r["kind"] == "epoch"] for rs in (ra, rb))
    assert [r["step"] for r in ea] == [r["step"] for r in eb]
    for x, y in zip(ea, eb, strict=True):
        compare_records(x, y)
    # Train records (one per logged window): a stop adds one window at the stop step (the sync
    # that saved the checkpoint), which splits one window of the uninterrupted run in two.
    # Every other window is the same steps, so the same means.
    wa, wb = (windows(rs) for rs in (ra, rb))
    assert {s for _, s in wa} <= {s for _, s in wb}
    assert len(set(wa) & set(wb)) >= len(wa) - 1  # at most one window split
    assert len({s for _, s in wb} - {s for _, s in wa}) <= 1, (list(wa), list(wb))
    for window in set(wa) & set(wb):
        compare_records(wa[window], wb[window])


def windows(records) -> dict:
    """(previous logged step, step) -> the train record of that window."""
    out, previous = {}, 0
    for r in records:
        if r["kind"] == "train":
            out[(previous, r["step"])] = r
            previous = r["step"]
    return out


def compare_records(x, y):
    for key in ("epoch", "step", "lr") + (("val_accuracy",) if x["kind"] == "epoch" else ()):
        assert x[key] == y[key], key
    for key in ("train_loss", "margin_loss", "recon_loss", "train_accuracy"):
        assert x[key] == pytest.approx(y[key], rel=1e-5), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    code, _, err = run(out)
    assert code == 0, err[-2000:]
    return out


def test_sigkill_mid_epoch_then_resume_auto(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = start(out)
    wait_for_checkpoint(out, 8, proc)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait()
    # A crash while writing leaves a .tmp- directory; resume must never pick it up.
    (out / "checkpoints" / ".tmp-step-00000010").mkdir()
    code, stdout, err = run(out, "--resume", "auto")
    assert code == 0, err[-2000:]
    assert "resumed from" in stdout and "step-00000008" in stdout
    assert_same_run(uninterrupted, out)


def test_sigterm_saves_at_the_next_step_and_says_how_to_resume(uninterrupted, tmp_path):
    out = tmp_path / "terminated"
    proc = start(out)
    wait_for_checkpoint(out, 4, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr[-2000:]
    assert "--resume auto" in stdout
    assert "SIGTERM: saving a checkpoint at the next step" in stderr  # heard at once
    stopped_at = list_checkpoints(out)[0]
    assert 4 < int(stopped_at.name.split("-")[1]) < STEPS  # saved at a later step boundary
    assert not (out / "summary.json").exists()
    code, _, err = run(out, "--resume", "auto")
    assert code == 0, err[-2000:]
    assert_same_run(uninterrupted, out)


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(uninterrupted, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    for p in list_checkpoints(out)[:2]:  # drop steps 12 and 8; corrupt 4 is then skipped too
        shutil.rmtree(p)
    newest = list_checkpoints(out)[0]
    assert newest.name == "step-00000004"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # half-written
    code, stdout, err = run(out, "--resume", "auto")
    assert code == 0, err[-2000:]
    assert "skipping checkpoint" in stdout and "step-00000004" in stdout
    assert "no usable checkpoint" in stdout  # nothing else left: a fresh start
    assert_same_run(uninterrupted, out)


def test_checkpoint_of_another_model_is_a_one_line_error(uninterrupted, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    code, _, err = run(out, "--resume", "auto", "--routing-iters", "2")
    assert code == 2
    assert "different model" in err and "routing_iters" in err and "--routing-iters" in err
    assert "Traceback" not in err


def test_nonfinite_loss_stops_naming_the_steps_and_saves_the_last_good_state(tmp_path):
    out = tmp_path / "nan"
    code, _, err = run(out, "--lr", "1e30", "--checkpoint-every", "0")
    assert code == 2
    assert "non-finite loss at step" in err and "--skip-nonfinite" in err
    assert "Traceback" not in err
    saved = list_checkpoints(out)
    assert len(saved) == 1
    weights = load_file(saved[0] / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    good_step = int(saved[0].name.split("-")[1])
    assert f"(step {good_step})" in err


def test_skip_nonfinite_counts_skips_and_finishes(tmp_path):
    out = tmp_path / "skip"
    code, _, err = run(out, "--lr", "1e30", "--checkpoint-every", "0", "--skip-nonfinite")
    assert code == 0, err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["skipped_steps"] > 0


def test_unreachable_wandb_falls_back_to_offline_quickly(tmp_path):
    out = tmp_path / "wandb"
    env = {
        **os.environ,
        "WANDB_API_KEY": "x" * 40,
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_SILENT": "true",
    }
    env.pop("WANDB_MODE", None)
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        "--batch-size",
        "8",
        "--max-steps",
        "2",
        "--val-size",
        "16",
        "--test-size",
        "16",
        "--no-compile",
        "--output-dir",
        str(out),
        "--report-to",
        "wandb",
    ]
    t = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "logging offline" in p.stdout + p.stderr
    assert list((out / "wandb").glob("offline-run-*"))
    assert time.time() - t < 120
