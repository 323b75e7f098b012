"""The end of a training run, in phases (END_PHASES), each safe to interrupt; `Stopped`, the one
way a run ends early that is not an error. `RunEnd` is the part of `capsfast.train.Run` that
reads the run's state after its last step."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from capsfast.checkpoint import list_checkpoints
from capsfast.diskio import write_text
from capsfast.evaluation import EvaluationStopped, evaluate
from capsfast.export import load_model
from capsfast.model_card import write_card
from capsfast.progress import Sums
from capsfast.provenance import PROCESS_START, git_commit, versions
from capsfast.run_files import resume_hint
from capsfast.runtime import any_rank

END_PHASES = ("checkpoint", "validation", "test", "summary", "figures")  # the end, in order


class Stopped(Exception):
    """The run stopped on request (SIGTERM, Ctrl-C) after saving: in the loop, or before a phase
    of its end. The one way a run ends early that is not an error; `train` returns it as
    {"stopped": True, ...}."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(step)
        self.step, self.checkpoint = step, checkpoint


class RunEnd:
    # ------------------------------------------------------------------ the end of the run
    def finish(self) -> dict:
        """The end of a run, in phases (END_PHASES), each safe to interrupt: the final checkpoint
        first (so a stop at any later phase loses nothing: `--resume auto` finds the run complete
        and repeats only the end), the last validation (also after --max-steps mid-epoch) and
        export, the test evaluation of the exported model, summary.json, the figures. A stop
        request is honoured before each phase, and (one process) between the batches of the
        validation and test evaluations; a test evaluation that finished is kept (summary.json is
        written before the stop). One that arrives during the last phase lets it finish."""
        # One process: an evaluation ends at the next batch once a stop is requested.
        cut = (lambda: self.stop.signal is not None) if self.world == 1 else None
        self.phase("checkpoint")
        self.final_checkpoint()
        self.phase("validation")
        last = next((r for r in reversed(self.state.records) if r["kind"] == "epoch"), None)
        if last is None or last["step"] != self.state.step:
            try:
                self.validate(Sums(*self.state.epoch_stats).means(), desc="validation", stop=cut)
            except EvaluationStopped:
                raise self.stopped("during its validation phase (cut short)") from None
        self.phase("test")
        try:
            exported, tests = self.test(stop=cut)
        except EvaluationStopped:
            raise self.stopped("during its test phase (cut short)") from None
        self.phase("summary", honour_stop=False)  # the test finished: its result is kept
        summary = self.write_summary(tests)
        self.phase("figures")
        self.draw_figures(exported, summary, tests)
        self.acc.end_training()
        return summary

    def stopped(self, where: str) -> Stopped:
        checkpoint = list_checkpoints(self.out)[0]
        self.acc.print(f"capsfast: stopped on request at the end of the run, {where}; the final "
                       f"checkpoint is {checkpoint}\n"
                       f"capsfast: to finish the run, {resume_hint()}")  # fmt: skip
        self.acc.end_training()
        return Stopped(self.state.step, checkpoint)

    def phase(self, name: str, honour_stop: bool = True) -> None:
        if honour_stop and any_rank(self.acc, self.stop.signal is not None):  # all ranks agree
            raise self.stopped(f"before its {name} phase")
        self.acc.print(f"capsfast: end of run: {name}")
        self.stop.phase(name)

    def final_checkpoint(self) -> None:
        """Unless the newest checkpoint is of this very step (the main process decides, so every
        rank joins the same collectives)."""
        newest = [list_checkpoints(self.out)[:1] if self.acc.is_main_process else None]
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(newest)
        if not newest[0] or newest[0][0].name != f"step-{self.state.step:08d}":
            self.save()

    def test(self, stop=None):
        """(the exported model, {test_accuracy, test_size, and the task's other test sets})."""
        acc, batch = self.acc, self.cfg.eval_batch_size
        exported = load_model(
            self.out / "model", device=self.device, routing=self.raw_model.routing
        )
        accuracy, n = evaluate(exported, *self.task.test, acc, batch, desc="test", stop=stop)
        tests = {"test_accuracy": accuracy, "test_size": n}
        for name, (x, y) in self.task.extra_tests.items():  # affnist: affNIST itself
            tests[f"{name}_accuracy"], tests[f"{name}_size"] = evaluate(
                exported, x, y, acc, batch, desc=name, stop=stop
            )
        return exported, tests

    def write_summary(self, tests: dict) -> dict:
        from capsfast import tracking

        acc, cfg, state, device = self.acc, self.cfg, self.state, self.device
        train_records = [r for r in state.records if r["kind"] == "train"]
        cuda = device.type == "cuda"
        r = self.resolved
        summary = {
            **tests,
            "best_val_accuracy": state.best_val_accuracy if state.best_val_accuracy >= 0 else None,
            "final_train_loss": train_records[-1]["train_loss"] if train_records else None,
            "steps": state.step,
            "epochs": state.step * cfg.batch_size / self.train_size,
            "wall_seconds": time.time() - PROCESS_START,
            "images_per_second": self.clock.images_per_second(state.step, cfg.batch_size),
            "world_size": self.world,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "cpu_threads": None if cuda else torch.get_num_threads(),
            "mixed_precision": self.mixed_precision, "precision": self.precision_name,
            "precision_reason": r["precision_reason"],
            "compile": self.compiled, "compile_reason": r["compile_reason"],
            "routing": r["routing"], "parameters": r["parameters"],
            "task": cfg.task, "model": cfg.model, "stopped_early": self.early_stop,
            "dataset": self.data.name, "class_names": list(self.data.class_names),
            "config": self.config_record, "preset": cfg.preset, "seed": cfg.seed,
            "commit": git_commit(), **versions(),
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
            "skipped_steps": state.skipped_steps,
        }  # fmt: skip
        if acc.is_main_process:
            write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
            write_card(self.out / "model", summary, name=self.out.name)  # from this very summary
        if self.use_wandb:
            acc.log({f"test/{k.removeprefix('test_')}": v for k, v in tests.items()
                     if k != "test_size"}, step=state.step)  # fmt: skip
            tracking.set_summary(acc, summary)
        return summary

    def draw_figures(self, exported, summary: dict, tests: dict) -> None:
        if not self.acc.is_main_process:
            return
        from capsfast import tracking
        from capsfast.figures import plot_curves

        out = self.out
        if self.cfg.figures:
            plot_curves(self.state.records, out / "curves.png")
            figures = self.task.figures(exported, out / "figures")
            if self.use_wandb:
                images = {f"figures/{k}": str(v) for k, v in figures.items()}
                images["figures/curves"] = str(out / "curves.png")
                tracking.log_images(self.acc, images, self.state.step)
        others = "".join(f"capsfast: {k.removesuffix('_accuracy')} accuracy {v:.4f}\n"
                         for k, v in tests.items()
                         if k.endswith("_accuracy") and k != "test_accuracy")  # fmt: skip
        self.acc.print(
            f"{others}capsfast: test accuracy {tests['test_accuracy']:.4f} on "
            f"{tests['test_size']:,} images (best validation {summary['best_val_accuracy']}), "
            f"{summary['wall_seconds']:.1f} s, {summary['images_per_second'] or 0:.1f} img/s; "
            f"model in {out / 'model'}"
            + (f", figures in {out / 'figures'}" if self.cfg.figures else " (--no-figures)")
        )
