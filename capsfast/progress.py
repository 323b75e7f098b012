"""What a training run tells its user while it runs: the banner, the progress bar, the time
estimate, a line per epoch; and the two small accountants behind them: `Window` (device-side
sums between host syncs) and `Clock` (steady-state throughput)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import NamedTuple

import torch

from capsfast.model import correct


class Sums(NamedTuple):
    """Sums over some steps (each loss times its batch): what the means of a window or an epoch
    are made of. A plain tuple, so a TrainState stores it as a list in a checkpoint."""

    loss: float = 0.0
    margin: float = 0.0
    recon: float = 0.0
    correct: float = 0.0
    images: float = 0.0

    def __add__(self, other):  # element-wise, not tuple concatenation
        return Sums(*(a + b for a, b in zip(self, other, strict=True)))

    def means(self) -> dict:
        keys = ("train_loss", "margin_loss", "recon_loss", "train_accuracy")
        n = self.images
        values = (None,) * 4 if n == 0 else (self.loss / n, self.margin / n, self.recon / n,
                                             self.correct / n)  # fmt: skip
        return dict(zip(keys, values, strict=True))


class WindowRead(NamedTuple):
    sums: Sums  # over all ranks
    nonfinite: bool  # any rank saw a non-finite loss or gradient
    stop: bool  # any rank was asked to stop


class Window:
    """Device-side sums over the steps since the last sync, and a non-finite flag. Adding never
    waits for the device; `read` is the sync (one transfer, reduced over ranks)."""

    def __init__(self, device, local_batch: int):
        self.sums = torch.zeros(len(Sums._fields), device=device)
        self.n = torch.tensor(float(local_batch), device=device)  # no host copy per step
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    @torch.no_grad()
    def add(self, out, y, loss, margin, recon, finite) -> None:
        right = correct(out.scores, y).sum().float()
        self.sums += torch.stack([loss * self.n, margin * self.n, recon * self.n, right, self.n])
        self.nonfinite |= ~finite

    def read(self, accelerator, stop_requested: bool) -> WindowRead:
        """The window over all ranks, then reset. The two flags travel in the same transfer."""
        flags = torch.stack([self.nonfinite.float(), self.n.new_tensor(float(stop_requested))])
        packed = torch.cat([self.sums, flags])
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        *sums, nonfinite, stop = packed.tolist()
        self.sums.zero_()
        self.nonfinite.zero_()
        return WindowRead(Sums(*sums), nonfinite > 0, stop > 0)


class Clock:
    """Throughput at steady state: from the first sync after `warmup` steps (compilation,
    allocator) to the end of the step loop (`stop`), leaving out the time spent evaluating and
    checkpointing in between (`paused`). The end of a run (final checkpoint, validation, test,
    export) is not training time: counted, it made a 13-step run at batch 128 on a CPU report
    70.8 img/s while its steps ran at 76-78."""

    def __init__(self, step: int, warmup: int):
        self.start, self.warmup = step, warmup
        self.t0 = self.step0 = self.t_end = None
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

    def stop(self) -> None:
        """The step loop has ended: the clock stands still from here."""
        if self.t_end is None:
            self.t_end = time.perf_counter()

    def images_per_second(self, step: int, batch: int) -> float | None:
        if self.t0 is None or step <= self.step0:
            return None
        end = self.t_end if self.t_end is not None else time.perf_counter()
        elapsed = max(end - self.t0 - self.excluded, 1e-9)
        return (step - self.step0) * batch / elapsed


def new_bar(bar, epoch, k, steps_per_epoch, total_steps, batch, accelerator):
    """The progress bar of epoch `epoch` (counts images), starting at its step k."""
    from tqdm.auto import tqdm

    if bar is not None:
        bar.close()
    in_epoch = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
    return tqdm(total=in_epoch * batch, initial=k * batch, desc=f"epoch {epoch + 1}", unit="img",
                unit_scale=True, leave=False, dynamic_ncols=True,
                disable=not accelerator.is_local_main_process)  # fmt: skip


def say(accelerator, message: str) -> None:
    """Print on the main process above the progress bar (not into its line)."""
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        tqdm.write(message)


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


def data_line(data, cfg, n_train, n_val, n_test, flip, placement) -> str:
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


def banner(run) -> str:
    """What the run is about to do, before its first step: model, data, processes and device,
    precision and compile with their reasons, steps, learning rate, output; a resume."""
    cfg, model_cfg, r = run.cfg, run.task.model_config, run.resolved
    kind = "CapsNet" if cfg.model == "capsnet" else "baseline CNN"
    routing = (f"routing {r['routing']}, {cfg.routing_iters} iterations"
               f"{' (detach_inner)' if cfg.detach_inner else ''}"
               if cfg.model == "capsnet" else "no routing")  # fmt: skip
    world = r["world_size"]
    precision = f"{run.precision_name} ({r['precision_reason']})"
    compiled = f"{'on' if r['compile'] else 'off'} ({r['compile_reason']})"
    lines = [
        f"task {cfg.task}, {kind} ({model_cfg.image_size}x{model_cfg.image_size} inputs), "
        f"{r['parameters']:,} parameters; {routing}",
        *run.task.notes,
        data_line(
            run.data,
            cfg,
            r["train_size"],
            len(run.task.val[0]),
            len(run.task.test[0]),
            r["flip"],
            r["data_placement"],
        ),  # fmt: skip
        f"{world} process{'es' if world > 1 else ''} on {run.device_name}, {precision}, "
        f"compile {compiled}",
        f"{run.total_steps:,} steps ({run.total_steps / run.steps_per_epoch:.3g} epochs of "
        f"{run.steps_per_epoch:,} at global batch {cfg.batch_size}), lr {cfg.scaled_lr():.3g} "
        f"({cfg.schedule}); output in {run.out}",
    ]
    if run.resumed:
        lines.append(f"resumed from {run.resumed} at step {run.state.step}")
    return "\n".join(f"capsfast: {line}" for line in lines)
