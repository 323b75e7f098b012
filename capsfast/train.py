"""Training: `train(cfg)` reads top to bottom: set-up, the step loop, the end of the run.

One optimiser step:
    x, y, target = batches.batch(epoch, k, order)  # device-side shuffle + shift, or pairs (tasks)
    out, loss, margin, recon = task.loss(model, x, y, recon_weight, target)  # margin + recon
    accelerator.backward(loss); optimizer.step()               # lr set from (config, step)

The host meets the device only at sync points: every `log_every` steps (losses, learning rate,
progress, the non-finite check, stop requests), at epoch ends (validation, export) and at
checkpoints; with several processes also at a stop poll every 2 s or so (so that a stop
request reaches every rank in bounded time, whatever --log-every is: distributed.py). Run
set-up (device, precision, compile, routing, world size) is runtime.py; what a checkpoint holds
and how a stop is requested, checkpoint.py; the losses, model.py; what --task and --model
change (data, loss, model, test sets), tasks.py.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from capsfast import distributed, memory, runtime, tasks
from capsfast.checkpoint import (
    GoodState,
    StopRequest,
    TrainState,
    list_checkpoints,
    resume,
    save_checkpoint,
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
    to_float,
)
from capsfast.datasets import load_dataset
from capsfast.ema import EMA
from capsfast.errors import Interrupted, UserError, describe_os_error
from capsfast.export import CARD, load_model, read_config, save_model
from capsfast.model import CapsNet, ModelConfig, correct
from capsfast.model_card import write_card
from capsfast.provenance import git_commit, versions

EXIT_STOPPED = 3  # stopped on request (SIGTERM, Ctrl-C) after saving: resume with --resume auto
END_PHASES = ("checkpoint", "validation", "test", "summary", "figures")  # the end, in order


class TrainingError(UserError):
    """A run that cannot go on; the message says why and what to do."""


def _process_start() -> float:
    """When this process was created (psutil comes with accelerate), so wall_seconds includes
    interpreter start-up and imports; the module's import time where that is unavailable."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:
        return time.time()


PROCESS_START = _process_start()


# --------------------------------------------------------------------------- pieces of a run
def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam; the decoder is its own group (the seed preset gives it its own rate, no decay;
    the baseline has no decoder: an empty group)."""
    decoder = list(model.decoder.parameters()) if hasattr(model, "decoder") else []
    decoder_ids = {id(p) for p in decoder}
    encoder = [p for p in model.parameters() if id(p) not in decoder_ids]
    groups = [
        {"params": encoder, "lr": cfg.scaled_lr(), "weight_decay": cfg.weight_decay},
        {"params": decoder, "lr": cfg.scaled_lr(cfg.decoder_lr), "weight_decay": 0.0},
    ]
    if next(model.parameters()).is_cuda:
        return torch.optim.Adam(groups, fused=True)  # one kernel for all parameters
    return torch.optim.Adam(groups)


def set_learning_rate(optimizer, cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The schedule is a pure function of (config, step), applied before every step, so flags
    given on a resume (--lr, --schedule, --epochs, ...) take effect from the resumed step.
    Returns the encoder's rate."""
    factor = cfg.lr_factor(step, total_steps)
    encoder, decoder = optimizer.param_groups
    encoder["lr"] = cfg.scaled_lr() * factor
    decoder["lr"] = cfg.scaled_lr(cfg.decoder_lr) * factor
    return encoder["lr"]


def all_finite(loss: torch.Tensor, model, mixed_precision: str) -> torch.Tensor:
    """A device-side flag: loss and (except under fp16, whose GradScaler skips overflowing steps
    itself) every gradient finite. No host sync."""
    finite = torch.isfinite(loss)
    if mixed_precision != "fp16":
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
    return finite


@torch.no_grad()
def evaluate(model, images, labels, accelerator, batch_size: int, desc: str | None = None):
    """(accuracy, count) over all `images`, each counted exactly once across ranks: rank r takes
    a contiguous shard and the correct/total counts are summed (on-device batching has no padded
    duplicates for gather_for_metrics to drop). `desc`: a progress bar with that title."""
    from tqdm.auto import tqdm

    n = images.shape[0]
    world, rank = accelerator.num_processes, accelerator.process_index
    lo, hi = n * rank // world, n * (rank + 1) // world
    was_training = model.training
    model.eval()
    right = torch.zeros((), dtype=torch.long, device=accelerator.device)
    quiet = desc is None or not accelerator.is_local_main_process
    for start in tqdm(range(lo, hi, batch_size), desc=desc, leave=False, disable=quiet):
        # .to: a no-op for data on the device; streamed data's evaluation sets stay on the host.
        x = to_float(images[start : min(hi, start + batch_size)].to(accelerator.device))
        with accelerator.autocast():
            scores = model(x).scores
        y = labels[start : start + x.shape[0]].to(accelerator.device)
        right += correct(scores, y).sum()
    model.train(was_training)
    counts = torch.stack([right, torch.tensor(hi - lo, device=accelerator.device)])
    counts = accelerator.reduce(counts, reduction="sum")
    return counts[0].item() / max(1, counts[1].item()), int(counts[1].item())


class Window:
    """Device-side sums over the steps since the last sync: loss, margin and reconstruction loss
    (each times the local batch), correct predictions, images; and a non-finite flag. Adding
    never waits for the device; `read` is the sync (one transfer, reduced over ranks)."""

    def __init__(self, device, local_batch: int):
        self.sums = torch.zeros(5, device=device)
        self.n = torch.tensor(float(local_batch), device=device)  # no host copy per step
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    @torch.no_grad()
    def add(self, out, y, loss, margin, recon, finite) -> None:
        right = correct(out.scores, y).sum().float()
        self.sums += torch.stack([loss * self.n, margin * self.n, recon * self.n, right, self.n])
        self.nonfinite |= ~finite

    def read(self, accelerator, stop_requested: bool) -> tuple[list[float], bool, bool]:
        """(sums over all ranks, any rank non-finite, any rank asked to stop); then resets."""
        flags = torch.stack([self.nonfinite.float(), self.n.new_tensor(float(stop_requested))])
        packed = torch.cat([self.sums, flags])
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        values = packed.tolist()
        self.sums.zero_()
        self.nonfinite.zero_()
        return values[:5], values[5] > 0, values[6] > 0


def means(sums: list[float]) -> dict:
    loss, margin, recon, correct, n = sums
    keys = ("train_loss", "margin_loss", "recon_loss", "train_accuracy")
    return dict(
        zip(
            keys,
            (None,) * 4 if n == 0 else (loss / n, margin / n, recon / n, correct / n),
            strict=True,
        )
    )


class Clock:
    """Throughput at steady state: from the first sync after `warmup` steps (compilation,
    allocator), leaving out the time spent evaluating and checkpointing (`paused`)."""

    def __init__(self, step: int, warmup: int):
        self.start, self.warmup = step, warmup
        self.t0 = self.step0 = None
        self.excluded = 0.0
        self.last_t, self.last_step = time.perf_counter(), step

    def tick(self, step: int) -> tuple[float, bool]:
        """At a sync: (seconds per step since the last tick, whether this is the first window
        measured at steady state: the moment for the run's time estimate)."""
        now = time.perf_counter()
        per_step = (now - self.last_t) / max(1, step - self.last_step)
        first_steady = self.t0 is not None and self.last_step == self.step0
        if self.t0 is None and step - self.start >= self.warmup:
            self.t0, self.step0 = now, step
        self.last_t, self.last_step = now, step
        return per_step, first_steady

    @contextmanager
    def paused(self):
        t = time.perf_counter()
        yield
        spent = time.perf_counter() - t
        self.excluded += spent if self.t0 is not None else 0.0
        self.last_t += spent

    def images_per_second(self, step: int, batch: int) -> float | None:
        if self.t0 is None or step <= self.step0:
            return None
        return (
            (step - self.step0) * batch / max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
        )


def estimate_line(per_step: float, steps_left: int, batch: int) -> str:
    hours = per_step * steps_left / 3600
    left = f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.1f} min"
    return (f"capsfast: {per_step:.3g} s/step ({batch / per_step:,.0f} img/s): the remaining "
            f"{steps_left:,} steps take about {left}, plus validation at each epoch end")  # fmt: skip


def epoch_line(r: dict) -> str:
    val = "-" if r["val_accuracy"] is None else f"{r['val_accuracy']:.4f}"
    if r.get("test_accuracy") is not None:
        val += f", test acc {r['test_accuracy']:.4f}"
    return (f"epoch {r['epoch']:g} step {r['step']}: loss {r['train_loss']:.4f} (margin "
            f"{r['margin_loss']:.4f}, recon {r['recon_loss']:.4f}), train acc "
            f"{r['train_accuracy']:.4f}, val acc {val}, lr {r['lr']:.2e}, "
            f"{r['epoch_seconds']:.1f} s, {r['images_per_second'] or 0:.0f} img/s")  # fmt: skip


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


def validate_and_export(acc, cfg, eval_model, val_x, val_y, state, out, meta, optimizer,
                        steps_per_epoch, train_stats, images_per_second=None, desc=None,
                        test=None) -> dict:  # fmt: skip
    """Validate, export if best, append the epoch record (metrics.jsonl) and log it. `test`
    (--test-every-epoch): the test set too, for the learning curve only; the export is still
    chosen on validation."""
    t = time.time()
    val = test_acc = None
    if len(val_x):
        val, _ = evaluate(eval_model, val_x, val_y, acc, cfg.eval_batch_size, desc=desc)
    if test is not None:
        test_acc, _ = evaluate(eval_model, *test, acc, cfg.eval_batch_size)
    export_if_best(eval_model, val, state, out, acc, meta)
    epochs = [r for r in state.records if r["kind"] == "epoch"]
    now = time.time()
    record = {"kind": "epoch", "epoch": round(state.step / steps_per_epoch, 4), "step": state.step,
              **train_stats, "val_accuracy": val, "lr": optimizer.param_groups[0]["lr"],
              **({"test_accuracy": test_acc} if test is not None else {}),
              "epoch_seconds": now - (epochs[-1]["time"] if epochs else PROCESS_START),
              "eval_seconds": now - t, "images_per_second": images_per_second, "time": now}  # fmt: skip
    append_record(record, state, out, acc)
    if val is not None:
        acc.log({"val/accuracy": val, "epoch": record["epoch"]}, step=state.step)
    if test_acc is not None:
        acc.log({"test/epoch_accuracy": test_acc}, step=state.step)
    return record


def say(accelerator, message: str) -> None:
    """Print on the main process above the progress bar (not into its line)."""
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        tqdm.write(message)


def resume_hint() -> str:
    """How to go on: the same command, with --resume auto unless it has a --resume already."""
    has_resume = any(a == "--resume" or a.startswith("--resume=") for a in sys.argv[1:])
    return "run the same command again" + ("" if has_resume else " with --resume auto")


def log_reconstructions(accelerator, model, images, step: int, n: int = 16) -> None:
    """W&B image: n digits on top, their reconstructions (predicted capsule) below."""
    if not accelerator.is_main_process:
        return
    from torchvision.utils import make_grid

    from capsfast import tracking

    with torch.no_grad(), accelerator.autocast():
        x = to_float(images[:n].to(accelerator.device))
        rec = model(x).reconstructions
    if rec is None:  # the baseline: no decoder
        return
    grid = make_grid(torch.cat([x, rec.float()]).cpu(), nrow=n, padding=2)
    tracking.log_images(accelerator, {"reconstructions": grid.permute(1, 2, 0).numpy()}, step)


def prepare_model(model_cfg, cfg: TrainConfig, accelerator, local_batch=None):
    """(model as trained: prepared, maybe compiled or DDP-wrapped; the model itself (CapsNet or
    the baseline: tasks.build_model), which is what gets saved and exported; optimiser; EMA or
    None). `--routing auto` weighs CapsNet's memory at this process's batch
    (capsfast.memory.auto_routing)."""
    device = accelerator.device
    model = tasks.build_model(model_cfg).to(device)
    requested = cfg.routing
    if isinstance(model, CapsNet):
        memory.check_fused_shape(model_cfg, requested)
    if requested == "auto" and isinstance(model, CapsNet):
        local_batch = local_batch or cfg.batch_size // accelerator.num_processes
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        requested = memory.auto_routing(model_cfg, local_batch, device.type, free)
        if requested == "fused":
            need = memory.step_peak_bytes(model_cfg, local_batch, "triton") / 2**30
            accelerator.print(
                f"capsfast: --routing auto: a step that stores u_hat needs about {need:.1f} GiB "
                f"at batch {local_batch}, more than fits in the {free / 2**30:.1f} GiB free; "
                "using the fused DigitCaps, which never stores it"
            )
    model.set_routing(runtime.choose_routing(requested, device, accelerator))
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


def data_line(data: Dataset, cfg: TrainConfig, n_train, n_val, n_test, flip, placement) -> str:
    """The banner's line about the data: what, how much, augmentation, where it lives."""
    c, s = data.channels, data.image_size
    generated = cfg.task != "mnist"  # the task places the digits itself (tasks.py)
    aug = [f"shifts of up to {cfg.max_shift} px"] if cfg.max_shift and not generated else []
    aug += [f"--task {cfg.task}'s placement"] if generated else []
    aug += [f"random {cfg.crop}x{cfg.crop} crops (test: centre)"] if cfg.crop else []
    aug += ["horizontal flips"] if flip else []
    capped = " (--val-size capped at a tenth)" if n_val < min(cfg.val_size, 10**12) else ""
    where = "on the device" if placement == "device" else "streamed from host memory"
    return (f"{data.name}: {c}x{s}x{s} uint8 images, {data.num_classes} classes; {n_train:,} "
            f"train, {n_val:,} validation{capped}, {n_test:,} test; augmentation: "
            f"{', '.join(aug) or 'none'}; data {where}")  # fmt: skip


# --------------------------------------------------------------------------- the run
def train(cfg: TrainConfig, data: Dataset | None = None) -> dict:
    """Train as `cfg` says; returns the summary (also written to summary.json), or
    {"stopped": True, ...} when a signal stopped the run after saving a checkpoint.

    Expected faults end in a one-line UserError that says what is kept and how to go on: a
    failed write (a full disk) anywhere, a second Ctrl-C (stop at once)."""
    try:
        return run_training(cfg, data)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, keep what is on disk
        raise Interrupted(interrupted_message(Path(cfg.output_dir))) from None
    except OSError as e:  # a write that failed outside the checkpoint and export writers
        raise TrainingError(
            f"{describe_os_error(e)}; {checkpoint_note(Path(cfg.output_dir))}"
        ) from None
    except RuntimeError as e:  # several processes: a collective failed because a peer did
        detail = distributed.peer_failure(e)
        if detail is None:
            raise  # a bug: keep the traceback
        newest = list_checkpoints(cfg.output_dir)[:1]
        raise distributed.PeerFailed(distributed.peer_failed_message(
            detail, newest[0] if newest else None, resume_hint(), cfg.peer_timeout)) from None  # fmt: skip


def run_training(cfg: TrainConfig, data: Dataset | None) -> dict:
    from accelerate.utils import set_seed

    from capsfast import tracking

    cfg.validate()
    acc, mixed_precision, precision_reason, compiled = runtime.make_accelerator(cfg)
    device, world = acc.device, acc.num_processes
    out = make_output_dir(cfg.output_dir, acc)
    set_seed(cfg.seed)

    # Data: uint8 [N, C, S, S] on the device for the whole run, or in host memory and streamed
    # to it in chunks when it is too large for it; augmentation on the device (data.py).
    with acc.main_process_first():
        data = data if data is not None else load_dataset(
            cfg.dataset, tasks.affnist_dir(cfg), cfg.download, cfg.image_size, cfg.test_fraction,
            warn=lambda m: acc.print(f"capsfast: warning: {m}"))  # fmt: skip
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    placement = choose_placement(cfg.data_placement, data.nbytes(), device.type, free)
    if placement == "device":
        data = data.to(device)
    if cfg.crop > data.image_size:
        raise DataError(f"--crop {cfg.crop} is larger than the {data.image_size}-pixel images "
                        f"of {data.name}: choose at most {data.image_size}")  # fmt: skip
    val_size = default_val_size(cfg.val_size, len(data.train_images))
    (train_x, train_y), (val_x, val_y) = split_train_val(data, val_size, seed=cfg.seed)
    test_x, test_y = data.test_images[: cfg.test_size], data.test_labels[: cfg.test_size]
    if cfg.crop:  # evaluation sees the centre crop
        val_x, test_x = centre_crop(val_x, cfg.crop), centre_crop(test_x, cfg.crop)
    flip = data.flips if cfg.flip is None else cfg.flip
    # The task (--task, --model): its training batches, validation and test sets, its model.
    task = tasks.make_task(cfg, data, model_config_for(data, cfg), (train_x, train_y),
                           (val_x, val_y), (test_x, test_y), rank=acc.process_index, world=world,
                           device=device, stream=placement == "stream", flip=flip)  # fmt: skip
    batches, (val_x, val_y), (test_x, test_y) = task.batches, task.val, task.test
    steps_per_epoch = batches.steps_per_epoch
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    # Model (configured from the data and the task), optimiser, EMA, what a checkpoint holds.
    model_cfg = task.model_config
    model, raw_model, optimizer, ema = prepare_model(model_cfg, cfg, acc, batches.local_batch)
    eval_model = ema.module if ema is not None else raw_model  # validated, exported, tested
    state = TrainState()
    for obj in (state, ema):
        if obj is not None:
            acc.register_for_checkpointing(obj)
    stateful = {"model": raw_model, "optimizer": optimizer, "state": state}
    stateful.update({"ema": ema} if ema is not None else {})
    identity = {"model": model_cfg.to_dict(),
                "data": {"batch_size": cfg.batch_size, "seed": cfg.seed, "val_size": val_size,
                         "dataset": data.name, "task": cfg.task, "architecture": cfg.model}}  # fmt: skip
    initial = GoodState()  # a failed half-load must not leak into a fresh start
    initial.take(0, **stateful)
    resumed = resume(acc, cfg.resume, out, identity, lambda: initial.restore(**stateful))

    parameters = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    config_record = {**cfg.to_dict(), "model": model_cfg.to_dict(), "resolved": {
        "mixed_precision": mixed_precision, "precision_reason": precision_reason,
        "compile": compiled, "routing": raw_model.routing,
        "world_size": world, "lr_scaled": cfg.scaled_lr(), "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps, "train_size": len(train_x), "parameters": parameters,
        "dataset": data.name, "class_names": list(data.class_names), "val_size": val_size,
        "flip": flip, "data_placement": placement}}  # fmt: skip
    use_wandb = bool(acc.log_with) and tracking.init_tracking(
        acc, config_record, cfg.wandb_project, str(out), f"{cfg.task}-{cfg.model}-{out.name}"
    )
    if acc.is_main_process:
        (out / "config.json").write_text(json.dumps(config_record, indent=2) + "\n")
        # Rewritten from the checkpoint's records, so a resumed run has no duplicate lines.
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in state.records))
    routing_line = (f"routing {raw_model.routing}, {cfg.routing_iters} iterations"
                    f"{' (detach_inner)' if cfg.detach_inner else ''}"
                    if isinstance(raw_model, CapsNet) else "no routing")  # fmt: skip
    acc.print(
        f"capsfast: task {cfg.task}, {'CapsNet' if cfg.model == 'capsnet' else 'baseline CNN'} "
        f"({model_cfg.image_size}x{model_cfg.image_size} inputs), {parameters:,} parameters; "
        f"{routing_line}\n"
        + "".join(f"capsfast: {note}\n" for note in task.notes)
        + f"capsfast: {data_line(data, cfg, len(train_x), len(val_x), len(test_x), flip, placement)}\n"
        f"capsfast: {world} process{'es' if world > 1 else ''} on {runtime.describe_device(acc)}, "
        f"{runtime.PRECISION_NAMES[mixed_precision]} ({precision_reason}), compile "
        f"{'on' if compiled else 'off'}\n"
        f"capsfast: {total_steps:,} steps ({total_steps / steps_per_epoch:.3g} epochs of "
        f"{steps_per_epoch:,} at global batch {cfg.batch_size}), lr {cfg.scaled_lr():.3g} "
        f"({cfg.schedule}); output in {out}"
        + (f"\ncapsfast: resumed from {resumed} at step {state.step}" if resumed else "")
    )
    meta = {"run_id": state.run_id, "preset": cfg.preset, "seed": cfg.seed, "commit": git_commit(),
            "dataset": data.name, "task": cfg.task}  # fmt: skip
    if data.name.startswith("folder:"):  # visualize holds out the same test images
        meta["test_fraction"] = cfg.test_fraction
    end_context = dict(acc=acc, cfg=cfg, eval_model=eval_model, val_x=val_x, val_y=val_y,
                       state=state, out=out, meta=meta, optimizer=optimizer,
                       steps_per_epoch=steps_per_epoch)  # fmt: skip

    def save() -> Path:
        return save_checkpoint(acc, out, state.step, identity, cfg.keep_checkpoints)

    def sync_point(step: int, bar, lr: float, stop_requested: bool) -> Path | None:
        """The host looks (every log_every steps, at epoch ends and checkpoints): logs the
        window, validates at an epoch end, saves when due. Returns the checkpoint if the run must
        stop now."""
        sums, nonfinite, stop_now = window.read(acc, stop_requested)
        if nonfinite:
            stop_nonfinite(good, stateful, state, save, acc)
        per_step, first_steady = clock.tick(step)
        if first_steady and step < total_steps:
            say(acc, estimate_line(per_step, total_steps - step, cfg.batch_size))
        state.epoch_stats = [a + b for a, b in zip(state.epoch_stats, sums, strict=True)]
        record = {"kind": "train", "epoch": round(step / steps_per_epoch, 4), "step": step,
                  **means(sums), "lr": lr, "images_per_second": cfg.batch_size / per_step}  # fmt: skip
        append_record(record, state, out, acc)
        bar.set_postfix(loss=f"{record['train_loss'] or float('nan'):.4f}", lr=f"{lr:.2e}",
                        refresh=False)  # fmt: skip
        acc.log({"train/loss": record["train_loss"], "train/lr": lr,
                 "train/skipped_steps": state.skipped_steps}, step=step)  # fmt: skip
        good.take(step, **stateful)
        if cfg.max_seconds is not None and step < total_steps:  # every rank stops at one step
            over = time.perf_counter() - loop_start >= cfg.max_seconds
            if any_rank(acc, torch.tensor(over, device=device)):
                early_stop["reason"] = f"--max-seconds {cfg.max_seconds:g} reached"
        path = None
        with clock.paused():
            if step % steps_per_epoch == 0:
                stats = means(state.epoch_stats)
                state.epoch_stats = [0.0] * 5
                epoch = validate_and_export(**end_context, train_stats=stats,
                                            images_per_second=bar.format_dict.get("rate"),
                                            test=task.test if cfg.test_every_epoch else None)  # fmt: skip
                say(acc, epoch_line(epoch))
                target_acc, val = cfg.stop_at_accuracy, epoch["val_accuracy"]
                if target_acc is not None and val is not None and val >= target_acc:
                    early_stop["reason"] = f"validation accuracy {val:.4f} >= {target_acc}"
                if use_wandb:
                    log_reconstructions(acc, eval_model, val_x if len(val_x) else test_x, step)
            if stop_now or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                path = save()
        return path if stop_now else None

    # ------------------------------------------------------------------ the loop
    model.train()
    window = Window(device, batches.local_batch)
    good = GoodState()  # the state at the last sync where everything was finite
    good.take(state.step, **stateful)
    clock = Clock(state.step, warmup=3 if total_steps - state.step >= 10 else 0)
    stop_poll = distributed.StopPoll(acc, state.step)  # bounds a stop's delay, any --log-every
    early_stop: dict = {}  # set at a sync point: why the run ends before total_steps
    loop_start = time.perf_counter()
    bar = None
    try:
        with StopRequest(announce=acc.is_main_process) as stop:
            for step in range(state.step, total_steps):
                epoch, k = divmod(step, steps_per_epoch)
                if bar is None or k == 0:  # a new epoch: its order and its progress bar
                    order = epoch_permutation(len(train_x), cfg.seed, epoch, device)
                    bar = new_bar(bar, epoch, k, steps_per_epoch, total_steps, cfg.batch_size, acc)
                lr = set_learning_rate(optimizer, cfg, step, total_steps)
                x, y, target = batches.batch(epoch, k, order)
                if compiled and device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()  # reduce-overhead: a new step
                with acc.autocast():
                    output, loss, margin, recon = task.loss(model, x, y, cfg.recon_weight, target)
                acc.backward(loss)
                finite = all_finite(loss, model, mixed_precision)
                if cfg.skip_nonfinite and any_rank(acc, ~finite):  # opt-in: a sync every step
                    state.skipped_steps += 1
                else:
                    optimizer.step()
                    if ema is not None:
                        ema.update(raw_model)
                    window.add(output, y, loss.detach(), margin.detach(), recon.detach(), finite)
                optimizer.zero_grad(set_to_none=True)
                state.step = step + 1
                bar.update(cfg.batch_size)  # no host sync: the bar only counts images
                due = sync_due(state.step, cfg, steps_per_epoch, total_steps, stop.signal, world)
                polled = not due and stop_poll.stop_agreed(state.step, stop.signal is not None)
                if due or polled:  # polled: some rank has a stop request, every rank stops here
                    stopped_at = sync_point(state.step, bar, lr, stop.signal is not None or polled)
                    if stopped_at is not None:
                        bar.close()
                        acc.print(f"capsfast: stopped on request at step {state.step}; "
                                  f"checkpoint saved to {stopped_at}\n"
                                  f"capsfast: to resume, {resume_hint()}")  # fmt: skip
                        acc.end_training()
                        return {"stopped": True, "step": state.step, "checkpoint": str(stopped_at)}
                    if early_stop:  # --max-seconds or --stop-at-accuracy: the end of the run
                        say(acc, f"capsfast: {early_stop['reason']} at step {state.step}")
                        break
            if bar is not None:
                bar.close()
            return finish_run(
                **end_context, stop=stop, save=save, task=task,
                images_per_second=clock.images_per_second(state.step, cfg.batch_size),
                use_wandb=use_wandb, epochs=state.step * cfg.batch_size / len(train_x),
                summary_fields={
                    "world_size": world,
                    "device": "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device),
                    "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
                    "mixed_precision": mixed_precision,
                    "precision": runtime.PRECISION_NAMES[mixed_precision],
                    "precision_reason": precision_reason,
                    "routing": raw_model.routing, "parameters": parameters,
                    "task": cfg.task, "model": cfg.model,
                    "stopped_early": early_stop.get("reason"),
                    "dataset": data.name, "class_names": list(data.class_names),
                    "config": config_record},
            )  # fmt: skip
    except Stopped as e:  # a stop request during the end of the run: the checkpoint is saved
        return {"stopped": True, "step": e.step, "checkpoint": str(e.checkpoint)}
    finally:
        if bar is not None:
            bar.close()


def sync_due(step, cfg, steps_per_epoch, total_steps, signal, world) -> bool:
    """Is `step` a sync point? (every log_every steps, the last step, epoch ends, checkpoints,
    and at once when a single process got a stop signal)."""
    return bool(step % cfg.log_every == 0 or step == total_steps or step % steps_per_epoch == 0
                or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                or (signal is not None and world == 1))  # fmt: skip


def any_rank(accelerator, flag: torch.Tensor) -> bool:
    flag = flag.float()
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    return flag.item() > 0


def new_bar(bar, epoch, k, steps_per_epoch, total_steps, batch, accelerator):
    """The progress bar of epoch `epoch` (counts images), starting at its step k."""
    from tqdm.auto import tqdm

    if bar is not None:
        bar.close()
    in_epoch = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
    return tqdm(total=in_epoch * batch, initial=k * batch, desc=f"epoch {epoch + 1}", unit="img",
                unit_scale=True, leave=False, dynamic_ncols=True,
                disable=not accelerator.is_local_main_process)  # fmt: skip


def stop_nonfinite(good: GoodState, stateful: dict, state: TrainState, save, accelerator):
    """Save the last good state (restored from memory), then stop with the step range."""
    bad_from, bad_to = good.step + 1, state.step
    good.restore(**stateful)
    path = save()
    accelerator.end_training()
    where = f"step {bad_to}" if bad_from == bad_to else f"steps {bad_from}-{bad_to}"
    raise TrainingError(
        f"non-finite loss at {where}; stopped. The last good state (step {good.step}) is saved "
        f"in {path}. Lower --lr, prefer --mixed-precision bf16 to fp16, or pass "
        "--skip-nonfinite to skip such steps; then run the same command with --resume auto "
        "(the new flags apply from the saved step)."
    )


def checkpoint_note(out: Path) -> str:
    """What is kept on disk, and how to go on."""
    newest = list_checkpoints(out)[:1]
    if not newest:
        return "no checkpoint had been written yet: fix the cause and start again"
    return (f"the last complete checkpoint is {newest[0]}: fix the cause (free space), then "
            f"{resume_hint()}")  # fmt: skip


def interrupted_message(out: Path) -> str:
    return f"stopped at once (a second interrupt); {checkpoint_note(out)}"


# --------------------------------------------------------------------------- the end of a run
def finish_run(*, acc, cfg, eval_model, val_x, val_y, state, out, meta, optimizer,
               steps_per_epoch, stop, save, task, images_per_second, use_wandb,
               epochs, summary_fields) -> dict:  # fmt: skip
    """The end of a run, in phases (END_PHASES), each safe to interrupt: the final checkpoint
    first (so a stop at any later phase loses nothing: `--resume auto` finds the run complete
    and repeats only the end), the last validation (also after --max-steps mid-epoch) and
    export, the test evaluation of the exported model, summary.json, the figures. A stop
    request is honoured before each phase; one that arrives during the last lets it finish."""
    from capsfast import tracking

    def phase(name: str) -> None:
        if any_rank(acc, torch.tensor(stop.signal is not None, device=acc.device)):  # all agree
            checkpoint = list_checkpoints(out)[0]
            acc.print(f"capsfast: stopped on request at the end of the run, before its {name} "
                      f"phase; the final checkpoint is {checkpoint}\n"
                      f"capsfast: to finish the run, {resume_hint()}")  # fmt: skip
            acc.end_training()
            raise Stopped(state.step, checkpoint)
        acc.print(f"capsfast: end of run: {name}")
        stop.phase(name)

    phase("checkpoint")
    newest = [list_checkpoints(out)[:1] if acc.is_main_process else None]
    if acc.num_processes > 1:  # the main process decides, so every rank joins the same collectives
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(newest)
    if not newest[0] or newest[0][0].name != f"step-{state.step:08d}":
        save()
    phase("validation")
    last = next((r for r in reversed(state.records) if r["kind"] == "epoch"), None)
    if last is None or last["step"] != state.step:
        stats = means(state.epoch_stats)
        validate_and_export(acc, cfg, eval_model, val_x, val_y, state, out, meta, optimizer,
                            steps_per_epoch, stats, desc="validation",
                            test=task.test if cfg.test_every_epoch else None)  # fmt: skip
    phase("test")
    routing = summary_fields["routing"]
    exported = load_model(out / "model", device=acc.device, routing=routing)
    test_acc, test_n = evaluate(exported, *task.test, acc, cfg.eval_batch_size, desc="test")
    extra = {}  # the task's further test sets (affnist: affNIST itself)
    for name, (x, y) in task.extra_tests.items():
        extra[f"{name}_accuracy"], extra[f"{name}_size"] = evaluate(
            exported, x, y, acc, cfg.eval_batch_size, desc=name
        )
    phase("summary")
    train_records = [r for r in state.records if r["kind"] == "train"]
    cuda = acc.device.type == "cuda"
    summary = {
        "test_accuracy": test_acc,
        "test_size": test_n,
        **extra,
        "best_val_accuracy": state.best_val_accuracy if state.best_val_accuracy >= 0 else None,
        "final_train_loss": train_records[-1]["train_loss"] if train_records else None,
        "steps": state.step,
        "epochs": epochs,
        "wall_seconds": time.time() - PROCESS_START,
        "images_per_second": images_per_second,
        **summary_fields,
        "preset": cfg.preset,
        "seed": cfg.seed,
        "commit": git_commit(),
        **versions(),
        "peak_memory_gb": torch.cuda.max_memory_allocated(acc.device) / 1e9 if cuda else None,
        "skipped_steps": state.skipped_steps,
    }
    if acc.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_card(out / "model", summary, name=out.name)  # Hub-ready: from this very summary
    if use_wandb:
        acc.log({"test/accuracy": test_acc, **{f"test/{k}": v for k, v in extra.items()}},
                step=state.step)  # fmt: skip
        tracking.set_summary(acc, summary)
    phase("figures")
    if acc.is_main_process:
        from capsfast.figures import plot_curves

        plot_curves(state.records, out / "curves.png")
        figures = task.figures(exported, out / "figures")
        if use_wandb:
            images = {f"figures/{k}": str(v) for k, v in figures.items()}
            images["figures/curves"] = str(out / "curves.png")
            tracking.log_images(acc, images, state.step)
        acc.print(
            "".join(
                f"capsfast: {k.removesuffix('_accuracy')} accuracy {v:.4f}\n"
                for k, v in extra.items()
                if k.endswith("_accuracy")
            )
            + f"capsfast: test accuracy {test_acc:.4f} on {test_n:,} images (best validation "
            f"{summary['best_val_accuracy']}), {summary['wall_seconds']:.1f} s, "
            f"{images_per_second or 0:.1f} img/s; model in {out / 'model'}, figures in "
            f"{out / 'figures'}"
        )
    acc.end_training()
    return summary


class Stopped(Exception):
    """A stop request honoured at the end of a run (the final checkpoint is on disk)."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(step)
        self.step, self.checkpoint = step, checkpoint


def main(argv: list[str] | None = None) -> int:
    """`launch/train.py` / `capsfast-train`: 0 done, 2 bad input (one line), 3 stopped and saved,
    130 stopped at once by a second interrupt (capsfast.errors.run_main prints the errors).
    Under a single-process `accelerate launch` a stopped run exits 0: that launcher turns any
    other code into a traceback of its own, after the trainer's message."""
    from capsfast.config import parse_args

    runtime.take_terminal_from_launcher()
    distributed.watch_launcher()  # a launcher killed outright leaves no orphans training on
    summary = train(parse_args(argv))
    if summary.get("stopped") and not runtime.under_single_process_launcher():
        return EXIT_STOPPED
    return 0
