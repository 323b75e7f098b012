"""A full disk, for real: the output directory is a small tmpfs, sized from a reference run's
own files so that the write that fails is the one named (the checkpoint's weights, written by
safetensors; its optimiser state, by torch's zip writer; the export). Each failure is one line
(exit code 2) that names the file; the last complete checkpoint stays and verifies, no partial
file is left to keep the disk full, and once there is space the resume ends where an
uninterrupted run ends. (tests/test_train_faults.py injects ENOSPC at every other write site.)

Mounting a tmpfs needs root (CAP_SYS_ADMIN), which CI has; elsewhere these tests are skipped and
say why."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from capsfast.checkpoint import TEST_SIGNAL_ENV, list_checkpoints, verify
from capsfast.train import train
from tests.test_train import small_cfg, synthetic_mnist
from tests.test_train_faults import assert_same_weights, run_train, weights

PAGE = 4096
TINY = dict(
    primary_types=1,
    compile=False,
    max_steps=12,
    checkpoint_every=4,
    keep_checkpoints=1,
    cpu_threads=1,
)


def cfg(out, **kw):
    return small_cfg(out, **{**TINY, **kw})


def pages(path: Path) -> int:
    """Bytes a file takes on a tmpfs (whole pages)."""
    return -(-path.stat().st_size // PAGE) * PAGE


@pytest.fixture(scope="module")
def data():
    return synthetic_mnist()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """The same run on a disk with room: what the resumed runs must end with, and the sizes."""
    out = tmp_path_factory.mktemp("reference")
    os.environ[TEST_SIGNAL_ENV] = "summary"  # stop before the figures (seconds of matplotlib)
    try:
        assert train(cfg(out), data).get("stopped")
    finally:
        del os.environ[TEST_SIGNAL_ENV]
    checkpoint = list_checkpoints(out)[0]
    sizes = {p.name: pages(p) for p in checkpoint.iterdir()}
    return out, sizes, sum(sizes.values()), pages(out / "model" / "model.safetensors")


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of `size` bytes; remount(size) gives it more room."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = []

    def mount(size: int) -> Path:
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)  # fmt: skip
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {p.stderr.strip()}")
        mounted.append(where)
        return where

    def remount(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)

    yield mount, remount
    for m in mounted:
        subprocess.run(["umount", "-l", str(m)], check=False)


def check_failure(out: Path, err: str, names: str, previous: str | None) -> None:
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert "disk is full" in err and names in err and "--resume auto" in err, err
    if previous:
        assert f"the previous checkpoint {out / 'checkpoints' / previous} is intact" in err, err
    assert [p.name for p in list_checkpoints(out)] == [previous or "step-00000012"]
    verify(list_checkpoints(out)[0])
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
    assert not leftovers, f"partial files left behind: {leftovers}"


def test_checkpoint_weights_on_a_full_disk_then_resume(reference, tmpfs, data, capsys,
                                                       monkeypatch):  # fmt: skip
    ref, sizes, checkpoint, _ = reference
    mount, remount = tmpfs
    # Room for one checkpoint and half the next one's weights (safetensors' writer fails).
    out = mount(checkpoint + sizes["model.safetensors"] // 2)
    code, _, err = run_train(cfg(out), data, capsys)
    assert code == 2
    # (safetensors removes its partial file and names none: the message names the checkpoint)
    check_failure(out, err, f"cannot write checkpoint {out / 'checkpoints' / 'step-00000008'}",
                  "step-00000004")  # fmt: skip
    remount(8 * checkpoint)  # space freed
    with monkeypatch.context() as m:  # as far as the reference went
        m.setenv(TEST_SIGNAL_ENV, "summary")
        code, _, err = run_train(cfg(out, resume="auto"), data, capsys)
    assert code == 3, err
    assert_same_weights(weights(out), weights(ref))
    assert_same_weights(weights(out, "model"), weights(ref, "model"))


def test_checkpoint_optimizer_state_on_a_full_disk(reference, tmpfs, data, capsys):
    _, sizes, checkpoint, _ = reference
    mount, _ = tmpfs
    # The next checkpoint's weights fit, half its Adam state does not (torch's zip writer,
    # which reports no errno: "unexpected pos").
    out = mount(checkpoint + sizes["model.safetensors"] + sizes["optimizer.bin"] // 2)
    code, _, err = run_train(cfg(out), data, capsys)
    assert code == 2
    check_failure(out, err, "step-00000008/optimizer.bin", "step-00000004")


def test_the_export_on_a_full_disk(reference, tmpfs, data, capsys):
    _, _, checkpoint, export = reference
    mount, _ = tmpfs
    # No periodic checkpoints: the final one fits, the export after it does not.
    out = mount(checkpoint + export // 2)
    code, _, err = run_train(cfg(out, checkpoint_every=0), data, capsys)
    assert code == 2
    check_failure(out, err, f"cannot export the model to {out / 'model'}", None)
    assert not (out / "model" / "model.safetensors").exists()
