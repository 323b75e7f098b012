"""What a training run keeps on disk, and what it says about it: the output directory,
metrics.jsonl, the best model's export, and how to go on after a stop or a failed write."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from capsfast.checkpoint import TrainState, list_checkpoints
from capsfast.errors import UserError, describe_os_error
from capsfast.export import CARD, read_config, save_model


class TrainingError(UserError):
    """A run that cannot go on; the message says why and what to do."""


def make_output_dir(path: str, accelerator) -> Path:
    """The run directory, created and checked writable, or a one-line error."""
    out = Path(path)
    if accelerator.is_main_process:
        if out.exists() and not out.is_dir():
            raise TrainingError(f"--output-dir {out} is a file: choose a directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".capsfast-write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise TrainingError(
                f"--output-dir {out} is not writable ({describe_os_error(e)}): choose another"
            ) from None
    accelerator.wait_for_everyone()
    return out


def append_record(record: dict, state: TrainState, out: Path, accelerator) -> None:
    """One line of metrics.jsonl (the TrainState keeps them all, so a resume rewrites it)."""
    state.records.append(record)
    if accelerator.is_main_process:
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")


def export_if_best(model, val, state: TrainState, out: Path, accelerator, meta: dict) -> bool:
    """Export to out/model when `val` is the run's best validation accuracy so far (no
    validation split: the latest model is the best). The best so far lives in the TrainState of
    every checkpoint and in the export's config.json, so no export replaces a better one of the
    same run, even after a resume from a checkpoint older than the export."""
    exported = out / "model"
    try:
        previous = read_config(exported)["meta"] if (exported / "config.json").is_file() else {}
    except UserError:
        previous = {}  # a damaged export is replaced
    if previous.get("run_id") == state.run_id and previous.get("val_accuracy") is not None:
        state.best_val_accuracy = max(state.best_val_accuracy, previous["val_accuracy"])
    if val is not None and val <= state.best_val_accuracy:
        return False
    state.best_val_accuracy = -1.0 if val is None else val
    if accelerator.is_main_process:
        try:
            save_model(model, exported, meta={**meta, "step": state.step, "val_accuracy": val})
            (exported / CARD).unlink(missing_ok=True)  # the card described the weights replaced
        except OSError as e:
            raise TrainingError(
                f"cannot export the model to {exported} ({describe_os_error(e)}); the checkpoints "
                "are intact: free space, then run the same command with --resume auto"
            ) from None
    accelerator.wait_for_everyone()
    return True


def resume_hint() -> str:
    """How to go on: the same command, with --resume auto unless it has a --resume already."""
    has_resume = any(a == "--resume" or a.startswith("--resume=") for a in sys.argv[1:])
    return "run the same command again" + ("" if has_resume else " with --resume auto")


def checkpoint_note(out: Path) -> str:
    """What is kept on disk, and how to go on."""
    newest = list_checkpoints(out)[:1]
    if not newest:
        return "no checkpoint had been written yet: fix the cause and start again"
    return (f"the last complete checkpoint is {newest[0]}: fix the cause (free space), then "
            f"{resume_hint()}")  # fmt: skip


def interrupted_message(out: Path) -> str:
    return f"stopped at once (a second interrupt); {checkpoint_note(out)}"
