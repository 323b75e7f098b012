"""Fault tolerance: verified atomic checkpoints, resume, stop requests, the last known good state.

A checkpoint is `accelerator.save_state` (model, optimiser, EMA, RNG, and TrainState: step,
best-so-far validation, per-step and per-epoch records; the data order is a pure function of
seed and epoch, so the step alone says where the data stream is) plus a marker file that holds
what the checkpoint is (step, model, the settings that fix the data stream) and the SHA-256 of
every file in it. It is written into a `.tmp-` directory and renamed into place as the last act:
a crash at any moment leaves either a complete checkpoint or a `.tmp-` directory that
`--resume auto` never looks at, and a checkpoint whose bytes changed afterwards (a bad disk, a
partial copy) fails verification instead of being trained on.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import time
import uuid
from pathlib import Path

import torch

from capsfast.diskio import as_os_error
from capsfast.errors import UserError, describe_os_error

MARKER = "capsfast_checkpoint.json"
MARKER_FORMAT = 2  # 2: per-file SHA-256 and the data-stream settings


class CheckpointError(UserError):
    """A checkpoint that cannot be used or written; the message says what to do."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files do not match their recorded checksums, or do not load."""


class TrainState:
    """Everything besides model, optimiser and EMA that a resumed run needs."""

    def __init__(self):
        self.run_id = uuid.uuid4().hex[:12]  # names this run in its exports
        self.step = 0  # optimiser steps completed (skipped ones included)
        self.best_val_accuracy = -1.0
        self.skipped_steps = 0
        # Running sums of the current epoch: loss, margin, recon, correct, n (host floats).
        self.epoch_stats = [0.0] * 5
        self.records: list[dict] = []  # metrics.jsonl, line by line (append-only)

    def state_dict(self) -> dict:
        # Records are never changed once appended: copying the list is enough.
        return {**vars(self), "epoch_stats": list(self.epoch_stats), "records": list(self.records)}

    def load_state_dict(self, d: dict) -> None:
        vars(self).update(
            {**d, "epoch_stats": list(d["epoch_stats"]), "records": list(d["records"])}
        )


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints under output_dir/checkpoints that have their marker, newest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / MARKER).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER)


def save_checkpoint(accelerator, output_dir: Path, step: int, identity: dict, keep: int,
                    run_id: str | None = None) -> Path:  # fmt: skip
    """Write checkpoint `step-XXXXXXXX` atomically (all ranks call this); keep the newest `keep`.

    `identity` ({"model": ..., "data": ...}) is what a resume must match; `run_id` names the run
    (`--resume auto` takes only checkpoints of the directory's run). A failed write (a full disk,
    in whatever shape the writer reports it: capsfast.diskio) removes its partial directory,
    leaves the previous checkpoints as they were and raises a CheckpointError that says so.
    """
    root = Path(output_dir) / "checkpoints"
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    previous = list_checkpoints(output_dir)[:1]
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            marker = {
                "format": MARKER_FORMAT,
                "step": step,
                **({"run_id": run_id} if run_id else {}),
                **identity,
                "time": time.time(),
                "files": {str(p.relative_to(tmp)): _sha256(p) for p in _files(tmp)},
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=2))
            if hasattr(os, "sync"):
                os.sync()  # the files reach the disk before the rename makes them the checkpoint
            if final.exists():  # the same step again (a resumed run that saves at its start)
                _remove(final)
            os.replace(tmp, final)
            for old in list_checkpoints(output_dir)[keep:]:
                _remove(old)
    except Exception as e:
        failure = as_os_error(e, _newest_file(tmp))  # before the removal frees the space
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is None:
            raise  # not a failed write: a bug
        intact = (
            f"the previous checkpoint {previous[0]} is intact"
            if previous
            else "no earlier checkpoint exists"
        )
        raise CheckpointError(
            f"cannot write checkpoint {final} ({describe_os_error(failure)}); {intact}. Free "
            "space, then run the same command with --resume auto"
        ) from None
    accelerator.wait_for_everyone()
    return final


def _newest_file(directory: Path) -> Path:
    """The file written last in `directory` (the one a failed write was writing; writers that
    report a full disk without a file name leave this to say it), or the directory itself."""
    try:
        files = [p for p in directory.rglob("*") if p.is_file()]
        return max(files, key=lambda p: p.stat().st_mtime_ns) if files else directory
    except OSError:
        return directory


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint so that no half-deleted one can ever be listed: first rename it out of
    the `step-*` namespace (atomic), then delete the files."""
    trash = checkpoint.with_name(f".tmp-delete-{checkpoint.name}-{uuid.uuid4().hex[:6]}")
    os.replace(checkpoint, trash)
    shutil.rmtree(trash, ignore_errors=True)


def verify(path: Path) -> dict:
    """The checkpoint's marker, after checking every file against its SHA-256.
    Raises CorruptCheckpoint naming the file and what is wrong with it."""
    marker_path = Path(path) / MARKER
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(f"{marker_path} is unreadable ({e})") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        raise CorruptCheckpoint(
            f"{marker_path} has no file checksums (written by an older capsfast or damaged)"
        )
    for name, digest in marker["files"].items():
        file = Path(path) / name
        if not file.is_file():
            raise CorruptCheckpoint(f"{file} is missing")
        if _sha256(file) != digest:
            raise CorruptCheckpoint(f"{file} does not match its recorded SHA-256 (corrupted)")
    return marker


DATA_FLAGS = {"batch_size": "--batch-size", "seed": "--seed", "val_size": "--val-size"}


def check_identity(path: Path, marker: dict, identity: dict) -> None:
    """Refuse a checkpoint of a different model, or of a different data stream (batch, seed or
    validation split: the step would then point at other samples, and the learning rate at
    another batch), in one line that names the original values."""
    saved, now = marker.get("model", {}), identity["model"]
    if saved != now:
        diff = {k: f"{saved.get(k)} -> {now.get(k)}" for k in sorted(set(saved) | set(now))
                if saved.get(k) != now.get(k)}  # fmt: skip
        raise CheckpointError(
            f"checkpoint {path} holds a different model ({diff}, checkpoint -> now): pass the "
            "model flags it was trained with (e.g. --routing-iters) or use a new --output-dir"
        )
    saved, now = marker.get("data", {}), identity["data"]
    changed = [k for k in sorted(now) if k in saved and saved[k] != now[k]]
    if changed:
        was = ", ".join(f"{DATA_FLAGS.get(k, k)} {saved[k]}" for k in changed)
        raise CheckpointError(
            f"checkpoint {path} was trained with {was}; a resumed run must keep it (the step "
            "counts batches of the same data stream): resume with the same value, or start a "
            "new --output-dir"
        )


def load_checkpoint(accelerator, path: Path, identity: dict) -> None:
    """Verify, check identity, load (every rank). CorruptCheckpoint if it does not load."""
    marker = verify(path)
    check_identity(path, marker, identity)
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # any failure of a verified checkpoint to load is its damage
        first = str(e).splitlines()[0] if str(e) else ""
        raise CorruptCheckpoint(f"{path} does not load ({type(e).__name__}: {first})") from None


def checkpoint_run(checkpoint: Path) -> str | None:
    """The run id a checkpoint's marker records (None: none recorded, an older capsfast)."""
    try:
        run_id = json.loads((Path(checkpoint) / MARKER).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) else None


def same_run(checkpoints: list[Path], run_id: str | None, warn) -> list[Path]:
    """The checkpoints of run `run_id` (None: of the newest checkpoint's run); one of another run
    is left out with a warning (`warn`) that names it. A checkpoint that records no run (written
    by an older capsfast) is kept."""
    runs = [checkpoint_run(p) for p in checkpoints]
    run_id = run_id or next((r for r in runs if r), None)
    kept = []
    for path, run in zip(checkpoints, runs, strict=True):
        if run is None or run == run_id:
            kept.append(path)
        else:
            warn(f"skipping checkpoint {path}: it belongs to another run (run {run}, not this "
                 f"directory's run {run_id})")  # fmt: skip
    return kept


def resume(accelerator, spec: str | None, output_dir: Path, identity: dict, on_fresh_start=None,
           run_id: str | None = None):  # fmt: skip
    """Load what `--resume` names; returns its path, or None for a fresh start.

    PATH: that checkpoint, or a one-line error. `auto`: the newest checkpoint of the directory's
    run (`run_id`, else the newest checkpoint's run: `same_run`) that verifies and loads; a
    corrupt one is skipped with a warning that names it and says why, and the next one is tried;
    none at all means a fresh start (after `on_fresh_start()`, which undoes whatever a failed
    load had put in place). Every rank tries the same checkpoints in the same order."""
    if spec is None:
        return None
    if spec != "auto":
        path = Path(spec)
        if not (path / MARKER).is_file():
            raise CheckpointError(
                f"--resume {spec}: not a checkpoint directory (no {MARKER}); pass a "
                "checkpoints/step-* directory or --resume auto"
            )
        try:
            load_checkpoint(accelerator, path, identity)
        except CorruptCheckpoint as e:
            raise CheckpointError(
                f"--resume {spec}: {e}; choose another checkpoint or --resume auto"
            ) from None
        return path
    from accelerate.utils import broadcast_object_list

    candidates = [None]
    if accelerator.is_main_process:
        warn = lambda m: accelerator.print(f"capsfast: warning: {m}")  # noqa: E731
        candidates = [same_run(list_checkpoints(output_dir), run_id, warn)]
    if accelerator.num_processes > 1:
        broadcast_object_list(candidates)
    for path in candidates[0]:
        try:
            load_checkpoint(accelerator, path, identity)
            failed = 0.0
        except CorruptCheckpoint as e:
            failed = 1.0
            accelerator.print(f"capsfast: warning: skipping checkpoint {path}: {e}")
        if accelerator.num_processes > 1:  # all ranks load it, or none uses it
            flag = torch.tensor(failed, device=accelerator.device)
            failed = accelerator.reduce(flag, reduction="sum").item()
        if not failed:
            return path
    if candidates[0] and on_fresh_start is not None:
        on_fresh_start()
    accelerator.print(
        f"capsfast: --resume auto: no usable checkpoint in {output_dir}/checkpoints; starting fresh"
    )
    return None


# The trainer's one test hook (docs/environment.md, with every CAPSFAST_* variable): tests stop
# a run at a named phase of its end with a real signal; CAPSFAST_TEST_SIGNAL_AT=<phase> sends
# SIGTERM to this process as the phase starts (`setup`: a SIGINT, a Ctrl-C, while the run is
# being set up, before its first step).
TEST_SIGNAL_ENV = "CAPSFAST_TEST_SIGNAL_AT"


def signal_for_tests(phase: str, sig: int = signal.SIGTERM) -> None:
    """The test hook: signal this process when CAPSFAST_TEST_SIGNAL_AT names `phase`."""
    if os.environ.get(TEST_SIGNAL_ENV) == phase:
        os.kill(os.getpid(), sig)


class SecondInterrupt(KeyboardInterrupt):
    """A second Ctrl-C while a stop request is pending: stop at once."""


class StopRequest:
    """SIGTERM and SIGINT (pre-emption, Ctrl-C) set a flag; the run saves at the next step
    boundary (several processes: at the step where they agree on it, within about 2 s:
    capsfast.distributed.StopPoll), or at its end keeps the final checkpoint, and exits. A second Ctrl-C stops at
    once: KeyboardInterrupt, never inside a rename, so the last complete checkpoint stays."""

    def __init__(self, announce: bool = True):
        self.signal: int | None = None
        self.announce = announce  # the main process says it heard the request; other ranks don't
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise SecondInterrupt
        self.signal = signum
        if self.announce:
            # Said at once, so a user (or a test) knows the request was heard before pressing
            # Ctrl-C again: two signals that arrive while a long C call holds the main thread run
            # the handler once. os.write, not print: the handler may interrupt tqdm mid-write.
            name = signal.Signals(signum).name
            message = (f"\ncapsfast: {name}: saving a checkpoint at the next step, then "
                       "stopping (Ctrl-C again stops at once)\n")  # fmt: skip
            os.write(2, message.encode())

    def phase(self, name: str) -> None:
        """Mark the start of a phase of the run's end (the test hook's place)."""
        signal_for_tests(name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class GoodState:
    """An in-memory copy of model, optimiser, EMA and TrainState taken whenever the loss was last
    seen finite.

    The loop checks for non-finite values only every few steps (a check is a host sync); when one
    shows up, this copy is what gets saved, so no work past the last good step is lost and no
    poisoned weights reach a checkpoint. A copy is about 100 MB and takes milliseconds.
    """

    def __init__(self):
        self.step = None
        self._copies = None

    @staticmethod
    def _clone(obj):
        if isinstance(obj, torch.Tensor):
            return obj.detach().clone()
        if isinstance(obj, dict):
            # TrainState's records are append-only: a copy of the list is a copy of them.
            return {k: list(v) if k == "records" else GoodState._clone(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [GoodState._clone(v) for v in obj]
        return copy.copy(obj)

    def take(self, step: int, **stateful) -> None:
        self.step = step
        self._copies = {name: self._clone(obj.state_dict()) for name, obj in stateful.items()}

    def restore(self, **stateful) -> None:
        for name, obj in stateful.items():
            obj.load_state_dict(self._copies[name])
