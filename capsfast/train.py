"""Training: `train(cfg)` reads top to bottom: set-up, the step loop, the end of the run.

One optimiser step:
    x, y, target = batches.batch(epoch, k, order)  # device-side shuffle + shift, or pairs (tasks)
    out, loss, margin, recon = task.loss(model, x, y, recon_weight, target)  # margin + recon
    accelerator.backward(loss); optimizer.step()               # lr set from (config, step)

The host meets the device only at sync points: every `log_every` steps (losses, learning rate,
progress, the non-finite check, stop requests), at epoch ends (validation, export) and at
checkpoints. A run is a `Run`, built in named steps; its end is run_end.py. Run set-up (device,
precision, compile, world size) is runtime.py; the routing implementation, routing_choice.py;
what a checkpoint holds and how a stop is requested, checkpoint.py; the banner and progress,
progress.py; the losses, model.py; what --task and --model change (data, loss, model, test
sets), tasks.py.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import torch

from capsfast import distributed, run_lock, runtime, tasks
from capsfast.checkpoint import (
    GoodState,
    SecondInterrupt,
    StopRequest,
    TrainState,
    list_checkpoints,
    resume,
    save_checkpoint,
    signal_for_tests,
)
from capsfast.config import TrainConfig
from capsfast.data import (
    DataError,
    Dataset,
    centre_crop,
    choose_placement,
    default_val_size,
    epoch_permutation,
    split_train_val,
)
from capsfast.datasets import load_dataset
from capsfast.diskio import write_text
from capsfast.ema import EMA
from capsfast.errors import Interrupted, describe_os_error
from capsfast.evaluation import evaluate, log_reconstructions
from capsfast.model import CapsNet, ModelConfig
from capsfast.optimizer import build_optimizer, set_learning_rate
from capsfast.progress import (  # noqa: F401  (data_line: part of this module's API)
    Clock,
    Sums,
    Window,
    banner,
    data_line,
    epoch_line,
    estimate_line,
    new_bar,
    say,
)
from capsfast.provenance import PROCESS_START, git_commit
from capsfast.routing_choice import choose_routing
from capsfast.run_end import END_PHASES, RunEnd, Stopped  # noqa: F401  (END_PHASES: API)
from capsfast.run_files import (  # noqa: F401  (resume_hint: API)
    TrainingError,
    append_record,
    checkpoint_note,
    export_if_best,
    interrupted_message,
    make_output_dir,
    out_of_memory,
    resume_hint,
    setup_interrupted_message,
)

EXIT_STOPPED = 3  # stopped on request (SIGTERM, Ctrl-C) after saving: resume with --resume auto


# --------------------------------------------------------------------------- pieces of a run
def all_finite(loss: torch.Tensor, model, mixed_precision: str) -> torch.Tensor:
    """A device-side flag: loss and (except under fp16, whose GradScaler skips overflowing steps
    itself) every gradient finite. No host sync."""
    finite = torch.isfinite(loss)
    if mixed_precision != "fp16":
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
    return finite


def prepare_model(model_cfg, cfg: TrainConfig, accelerator, local_batch=None):
    """(model as trained: prepared, maybe compiled or DDP-wrapped; the model itself (CapsNet or
    the baseline: tasks.build_model), which is what gets saved and exported; optimiser; EMA or
    None). The routing implementation: capsfast.routing_choice, at this process's batch."""
    device = accelerator.device
    model = tasks.build_model(model_cfg).to(device)
    if isinstance(model, CapsNet):
        local_batch = local_batch or cfg.batch_size // accelerator.num_processes
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        impl, _, note = choose_routing(cfg.routing, model_cfg, device, local_batch, free,
                                       all_ranks_ok=lambda ok: not runtime.any_rank(accelerator, not ok))  # fmt: skip
        if note:
            accelerator.print(f"capsfast: {note}")
        model.set_routing(impl)
    optimizer = build_optimizer(model, cfg)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    prepared, optimizer = accelerator.prepare(model, optimizer)
    return prepared, accelerator.unwrap_model(prepared, keep_torch_compile=False), optimizer, ema


def model_config_for(data: Dataset, cfg: TrainConfig) -> ModelConfig:
    """The model the data configures: its channels, its size (after --crop), its classes and
    how predict prepares a picture for it; the rest from the flags."""
    try:
        return ModelConfig(
            in_channels=data.channels, image_size=cfg.crop or data.image_size,
            num_classes=data.num_classes, primary_types=cfg.primary_types,
            none_class=cfg.none_class, routing_iters=cfg.routing_iters,
            detach_inner=cfg.detach_inner, class_names=data.class_names, input_style=data.style,
            input_resize=data.image_size if data.style == "photo" else None,
        )  # fmt: skip
    except ValueError as e:
        raise DataError(
            f"--dataset {data.name}: {e} (pass a smaller --crop, or a larger --image-size for "
            "folder: data sets)"
        ) from None


# --------------------------------------------------------------------------- the run
class Run(RunEnd):
    """One training run: its state, built in named steps (runtime, data and task, model and
    optimiser, resume, records and banner); `train()` is the step loop, `finish()` the end."""

    def __init__(self, cfg: TrainConfig, data: Dataset | None, held: list):
        cfg.validate()
        self.cfg, self.held = cfg, held  # held: the output directory's lock (run_lock)
        self.set_up_runtime()
        self.set_up_data(data)
        self.set_up_model()
        self.resume()
        self.start_records()

    # ------------------------------------------------------------------ set-up, in order
    def set_up_runtime(self) -> None:
        from accelerate.utils import set_seed

        acc, precision, why, compiled, compile_why = runtime.make_accelerator(self.cfg)
        self.acc, self.device, self.world = acc, acc.device, acc.num_processes
        self.mixed_precision, self.compiled = precision, compiled
        self.precision_name = runtime.PRECISION_NAMES[precision]
        self.device_name = runtime.describe_device(acc)
        self.resolved = {"mixed_precision": precision, "precision_reason": why,
                         "compile": compiled, "compile_reason": compile_why,
                         "world_size": self.world}  # fmt: skip
        self.out = make_output_dir(self.cfg, acc, self.held)
        set_seed(self.cfg.seed)

    def set_up_data(self, data: Dataset | None) -> None:
        """uint8 [N, C, S, S] on the device for the whole run, or in host memory and streamed to
        it in chunks when it is too large for it; augmentation on the device (data.py). The task
        (--task, --model) makes the training batches, validation and test sets from the splits."""
        cfg, acc, device = self.cfg, self.acc, self.device
        with acc.main_process_first():
            data = data if data is not None else load_dataset(
                cfg.dataset, tasks.affnist_dir(cfg), cfg.download, cfg.image_size,
                cfg.test_fraction, warn=lambda m: acc.print(f"capsfast: warning: {m}"))  # fmt: skip
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        placement = choose_placement(cfg.data_placement, data.nbytes(), device.type, free)
        if placement == "device":
            data = data.to(device)
        if cfg.crop > data.image_size:
            raise DataError(f"--crop {cfg.crop} is larger than the {data.image_size}-pixel images "
                            f"of {data.name}: choose at most {data.image_size}")  # fmt: skip
        val_size = default_val_size(cfg.val_size, len(data.train_images))
        train_split, (val_x, val_y) = split_train_val(data, val_size, seed=cfg.seed)
        test_x, test_y = data.test_images[: cfg.test_size], data.test_labels[: cfg.test_size]
        if cfg.crop:  # evaluation sees the centre crop
            val_x, test_x = centre_crop(val_x, cfg.crop), centre_crop(test_x, cfg.crop)
        flip = data.flips if cfg.flip is None else cfg.flip
        self.data, self.train_size = data, len(train_split[0])
        self.task = tasks.make_task(cfg, data, model_config_for(data, cfg), train_split,
                                    (val_x, val_y), (test_x, test_y), rank=acc.process_index,
                                    world=self.world, device=device, stream=placement == "stream",
                                    flip=flip)  # fmt: skip
        self.steps_per_epoch = self.task.batches.steps_per_epoch
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.resolved.update(val_size=val_size, flip=flip, data_placement=placement,
                             train_size=self.train_size, dataset=data.name,
                             class_names=list(data.class_names))  # fmt: skip

    def set_up_model(self) -> None:
        """Model (configured from the data and the task), optimiser, EMA; what a checkpoint
        holds and what identifies the run in it."""
        cfg, model_cfg = self.cfg, self.task.model_config
        self.model, self.raw_model, self.optimizer, self.ema = prepare_model(
            model_cfg, cfg, self.acc, self.task.batches.local_batch
        )
        self.eval_model = self.ema.module if self.ema is not None else self.raw_model
        self.state = TrainState()
        for obj in (self.state, self.ema):
            if obj is not None:
                self.acc.register_for_checkpointing(obj)
        self.stateful = {"model": self.raw_model, "optimizer": self.optimizer, "state": self.state}
        self.stateful.update({"ema": self.ema} if self.ema is not None else {})
        self.identity = {"model": model_cfg.to_dict(),
                         "data": {"batch_size": cfg.batch_size, "seed": cfg.seed,
                                  "val_size": self.resolved["val_size"],
                                  "dataset": self.data.name, "task": cfg.task,
                                  "architecture": cfg.model}}  # fmt: skip
        self.resolved.update(
            routing=self.raw_model.routing,
            lr_scaled=cfg.scaled_lr(),
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
            parameters=sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad),
        )

    def resume(self) -> None:
        """--resume: a checkpoint of this directory's run only (run_lock.directory_run)."""
        initial = GoodState()  # a failed half-load must not leak into a fresh start
        initial.take(0, **self.stateful)
        signal_for_tests("setup", signal.SIGINT)  # the tests' Ctrl-C while the run is set up
        owner = run_lock.directory_run(self.out)
        self.resumed = resume(self.acc, self.cfg.resume, self.out, self.identity,
                              lambda: initial.restore(**self.stateful), run_id=owner)  # fmt: skip
        if self.resumed is None and self.cfg.resume == "auto" and owner:
            self.state.run_id = owner  # no usable checkpoint: the run starts over, as itself

    def start_records(self) -> None:
        """config.json, metrics.jsonl (rewritten from the checkpoint's records, so a resumed run
        has no duplicate lines), the tracker, the banner; what every export's config carries."""
        from capsfast import tracking

        cfg, out, acc = self.cfg, self.out, self.acc
        resolved = {k: self.resolved[k] for k in RESOLVED_KEYS}
        self.config_record = {**cfg.to_dict(), "run_id": self.state.run_id,
                              "model": self.task.model_config.to_dict(), "resolved": resolved}  # fmt: skip
        self.use_wandb = bool(acc.log_with) and tracking.init_tracking(
            acc, self.config_record, cfg.wandb_project, str(out),
            f"{cfg.task}-{cfg.model}-{out.name}",
        )  # fmt: skip
        if acc.is_main_process:
            write_text(out / "config.json", json.dumps(self.config_record, indent=2) + "\n")
            records = "".join(json.dumps(r) + "\n" for r in self.state.records)
            write_text(out / "metrics.jsonl", records)
        acc.print(banner(self))
        self.meta = {"run_id": self.state.run_id, "preset": cfg.preset, "seed": cfg.seed,
                     "commit": git_commit(), "dataset": self.data.name, "task": cfg.task}  # fmt: skip
        if self.data.name.startswith("folder:"):  # visualize holds out the same test images
            self.meta["test_fraction"] = cfg.test_fraction

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Step; at a sync point, look. Ends in the end of the run (`finish`), or `Stopped`."""
        cfg, acc, state, task = self.cfg, self.acc, self.state, self.task
        self.model.train()
        self.window = Window(self.device, task.batches.local_batch)
        self.good = GoodState()  # the state at the last sync where everything was finite
        self.good.take(state.step, **self.stateful)
        self.clock = Clock(state.step, warmup=3 if self.total_steps - state.step >= 10 else 0)
        self.early_stop: str | None = None  # why the run ends before total_steps
        self.loop_start, self.bar = time.perf_counter(), None
        stop_poll = distributed.StopPoll(acc, state.step)  # bounds a stop's delay, any log_every
        try:
            with StopRequest(announce=acc.is_main_process) as self.stop:
                for step in range(state.step, self.total_steps):
                    epoch, k = divmod(step, self.steps_per_epoch)
                    if self.bar is None or k == 0:  # a new epoch: its order and progress bar
                        order = epoch_permutation(self.train_size, cfg.seed, epoch, self.device)
                        self.bar = new_bar(self.bar, epoch, k, self.steps_per_epoch,
                                           self.total_steps, cfg.batch_size, acc)  # fmt: skip
                    lr = set_learning_rate(self.optimizer, cfg, step, self.total_steps)
                    self.step(*task.batches.batch(epoch, k, order))
                    state.step = step + 1
                    self.bar.update(cfg.batch_size)  # no host sync: the bar only counts images
                    due = self.sync_due()  # several processes: also a stop poll every ~2 s
                    polled = not due and stop_poll.stop_agreed(
                        state.step, self.stop.signal is not None
                    )
                    if due or polled:  # polled: some rank has a stop request, all stop here
                        self.sync(lr, stop_requested=polled)
                    if self.early_stop:  # --max-seconds or --stop-at-accuracy: the end
                        say(acc, f"capsfast: {self.early_stop} at step {state.step}")
                        break
                self.clock.stop()  # the end of the run is not training time
                if self.bar is not None:
                    self.bar.close()
                return self.finish()
        finally:
            if self.bar is not None:
                self.bar.close()

    def step(self, x, y, target) -> None:
        """One optimiser step; a device-side non-finite flag instead of a host sync."""
        cfg, model = self.cfg, self.model
        if self.compiled and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # reduce-overhead: a new step
        with self.acc.autocast():
            output, loss, margin, recon = self.task.loss(model, x, y, cfg.recon_weight, target)
        self.acc.backward(loss)
        finite = all_finite(loss, model, self.mixed_precision)
        if cfg.skip_nonfinite and runtime.any_rank(self.acc, ~finite):  # opt-in: a sync every step
            self.state.skipped_steps += 1
        else:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.raw_model)
            self.window.add(output, y, loss.detach(), margin.detach(), recon.detach(), finite)
        self.optimizer.zero_grad(set_to_none=True)

    def sync_due(self) -> bool:
        """Every log_every steps, the last step, epoch ends, checkpoints, and at once when a
        single process got a stop signal."""
        step, cfg = self.state.step, self.cfg
        return bool(step % cfg.log_every == 0 or step == self.total_steps
                    or step % self.steps_per_epoch == 0
                    or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                    or (self.stop.signal is not None and self.world == 1))  # fmt: skip

    def sync(self, lr: float, stop_requested: bool = False) -> None:
        """The host looks: logs the window, validates at an epoch end, saves when due; raises
        Stopped when a stop was requested (the checkpoint saved first)."""
        acc, cfg, state, step = self.acc, self.cfg, self.state, self.state.step
        seen = self.window.read(acc, stop_requested or self.stop.signal is not None)
        if seen.nonfinite:
            self.stop_nonfinite()
        per_step, first_steady = self.clock.tick(step)
        if first_steady and step < self.total_steps:
            say(acc, estimate_line(per_step, self.total_steps - step, cfg.batch_size))
        state.epoch_stats = list(Sums(*state.epoch_stats) + seen.sums)
        record = {"kind": "train", "epoch": round(step / self.steps_per_epoch, 4), "step": step,
                  **seen.sums.means(), "lr": lr, "images_per_second": cfg.batch_size / per_step}  # fmt: skip
        append_record(record, state, self.out, acc)
        self.bar.set_postfix(loss=f"{record['train_loss'] or float('nan'):.4f}", lr=f"{lr:.2e}",
                             refresh=False)  # fmt: skip
        acc.log({"train/loss": record["train_loss"], "train/lr": lr,
                 "train/skipped_steps": state.skipped_steps}, step=step)  # fmt: skip
        self.good.take(step, **self.stateful)
        if cfg.max_seconds is not None and step < self.total_steps:  # all ranks stop alike
            over = time.perf_counter() - self.loop_start >= cfg.max_seconds
            if runtime.any_rank(acc, over):
                self.early_stop = f"--max-seconds {cfg.max_seconds:g} reached"
        with self.clock.paused():
            if step % self.steps_per_epoch == 0:
                self.end_epoch()
            if seen.stop or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                path = self.save()
        if seen.stop:
            self.bar.close()
            acc.print(f"capsfast: stopped on request at step {step}; checkpoint saved to {path}\n"
                      f"capsfast: to resume, {resume_hint()}")  # fmt: skip
            acc.end_training()
            raise Stopped(step, path)

    def end_epoch(self) -> None:
        stats = Sums(*self.state.epoch_stats).means()
        self.state.epoch_stats = list(Sums())
        epoch = self.validate(stats, images_per_second=self.bar.format_dict.get("rate"))
        say(self.acc, epoch_line(epoch))
        target, val = self.cfg.stop_at_accuracy, epoch["val_accuracy"]
        if target is not None and val is not None and val >= target:
            self.early_stop = f"validation accuracy {val:.4f} >= {target}"
        if self.use_wandb:
            val_x = self.task.val[0]
            log_reconstructions(self.acc, self.eval_model,
                                val_x if len(val_x) else self.task.test[0], self.state.step)  # fmt: skip

    def validate(self, train_stats: dict, images_per_second=None, desc=None, stop=None) -> dict:
        """Validate, export if best, append the epoch record (metrics.jsonl) and log it. With
        --test-every-epoch the test set too, for the learning curve only: the export is still
        chosen on validation. `stop`: as evaluate's (EvaluationStopped before anything is
        written)."""
        acc, cfg, state = self.acc, self.cfg, self.state
        t = time.time()
        val = test_acc = None
        if len(self.task.val[0]):
            val, _ = evaluate(self.eval_model, *self.task.val, acc, cfg.eval_batch_size,
                              desc=desc, stop=stop)  # fmt: skip
        if cfg.test_every_epoch:
            test_acc, _ = evaluate(self.eval_model, *self.task.test, acc, cfg.eval_batch_size,
                                   stop=stop)  # fmt: skip
        export_if_best(self.eval_model, val, state, self.out, acc, self.meta)
        epochs = [r for r in state.records if r["kind"] == "epoch"]
        now = time.time()
        record = {"kind": "epoch", "epoch": round(state.step / self.steps_per_epoch, 4),
                  "step": state.step, **train_stats, "val_accuracy": val,
                  "lr": self.optimizer.param_groups[0]["lr"],
                  **({"test_accuracy": test_acc} if cfg.test_every_epoch else {}),
                  "epoch_seconds": now - (epochs[-1]["time"] if epochs else PROCESS_START),
                  "eval_seconds": now - t, "images_per_second": images_per_second, "time": now}  # fmt: skip
        append_record(record, state, self.out, acc)
        if val is not None:
            acc.log({"val/accuracy": val, "epoch": record["epoch"]}, step=state.step)
        if test_acc is not None:
            acc.log({"test/epoch_accuracy": test_acc}, step=state.step)
        return record

    def save(self) -> Path:
        return save_checkpoint(self.acc, self.out, self.state.step, self.identity,
                               self.cfg.keep_checkpoints, run_id=self.state.run_id)  # fmt: skip

    def stop_nonfinite(self):
        """Save the last good state (restored from memory), then stop with the step range."""
        good, state = self.good, self.state
        bad_from, bad_to = good.step + 1, state.step
        good.restore(**self.stateful)
        path = self.save()
        self.acc.end_training()
        where = f"step {bad_to}" if bad_from == bad_to else f"steps {bad_from}-{bad_to}"
        raise TrainingError(
            f"non-finite loss at {where}; stopped. The last good state (step {good.step}) is "
            f"saved in {path}. Lower --lr, prefer --mixed-precision bf16 to fp16, or pass "
            "--skip-nonfinite to skip such steps; then run the same command with --resume auto "
            "(the new flags apply from the saved step)."
        )


# config.json's "resolved": what the flags became on this machine, in this order.
RESOLVED_KEYS = ("mixed_precision", "precision_reason", "compile", "compile_reason", "routing",
                 "world_size", "lr_scaled", "steps_per_epoch", "total_steps", "train_size",
                 "parameters", "dataset", "class_names", "val_size", "flip", "data_placement")  # fmt: skip


def run_training(cfg: TrainConfig, data: Dataset | None, held: list | None = None) -> dict:
    """`train` without its error boundary (benchmarks call it); `held` receives the output
    directory's lock (released with the list's last reference when not given)."""
    try:
        return Run(cfg, data, [] if held is None else held).train()
    except Stopped as e:  # a stop request: the checkpoint is saved, the run can resume
        return {"stopped": True, "step": e.step, "checkpoint": str(e.checkpoint)}


def train(cfg: TrainConfig, data: Dataset | None = None) -> dict:
    """Train as `cfg` says; returns the summary (also written to summary.json), or
    {"stopped": True, ...} when a signal stopped the run after saving a checkpoint.

    Expected faults end in a one-line UserError that says what is kept and how to go on: a
    failed write (a full disk) anywhere, a second Ctrl-C (stop at once), a Ctrl-C while the run
    is set up, memory running out. The output directory is this run's (locked) until it
    returns."""
    held: list = []  # the output directory's lock (capsfast.run_lock.RunLock)
    out = Path(cfg.output_dir)
    try:
        return run_training(cfg, data, held)
    except KeyboardInterrupt as e:  # stop at once, keep what is on disk
        message = (
            interrupted_message if isinstance(e, SecondInterrupt) else setup_interrupted_message
        )
        raise Interrupted(message(out)) from None
    except OSError as e:  # a write that failed outside the checkpoint and export writers
        raise TrainingError(f"{describe_os_error(e)}; {checkpoint_note(out)}") from None
    except (MemoryError, RuntimeError) as e:
        message = out_of_memory(e, cfg)
        if message is not None:
            raise TrainingError(f"{message}; {checkpoint_note(out)}") from None
        detail = distributed.peer_failure(e)  # several processes: a collective failed, a peer did
        if detail is None:
            raise  # a bug: keep the traceback
        newest = list_checkpoints(out)[:1]
        raise distributed.PeerFailed(distributed.peer_failed_message(
            detail, newest[0] if newest else None, resume_hint(), cfg.peer_timeout)) from None  # fmt: skip
    finally:
        for lock in held:
            lock.release()


def main(argv: list[str] | None = None) -> int:
    """`launch/train.py` / `capsfast-train`: 0 done, 2 bad input (one line), 3 stopped and saved,
    130 stopped at once by a second interrupt (capsfast.errors.run_main prints the errors).
    Under a single-process `accelerate launch` a stopped run exits 0: that launcher turns any
    other code into a traceback of its own, after the trainer's message."""
    from capsfast.config import parse_args

    runtime.take_terminal_from_launcher()
    distributed.watch_launcher()  # a launcher killed outright leaves no orphans training on
    distributed.watch_launcher()  # a launcher killed outright leaves no orphans training on
    summary = train(parse_args(argv))
    if summary.get("stopped") and not runtime.under_single_process_launcher():
        return EXIT_STOPPED
    return 0
