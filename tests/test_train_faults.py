"""Faults that must not lose work or give a silently wrong result: corrupt checkpoints, resumes
with changed flags, signals during the end of a run, a second Ctrl-C, SIGKILL and SIGTERM mid-run,
a non-finite loss, a full disk at every write site, an unreachable W&B, and bad flags and files
(one line, exit code 2, no traceback).

Runs that need a real signal or a user's command line are fresh `python launch/train.py`
processes; the others run the trainer in-process on the synthetic data of test_train.py."""

from __future__ import annotations

import builtins
import errno
import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from capsfast.checkpoint import CorruptCheckpoint, list_checkpoints, verify
from capsfast.errors import run_main
from capsfast.train import END_PHASES, train
from tests.small_runs import small_cfg, synthetic_mnist

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- in-process helpers
def run_train(cfg, data, capsys) -> tuple[int, str, str]:
    """train() inside the entry points' error boundary, as a user meets it: (code, out, err)."""
    code = run_main(lambda _: 3 if train(cfg, data=data).get("stopped") else 0, "capsfast")
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def weights(out: Path, which: str = "checkpoint") -> dict:
    path = list_checkpoints(out)[0] if which == "checkpoint" else out / "model"
    return load_file(path / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def data():
    return synthetic_mnist()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """An uninterrupted run: 12 steps, checkpoints at 4, 8 and 12, EMA on (its state must
    survive too)."""
    out = tmp_path_factory.mktemp("reference")
    train(small_cfg(out, max_steps=12, checkpoint_every=4, keep_checkpoints=5, ema_decay=0.9), data)
    return out


def cfg_like_reference(out, **kw):
    base = dict(max_steps=12, checkpoint_every=4, keep_checkpoints=5, ema_decay=0.9)
    return small_cfg(out, **{**base, **kw})


# --------------------------------------------------------------------------- corrupt checkpoints
CHECKPOINT_FILES = [
    "model.safetensors",  # the weights
    "optimizer.bin",  # Adam's moments
    "random_states_0.pkl",  # RNG
    "custom_checkpoint_0.pkl",  # TrainState: step, best validation, records
    "custom_checkpoint_1.pkl",  # EMA
]


def test_a_checkpoint_holds_exactly_these_files(reference):
    newest = list_checkpoints(reference)[0]
    files = sorted(p.name for p in newest.iterdir() if p.name != "capsfast_checkpoint.json")
    assert files == sorted(CHECKPOINT_FILES)
    assert set(verify(newest)["files"]) == set(CHECKPOINT_FILES)


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_corrupt_same_size_file_is_skipped_by_resume_auto(reference, tmp_path, data, capsys, name):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    shutil.rmtree(out / "checkpoints" / "step-00000012")  # stopped after step 8, say
    newest = list_checkpoints(out)[0]
    assert newest.name == "step-00000008"
    target = newest / name
    raw = bytearray(target.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 8] = bytes(b ^ 0x5A for b in raw[middle : middle + 8])  # same size
    target.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpoint, match=f"{name} does not match its recorded SHA-256"):
        verify(newest)

    code, stdout, err = run_train(cfg_like_reference(out, resume="auto"), data, capsys)
    assert code == 0, err
    assert f"skipping checkpoint {newest}" in stdout and name in stdout and "SHA-256" in stdout
    assert "resumed from" in stdout and "step-00000004" in stdout  # the next one back
    assert_same_weights(weights(out), weights(reference))
    assert_same_weights(weights(out, "model"), weights(reference, "model"))


def test_resume_path_at_a_corrupt_checkpoint_is_a_one_line_error(reference, tmp_path, data, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    bad = list_checkpoints(out)[0]
    (bad / "model.safetensors").write_bytes(b"\0" * (bad / "model.safetensors").stat().st_size)
    code, _, err = run_train(cfg_like_reference(out, resume=str(bad)), data, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and f"--resume {bad}" in err and "SHA-256" in err


def test_an_export_never_replaces_a_better_one_of_the_same_run(reference, tmp_path, data, capsys):
    # Resuming from an older checkpoint than the export (the run died after exporting at step
    # 12 but its newest checkpoint is step 4): the export's own record of its validation
    # accuracy is the best so far, so a worse model cannot replace it.
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for p in list_checkpoints(out)[:2]:
        shutil.rmtree(p)
    config = json.loads((out / "model" / "config.json").read_text())
    config["meta"]["val_accuracy"] = 1.01  # better than anything this run can reach
    (out / "model" / "config.json").write_text(json.dumps(config))
    before = weights(out, "model")
    code, _, err = run_train(cfg_like_reference(out, resume="auto"), data, capsys)
    assert code == 0, err
    assert_same_weights(weights(out, "model"), before)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val_accuracy"] == 1.01


# --------------------------------------------------------------------------- resume with new flags
def test_resume_with_another_batch_size_is_refused_naming_the_original(reference, tmp_path, data,
                                                                       capsys):  # fmt: skip
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    code, _, err = run_train(cfg_like_reference(out, resume="auto", batch_size=32), data, capsys)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert "was trained with --batch-size 16" in err and "new --output-dir" in err


def test_a_new_learning_rate_on_resume_takes_effect(reference, tmp_path, data, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    shutil.rmtree(out / "checkpoints" / "step-00000012")
    shutil.rmtree(out / "checkpoints" / "step-00000008")
    cfg = cfg_like_reference(out, resume="auto", lr=1e-4)
    code, _, err = run_train(cfg, data, capsys)
    assert code == 0, err
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    before = [r["lr"] for r in records if r["kind"] == "train" and r["step"] <= 4]
    after = [r["lr"] for r in records if r["kind"] == "train" and r["step"] > 4]
    assert before and all(lr == pytest.approx(small_cfg(out).scaled_lr()) for lr in before)
    assert after and all(lr == pytest.approx(cfg.scaled_lr()) for lr in after)


# --------------------------------------------------------------------------- processes and signals
FLAGS = [
    "--batch-size",
    "16",
    "--max-steps",
    "12",
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
    "no",
    "--no-compile",
    "--primary-types",
    "2",
    "--crop",
    "20",
    "--no-figures",
]  # fmt: skip  (the tiny model of small_cfg, no figures)


def launch(out, *extra, env=None) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), *FLAGS, "--output-dir", str(out)]
    return subprocess.Popen(
        [*cmd, *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "WANDB_MODE": "disabled", **(env or {})},
    )  # fmt: skip


def finish(proc, timeout=600) -> tuple[int, str, str]:
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    code, _, err = finish(launch(out))
    assert code == 0, err[-2000:]
    return out


def same_results(a: Path, b: Path) -> None:
    assert_same_weights(weights(a, "model"), weights(b, "model"))
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("steps", "test_accuracy", "test_size", "best_val_accuracy"):
        assert sa[key] == sb[key], key
    ra, rb = (
        [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)
    )
    assert [(r["kind"], r["step"], r.get("val_accuracy")) for r in ra] == [
        (r["kind"], r["step"], r.get("val_accuracy")) for r in rb
    ]


@pytest.mark.parametrize("phase", END_PHASES)
def test_sigterm_at_each_phase_of_the_end_of_a_run_loses_nothing(reference, tmp_path, data,
                                                                 capsys, monkeypatch, phase):  # fmt: skip
    # A real SIGTERM to this process as the phase starts (CAPSFAST_TEST_SIGNAL_AT); no periodic
    # checkpoints, as in the fast preset: only the end's own checkpoint can save the run.
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setenv("CAPSFAST_TEST_SIGNAL_AT", phase)
        code, stdout, err = run_train(cfg_like_reference(out, checkpoint_every=0), data, capsys)
    if phase == END_PHASES[-1]:  # during the last phase: it finishes, nothing is left to do
        assert code == 0, err
        same_results(reference, out)
        return
    assert code == 3, err
    assert "stopped on request at the end of the run" in stdout and "--resume auto" in stdout
    assert [p.name for p in list_checkpoints(out)] == ["step-00000012"]  # the final one
    verify(list_checkpoints(out)[0])
    code, stdout, err = run_train(cfg_like_reference(out, checkpoint_every=0, resume="auto"),
                                  data, capsys)  # fmt: skip
    assert code == 0, err
    assert "resumed from" in stdout
    same_results(reference, out)


def drain(stream, into: list[str]) -> None:
    """Read a child's pipe to its end, a character at a time, as it comes."""
    for char in iter(lambda: stream.read(1), ""):
        into.append(char)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = launch(out)
    deadline = time.time() + 600
    while not any(p.name == "step-00000004" for p in list_checkpoints(out)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    # Read stderr as it comes, so the second Ctrl-C goes only once the first was heard: two
    # signals that arrive while a long C call holds the main thread run Python's handler once.
    chunks: list[str] = []
    readers = [threading.Thread(target=drain, args=(proc.stderr, chunks)),
               threading.Thread(target=drain, args=(proc.stdout, []))]  # fmt: skip
    for reader in readers:
        reader.start()
    proc.send_signal(signal.SIGINT)
    while "saving a checkpoint at the next step" not in "".join(chunks):
        assert proc.poll() is None and time.time() < deadline, "".join(chunks)[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=600)
    for reader in readers:
        reader.join()
    err = "".join(chunks)
    assert code == 130, err[-2000:]
    assert "Traceback" not in err and "stopped at once" in err and "--resume auto" in err
    newest = list_checkpoints(out)[0]
    verify(newest)  # complete and intact
    assert f"{newest}" in err
    code, _, err = finish(launch(out, "--resume", "auto"))
    assert code == 0, err[-2000:]
    same_results(uninterrupted, out)


def test_the_nonfinite_stop_advice_is_a_command_that_works(tmp_path, data, capsys):
    out = tmp_path / "run"
    code, _, err = run_train(small_cfg(out, max_steps=12, lr=1e30), data, capsys)
    assert code == 2 and "non-finite loss" in err and "--resume auto" in err and "--lr" in err
    # The advice, followed: a lower --lr and --resume auto. The new rate applies from the saved
    # step (the schedule is a function of the flags and the step, not restored from the state).
    code, _, err = run_train(small_cfg(out, max_steps=12, lr=1e-3, resume="auto"), data, capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and 0 < summary["final_train_loss"] < 10


# --------------------------------------------------------------------------- a full disk
class FullDisk:
    """Writes whose path contains `where` fail with ENOSPC from the `after`-th such write on:
    Python's open (json, text files, matplotlib), torch.save's zip writer and safetensors' own
    writer (both write from C++/Rust, past Python's open)."""

    def __init__(self, monkeypatch, where: str, after: int = 1):
        self.where, self.after, self.seen = where, after, 0
        real_open, real_serialize = builtins.open, None
        import safetensors.torch as st

        real_serialize = st.serialize_file

        def check(path, mode="r"):
            if any(c in mode for c in "wax+") and self.where in str(path):
                self.seen += 1
                if self.seen >= self.after:
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))

        def fake_open(file, mode="r", *args, **kwargs):
            check(file, mode)
            return real_open(file, mode, *args, **kwargs)

        def fake_serialize(tensors, filename, *args, **kwargs):
            check(filename, "wb")
            return real_serialize(tensors, filename, *args, **kwargs)

        real_zip_writer = torch.serialization._open_zipfile_writer

        def fake_zip_writer(name_or_buffer, *args, **kwargs):
            if isinstance(name_or_buffer, (str, os.PathLike)):
                check(name_or_buffer, "wb")
            return real_zip_writer(name_or_buffer, *args, **kwargs)

        monkeypatch.setattr(torch.serialization, "_open_zipfile_writer", fake_zip_writer)
        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(st, "serialize_file", fake_serialize)


WRITE_SITES = {  # site: (path fragment, nth write there that fails)
    "checkpoint weights": (".tmp-step-00000008/model.safetensors", 1),
    "checkpoint optimizer": (".tmp-step-00000008/optimizer.bin", 1),
    "checkpoint marker": (".tmp-step-00000008/capsfast_checkpoint.json", 1),
    "export weights": ("model/model.safetensors", 1),
    "export config": ("model/config.json", 1),
    "metrics": ("metrics.jsonl", 6),
    "summary": ("summary.json", 1),
    "model card": ("model/README.md", 1),
    "curves": ("curves.png", 1),
    "figures": ("figures/", 1),
}


@pytest.mark.parametrize("site", WRITE_SITES)
def test_a_full_disk_at_each_write_site_is_one_line_and_resumable(reference, tmp_path, data,
                                                                  capsys, monkeypatch, site):  # fmt: skip
    out = tmp_path / "run"
    where, after = WRITE_SITES[site]
    with monkeypatch.context() as m:
        FullDisk(m, where, after)
        figures = site in ("curves", "figures")  # drawn only where their write fails
        code, _, err = run_train(cfg_like_reference(out, figures=figures), data, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "disk is full" in err and "--resume auto" in err
    saved = list_checkpoints(out)
    assert saved, "no checkpoint left"
    for p in saved:
        verify(p)  # every listed checkpoint is complete
    if site.startswith("checkpoint"):
        assert "the previous checkpoint" in err and "step-00000004" in err
        assert not list((out / "checkpoints").glob(".tmp-*")), "the failed write was not cleaned"
    code, _, err = run_train(cfg_like_reference(out, resume="auto"), data, capsys)
    assert code == 0, err
    assert_same_weights(weights(out), weights(reference))
    assert_same_weights(weights(out, "model"), weights(reference, "model"))


# --------------------------------------------------------------------------- bad flags and files
def corrupt_gzip_dir(tmp_path: Path) -> Path:
    """The shipped MNIST with the deflate stream of the test labels damaged (header intact)."""
    from capsfast.data import DEFAULT_DATA_DIR

    d = tmp_path / "mnist"
    shutil.copytree(DEFAULT_DATA_DIR, d)
    f = d / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(f.read_bytes())
    raw[40:200] = bytes(range(160))
    f.write_bytes(bytes(raw))
    with pytest.raises(Exception):  # noqa: B017  (the file really is broken)
        gzip.decompress(bytes(raw))
    return d


BAD_TRAIN_INPUTS = {  # case: (extra flags, text the one line must contain)
    "batch larger than the training set": (["--batch-size", "100000"], "--batch-size 100000"),
    # (--val-size above a tenth of the training images is capped and said: test_datasets.py)
    "negative validation size": (["--val-size", "-5"], "--val-size must be >= 0"),
    "output dir is a file": (["--output-dir", "{file}"], "is a file"),
    "corrupt deflate stream": (["--data-dir", "{gzip}"], "t10k-labels-idx1-ubyte.gz"),
    "resume from nothing": (["--resume", "{tmp}/nothing"], "not a checkpoint directory"),
    "unknown preset": (["--preset", "turbo"], "invalid choice"),
}


@pytest.mark.parametrize("case", BAD_TRAIN_INPUTS)
def test_bad_train_input_is_one_line_with_exit_code_2(tmp_path, case):
    flags, expected = BAD_TRAIN_INPUTS[case]
    (tmp_path / "a-file").write_text("")
    subs = {"{file}": str(tmp_path / "a-file"), "{tmp}": str(tmp_path)}
    if "{gzip}" in flags:
        subs["{gzip}"] = str(corrupt_gzip_dir(tmp_path))
    flags = [subs.get(f, f).replace("{tmp}", str(tmp_path)) for f in flags]
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--output-dir",
           str(tmp_path / "out"), "--report-to", "none", "--max-steps", "1", *flags]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "WANDB_MODE": "disabled"})  # fmt: skip
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and expected in lines[0], p.stderr[-2000:]


def test_ctrl_c_in_a_terminal_under_accelerate_launch_ends_cleanly(tmp_path):
    """A person runs `accelerate launch launch/train.py` in a terminal and presses Ctrl-C: the
    trainer saves and prints where and how to resume, on lines of their own; neither the
    launcher nor the trainer prints a traceback."""
    import fcntl
    import pty
    import termios

    out = tmp_path / "run"
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "launch" / "train.py"), *FLAGS, "--max-steps", "400", "--output-dir",
           str(out)]  # fmt: skip

    def controlling_terminal():  # a session of its own, with the pty as its terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        preexec_fn=controlling_terminal, env={**os.environ, "WANDB_MODE": "disabled"},
    )  # fmt: skip
    os.close(slave)
    screen = bytearray()

    def read_for(seconds: float, until: bytes | None = None) -> None:
        import select

        deadline = time.time() + seconds
        while time.time() < deadline and (until is None or until not in screen):
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    screen.extend(os.read(master, 65536))
                except OSError:  # the terminal closed: every process has exited
                    return

    read_for(600, until=b"s/step")  # training, past the warm-up
    os.write(master, b"\x03")  # Ctrl-C, as the terminal driver sends it: SIGINT to the foreground
    read_for(300)
    proc.wait(timeout=60)
    text = screen.decode(errors="replace").replace("\r", "")
    assert "Traceback" not in text, text[-3000:]
    tail = text[text.index("stopped on request") - len("capsfast: ") :]
    lines = tail.splitlines()
    assert lines[0].startswith("capsfast: stopped on request at step") and "checkpoint" in lines[0]
    assert lines[1] == "capsfast: to resume, run the same command again with --resume auto"
    assert proc.returncode == 0  # the launcher would print a traceback for any other code
    verify(list_checkpoints(out)[0])


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["train.py", "--preset", "quick"], "run the same command again with --resume auto"),
        (["train.py", "--resume", "auto"], "run the same command again"),
        (["train.py", "--resume=runs/x/checkpoints/step-00000200"], "run the same command again"),
    ],
)
def test_the_resume_hint_does_not_repeat_a_resume_flag(monkeypatch, argv, hint):
    from capsfast.train import resume_hint

    monkeypatch.setattr(sys, "argv", argv)
    assert resume_hint() == hint


# --------------------------------------------------------------------------- killed, stopped, poisoned
# Fresh processes as a user starts them: killed outright, stopped, a corrupt newest checkpoint,
# another model's checkpoint, a non-finite loss, an unreachable W&B.
STEPS = 12  # FLAGS' --max-steps


def run_process(out, *extra, timeout=300) -> tuple[int, str, str]:
    return finish(launch(out, *extra), timeout)


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


def test_sigkill_mid_epoch_then_resume_auto(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = launch(out)
    wait_for_checkpoint(out, 8, proc)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait()
    # A crash while writing leaves a .tmp- directory; resume must never pick it up.
    (out / "checkpoints" / ".tmp-step-00000010").mkdir()
    code, stdout, err = run_process(out, "--resume", "auto")
    assert code == 0, err[-2000:]
    assert "resumed from" in stdout and "step-00000008" in stdout
    assert_same_run(uninterrupted, out)


def test_sigterm_saves_at_the_next_step_and_says_how_to_resume(uninterrupted, tmp_path):
    out = tmp_path / "terminated"
    proc = launch(out)
    wait_for_checkpoint(out, 4, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr[-2000:]
    assert "--resume auto" in stdout
    assert "SIGTERM: saving a checkpoint at the next step" in stderr  # heard at once
    stopped_at = list_checkpoints(out)[0]
    assert 4 < int(stopped_at.name.split("-")[1]) < STEPS  # saved at a later step boundary
    assert not (out / "summary.json").exists()
    code, _, err = run_process(out, "--resume", "auto")
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
    code, stdout, err = run_process(out, "--resume", "auto")
    assert code == 0, err[-2000:]
    assert "skipping checkpoint" in stdout and "step-00000004" in stdout
    assert "no usable checkpoint" in stdout  # nothing else left: a fresh start
    assert_same_run(uninterrupted, out)


def test_checkpoint_of_another_model_is_a_one_line_error(uninterrupted, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    code, _, err = run_process(out, "--resume", "auto", "--routing-iters", "2")
    assert code == 2
    assert "different model" in err and "routing_iters" in err and "--routing-iters" in err
    assert "Traceback" not in err


def test_nonfinite_loss_stops_naming_the_steps_and_saves_the_last_good_state(tmp_path):
    out = tmp_path / "nan"
    code, _, err = run_process(out, "--lr", "1e30", "--checkpoint-every", "0")
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
    code, _, err = run_process(out, "--lr", "1e30", "--checkpoint-every", "0", "--skip-nonfinite")
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
        # the fallback does not depend on the model: a small one, fp32, no figures
        "--primary-types",
        "2",
        "--mixed-precision",
        "no",
        "--no-figures",
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
