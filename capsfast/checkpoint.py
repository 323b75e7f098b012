"""Fault tolerance: atomic checkpoints, resume, stop requests, the last known good state.

A checkpoint is `accelerator.save_state` (model, optimiser, scheduler, EMA, RNG, and TrainState:
step, best-so-far metrics, per-epoch records; the data order is a pure function of seed and
epoch, so the step alone says where the data stream is). It is written into a temporary directory
and renamed into place as the last act, after its marker file: a crash at any moment leaves
either a complete checkpoint or a `.tmp-` directory that `--resume auto` never looks at.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import time
from pathlib import Path

import torch

from capsfast.errors import UserError

MARKER = "capsfast_checkpoint.json"


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message says what to change."""


class TrainState:
    """Everything besides model, optimiser and scheduler that a resumed run needs."""

    def __init__(self):
        self.step = 0  # optimiser steps completed (skipped ones included)
        self.best_val_accuracy = -1.0
        self.best_step = -1
        self.skipped_steps = 0
        self.epoch_stats = [
            0.0
        ] * 5  # running sums of the current epoch: loss, margin, recon, correct, n
        self.records: list[dict] = []  # per-epoch metrics, as in metrics.jsonl

    def state_dict(self) -> dict:
        return copy.deepcopy(vars(self))

    def load_state_dict(self, d: dict) -> None:
        vars(self).update(copy.deepcopy(d))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under output_dir/checkpoints, newest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / MARKER).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def save_checkpoint(accelerator, output_dir: Path, step: int, model_config: dict, keep: int):
    """Write checkpoint `step-XXXXXXXX` atomically (all ranks call this); keep the newest `keep`."""
    root = Path(output_dir) / "checkpoints"
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker = {"step": step, "model": model_config, "time": time.time()}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        if hasattr(os, "sync"):
            os.sync()  # the files reach the disk before the rename makes them the checkpoint
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, model_config: dict) -> None:
    marker_path = Path(path) / MARKER
    if not marker_path.is_file():
        raise CheckpointError(f"{path} is not a complete capsfast checkpoint (no {MARKER})")
    marker = json.loads(marker_path.read_text())
    saved = marker.get("model", {})
    if saved != model_config:
        diff = {
            k: f"{saved.get(k)} -> {model_config.get(k)}"
            for k in sorted(set(saved) | set(model_config))
            if saved.get(k) != model_config.get(k)
        }
        raise CheckpointError(
            f"checkpoint {path} holds a different model ({diff}, checkpoint -> now): pass the "
            "model flags it was trained with (e.g. --routing-iters) or use a new --output-dir"
        )
    accelerator.load_state(str(path))


def resume(
    accelerator, spec: str | None, output_dir: Path, model_config: dict, on_fresh_start=None
) -> Path | None:
    """Load what `--resume` names. `auto`: the newest complete checkpoint that loads; corrupt or
    half-written ones are skipped with a warning; none at all means a fresh start (after
    `on_fresh_start()`, which undoes whatever a failed load had already put in place).
    The main process lists the checkpoints and every rank tries the same ones in the same order."""
    if spec is None:
        return None
    if spec != "auto":
        if not Path(spec).is_dir():
            raise CheckpointError(f"--resume {spec}: no such checkpoint directory")
        load_checkpoint(accelerator, Path(spec), model_config)
        return Path(spec)
    from accelerate.utils import broadcast_object_list

    candidates = [list_checkpoints(output_dir) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(candidates)
    for path in candidates[0]:
        try:
            load_checkpoint(accelerator, path, model_config)
            failed = 0.0
        except CheckpointError:
            raise
        except Exception as e:  # truncated tensors, bad JSON, missing files
            failed = 1.0
            accelerator.print(
                f"capsfast: warning: skipping unreadable checkpoint {path} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            )
        if accelerator.num_processes > 1:  # all ranks load it, or none uses it
            flag = torch.tensor(failed, device=accelerator.device)
            failed = accelerator.reduce(flag, reduction="sum").item()
        if not failed:
            return path
    if candidates[0] and on_fresh_start is not None:
        on_fresh_start()
    accelerator.print(
        f"capsfast: --resume auto: no complete checkpoint in {output_dir}/checkpoints; "
        "starting fresh"
    )
    return None


class StopRequest:
    """SIGTERM and SIGINT (pre-emption, Ctrl-C) set a flag; the training loop saves a checkpoint
    at the next step boundary and exits. A second Ctrl-C stops at once."""

    def __init__(self):
        self.signal: int | None = None
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
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class GoodState:
    """An in-memory copy of model, optimiser and EMA taken whenever the loss was last seen finite.

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
            return {k: GoodState._clone(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [GoodState._clone(v) for v in obj]
        return copy.deepcopy(obj)

    def take(self, step: int, **stateful) -> None:
        self.step = step
        self._copies = {name: self._clone(obj.state_dict()) for name, obj in stateful.items()}

    def restore(self, **stateful) -> None:
        for name, obj in stateful.items():
            obj.load_state_dict(self._copies[name])
