"""What a training run keeps on disk, and what it says about it: the output directory,
metrics.jsonl, the best model's export, and how to go on after a stop or a failed write."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from capsfast import run_lock
from capsfast.checkpoint import TrainState, list_checkpoints
from capsfast.diskio import append_text
from capsfast.errors import UserError, describe_os_error
from capsfast.export import CARD, read_config, save_model


class TrainingError(UserError):
    """A run that cannot go on; the message says why and what to do."""


def make_output_dir(cfg, accelerator, held: list) -> Path:
    """The run directory: created, locked for this run (capsfast.run_lock: the lock goes into
    `held`, released when the run ends; a directory another run holds is a one-line error that
    names it) and checked for another run's results (refused unless --resume or --overwrite).
    The main process decides; every rank raises the same one-line error."""
    out = Path(cfg.output_dir)
    problem = [None]
    if accelerator.is_main_process:
        try:
            if out.exists() and not out.is_dir():
                raise TrainingError(f"--output-dir {out} is a file: choose a directory")
            try:
                out.mkdir(parents=True, exist_ok=True)
                held.append(run_lock.RunLock(out))  # creating its file: the write check
            except OSError as e:
                raise TrainingError(
                    f"--output-dir {out} is not writable ({describe_os_error(e)}): choose another"
                ) from None
            if held[-1].warning:
                accelerator.print(f"capsfast: warning: {held[-1].warning}")
            run_lock.check_ownership(out, cfg.resume, cfg.overwrite,
                                     lambda m: accelerator.print(f"capsfast: {m}"))  # fmt: skip
        except (UserError, OSError) as e:
            problem = [str(e) if isinstance(e, UserError) else describe_os_error(e)]
            if accelerator.num_processes == 1:
                raise
    if accelerator.num_processes > 1:  # every rank stops, or none
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(problem)
        if problem[0] is not None:
            raise TrainingError(problem[0])
    return out


def append_record(record: dict, state: TrainState, out: Path, accelerator) -> None:
    """One line of metrics.jsonl (the TrainState keeps them all, so a resume rewrites it)."""
    state.records.append(record)
    if accelerator.is_main_process:
        append_text(out / "metrics.jsonl", json.dumps(record) + "\n")  # whole lines only


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
    # Every rank has read the export before the main process replaces it: a rank that read the
    # new one would skip the barrier below while the others wait in it (a hang).
    accelerator.wait_for_everyone()
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


def setup_interrupted_message(out: Path) -> str:
    newest = list_checkpoints(out)[:1]
    kept = (f"the last complete checkpoint {newest[0]} is intact; to go on, {resume_hint()}"
            if newest else "no checkpoint had been written; run the command again to start")  # fmt: skip
    return f"interrupted while the run was being set up, before its first step; {kept}"


def out_of_memory(e: BaseException, cfg) -> str | None:
    """What to do when `e` is memory running out (host or GPU); None when it is not."""
    import re

    import torch

    text = str(e)
    host = isinstance(e, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in text
    gpu = isinstance(e, torch.OutOfMemoryError) or "CUDA out of memory" in text
    if not (host or gpu):
        return None
    asked = re.search(r"(?:allocate|Tried to allocate) (\d+(?:\.\d+)?) ?(bytes|[KMG]iB)", text)
    size = ""
    if asked:
        scale = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[asked.group(2)]
        size = f" (an allocation of {float(asked.group(1)) * scale / 2**30:.2f} GiB failed)"
    where = "host" if host else "GPU"
    fixes = (f"lower --batch-size (now {cfg.batch_size}) or --eval-batch-size (now "
             f"{cfg.eval_batch_size})")  # fmt: skip
    if gpu:
        fixes += ", or pass --routing fused or --data-placement stream"
    else:
        fixes += ", or stop other programs that hold memory"
    return f"out of {where} memory{size}: {fixes}"
