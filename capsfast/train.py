"""Training: Accelerate end to end, MNIST on the device, checkpoints, summary.json.

One optimiser step:
    x, y = batches.batch(epoch, k)            # device-side shuffle + per-sample shift (data.py)
    out  = model(x, y)                        # CapsNet; the decoder sees the true label's capsule
    loss = margin(out.lengths, y) + 0.0005 * recon(out.reconstructions, x)
    accelerator.backward(loss); optimizer.step(); scheduler.step()

The host meets the device only at sync points: every `log_every` steps (loss and learning rate,
progress bar, the non-finite check, stop requests), at epoch ends (validation) and checkpoints.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from capsfast.checkpoint import (
    CheckpointError,
    GoodState,
    StopRequest,
    TrainState,
    list_checkpoints,
    resume,
    save_checkpoint,
)
from capsfast.config import TrainConfig, preset_mixed_precision
from capsfast.data import (
    MNIST,
    TrainBatches,
    epoch_permutation,
    load_mnist,
    split_train_val,
    to_float,
)
from capsfast.ema import EMA
from capsfast.errors import UserError
from capsfast.export import load_model, save_model
from capsfast.model import CapsNet, ModelConfig, margin_loss, reconstruction_loss
from capsfast.provenance import git_commit, package_version


def _process_start() -> float:
    """When this process was created (psutil comes with accelerate), so wall_seconds includes
    interpreter start-up and imports; the module's import time where that is unavailable."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:
        return time.time()


PROCESS_START = _process_start()


class TrainingError(UserError):
    """A run that cannot go on; the message says why and what to do."""


# --------------------------------------------------------------------------- run set-up
def resolve_mixed_precision(cfg: TrainConfig, on_cuda: bool) -> str:
    """The flag, else the launcher's setting (`accelerate launch` exports `no` when nothing was
    asked, so `no` there means "not set"), else the preset's choice on CUDA, else fp32."""
    if cfg.mixed_precision is not None:
        return cfg.mixed_precision
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher != "no":
        return launcher
    return preset_mixed_precision(cfg.preset) if on_cuda else "no"


def resolve_compile(cfg: TrainConfig, on_cuda: bool) -> bool:
    """The flag, else the launcher's dynamo backend, else on for CUDA and off for CPU (where
    compiling costs about 45 s and gains nothing)."""
    if cfg.compile is not None:
        return cfg.compile
    if os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower() not in ("no", ""):
        return True
    return on_cuda


def check_world_size(world: int) -> None:
    """Refuse a launch that asked for several processes but runs alone: every copy would train
    the whole model on its own, N times the work for one result."""
    if world != 1:
        return
    env = os.environ
    if "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        # `accelerate launch --cpu --num_processes N` sets a rendezvous address, then starts one.
        raise TrainingError(
            "the launcher set up a process group (MASTER_ADDR) but this run has world size 1. "
            "On CPU launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
            "--num_processes N ...` (`--cpu --num_processes N` starts only one process)"
        )
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if tasks > 1 and "WORLD_SIZE" not in env:
        raise TrainingError(
            f"srun started {tasks} tasks but each has world size 1 and would train a full copy: "
            "start one `accelerate launch` per node (see launch/slurm/train.sbatch)"
        )


def choose_routing(requested: str, device: torch.device, accelerator) -> str:
    """`auto` picks triton on CUDA if its kernels compile and agree with the reference there,
    else falls back to the reference with one warning; an explicit choice is used as is (and
    fails loudly if it cannot run)."""
    from capsfast.routing import resolve_impl

    impl = resolve_impl(requested, device)
    if impl == "torch":
        return impl
    try:
        from capsfast.kernels.routing import triton_available

        # An explicit choice is not probed: if the kernel fails, it fails loudly, in full.
        ok, reason = triton_available(device, probe=requested == "auto")
    except Exception as e:  # triton missing or broken at import
        ok, reason = False, f"{type(e).__name__}: {e}"
    if accelerator.num_processes > 1:  # one rank's failure sends every rank to the reference
        flag = torch.tensor(0.0 if ok else 1.0, device=device)
        if accelerator.reduce(flag, reduction="sum").item() > 0 and ok:
            ok, reason = False, "the kernel failed on another rank"
    if ok:
        return impl
    if requested != "auto":
        raise TrainingError(
            f"--routing {requested} cannot run on {device}: {reason}. Use --routing auto or torch"
        )
    accelerator.print(
        f"capsfast: warning: --routing auto cannot use the {impl} kernel on {device} ({reason}); "
        "using the torch reference. Pass --routing triton to see the full error."
    )
    return "torch"


def build_optimizer(model: CapsNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam; the decoder is its own group (the seed preset gives it its own rate, no decay)."""
    decoder = list(model.decoder.parameters())
    decoder_ids = {id(p) for p in decoder}
    encoder = [p for p in model.parameters() if id(p) not in decoder_ids]
    groups = [
        {"params": encoder, "lr": cfg.scaled_lr(), "weight_decay": cfg.weight_decay},
        {"params": decoder, "lr": cfg.scaled_lr(cfg.decoder_lr), "weight_decay": 0.0},
    ]
    if next(model.parameters()).is_cuda:
        return torch.optim.Adam(groups, fused=True)  # one kernel for all parameters
    return torch.optim.Adam(groups)


def model_config_from(cfg: TrainConfig) -> ModelConfig:
    return ModelConfig(routing_iters=cfg.routing_iters, detach_inner=cfg.detach_inner)


# --------------------------------------------------------------------------- step and eval
def compute_loss(model, x: torch.Tensor, y: torch.Tensor, recon_weight: float = 0.0005):
    """Forward and both losses (SPEC.md): returns (output, total, margin, reconstruction)."""
    out = model(x, y)  # training: the decoder sees the true label's capsule
    margin = margin_loss(out.lengths, y)
    recon = reconstruction_loss(out.reconstructions, x, recon_weight)
    return out, margin + recon, margin, recon


@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor, accelerator, batch_size: int):
    """(accuracy, count) over all `images`, each counted exactly once across ranks: rank r takes
    a contiguous shard and the correct/total counts are summed (on-device batching has no padded
    duplicates for gather_for_metrics to drop, so the counts are reduced instead)."""
    n = images.shape[0]
    world, rank = accelerator.num_processes, accelerator.process_index
    lo, hi = n * rank // world, n * (rank + 1) // world
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=accelerator.device)
    for start in range(lo, hi, batch_size):
        x = to_float(images[start : min(hi, start + batch_size)])
        with accelerator.autocast():
            lengths = model(x).lengths
        correct += (lengths.argmax(1) == labels[start : start + x.shape[0]]).sum()
    model.train(was_training)
    counts = torch.stack([correct, torch.tensor(hi - lo, device=accelerator.device)])
    counts = accelerator.reduce(counts, reduction="sum")
    return counts[0].item() / max(1, counts[1].item()), int(counts[1].item())


# --------------------------------------------------------------------------- the trainer
class Trainer:
    """Set up by __init__, run by run(); the loop's pieces are methods so each reads alone."""

    def __init__(self, cfg: TrainConfig, data: MNIST | None = None):
        from accelerate import Accelerator
        from accelerate.utils import TorchDynamoPlugin, set_seed

        from capsfast import tracking

        self.cfg = cfg.validate()
        use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        on_cuda = torch.cuda.is_available() and not use_cpu
        self.mixed_precision = resolve_mixed_precision(cfg, on_cuda)
        self.compile = resolve_compile(cfg, on_cuda)
        self.use_wandb = tracking.wandb_wanted(cfg.report_to)
        self.accelerator = acc = Accelerator(
            cpu=not on_cuda,
            mixed_precision=self.mixed_precision,
            log_with="wandb" if self.use_wandb else None,
            project_dir=cfg.output_dir,
            dynamo_plugin=TorchDynamoPlugin(
                backend="inductor" if self.compile else "no", mode=cfg.compile_mode
            ),
            step_scheduler_with_optimizer=False,  # the schedule is defined in global steps
        )
        self.device = acc.device
        self.world = acc.num_processes
        check_world_size(self.world)
        if self.device.type == "cpu":
            # `accelerate launch` sets OMP_NUM_THREADS=1 unless told: 1.5x slower on 2 cores.
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
            torch.set_num_threads(cfg.cpu_threads or max(1, (os.cpu_count() or 1) // local))
        self.out = Path(cfg.output_dir)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        set_seed(cfg.seed)

        # Data: everything on the device as uint8, for the whole run.
        with acc.main_process_first():
            mnist = data if data is not None else load_mnist(cfg.data_dir, download=cfg.download)
        mnist = mnist.to(self.device)
        (self.train_x, train_y), (self.val_x, self.val_y) = split_train_val(
            mnist, cfg.val_size, seed=cfg.seed
        )
        self.test_x, self.test_y = mnist.test_images, mnist.test_labels
        if cfg.test_size is not None:
            self.test_x, self.test_y = self.test_x[: cfg.test_size], self.test_y[: cfg.test_size]
        self.batches = TrainBatches(
            self.train_x,
            train_y,
            cfg.batch_size,
            cfg.seed,
            cfg.max_shift,
            rank=acc.process_index,
            world_size=self.world,
        )
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch

        # Model, optimiser, schedule, EMA, and the state a checkpoint holds.
        self.model_cfg = model_config_from(cfg)
        model = CapsNet(self.model_cfg).to(self.device)
        self.routing = choose_routing(cfg.routing, self.device, acc)
        model.set_routing(self.routing)
        optimizer = build_optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cfg.lr_factor(step, self.total_steps)
        )
        self.ema = None
        if cfg.ema_decay > 0:
            self.ema = EMA(model, cfg.ema_decay)
            acc.register_for_checkpointing(self.ema)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        raw = acc.unwrap_model(self.model)
        self.raw_model = getattr(raw, "_orig_mod", raw)  # the CapsNet under torch.compile too
        acc.register_for_checkpointing(self.scheduler)
        self.state = TrainState()
        acc.register_for_checkpointing(self.state)
        initial = GoodState()  # a failed half-load must not leak into a fresh start
        initial.take(0, **self._stateful())
        try:
            self.resumed_from = resume(
                acc,
                cfg.resume,
                self.out,
                self.model_cfg.to_dict(),
                on_fresh_start=lambda: initial.restore(**self._stateful()),
            )
        except CheckpointError as e:
            raise TrainingError(str(e)) from None
        if self.resumed_from is not None:
            acc.print(f"capsfast: resumed from {self.resumed_from} at step {self.state.step}")

        self.config_record = {
            **cfg.to_dict(),
            "model": self.model_cfg.to_dict(),
            "resolved": {
                "mixed_precision": self.mixed_precision,
                "compile": self.compile,
                "routing": self.routing,
                "world_size": self.world,
                "lr_scaled": cfg.scaled_lr(),
                "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps,
                "train_size": int(self.train_x.shape[0]),
            },
        }
        if self.use_wandb:
            self.use_wandb = tracking.init_tracking(
                acc, self.config_record, cfg.wandb_project, str(self.out), self.out.name
            )
        self.metrics_path = self.out / "metrics.jsonl"
        if acc.is_main_process:
            (self.out / "config.json").write_text(json.dumps(self.config_record, indent=2) + "\n")
            # Rewritten from the checkpoint's records, so a resumed run has no duplicate lines.
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.state.records))
        acc.print(
            f"capsfast: {self.world} process(es) on {self.device}, {self.mixed_precision}, "
            f"compile={self.compile}, routing={self.routing}, global batch {cfg.batch_size}, "
            f"lr {cfg.scaled_lr():.3g}, {self.total_steps} steps ({self.steps_per_epoch}/epoch)"
        )

    @property
    def eval_model(self):
        """What is validated, tested and exported: the EMA weights when EMA is on."""
        return self.ema.module if self.ema is not None else self.raw_model

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        from tqdm.auto import tqdm

        cfg, acc, dev = self.cfg, self.accelerator, self.device
        self.model.train()
        # Device-side accumulators: loss, margin, recon, correct, count since the last epoch end.
        self.stats = torch.tensor(self.state.epoch_stats, device=dev)  # restored on resume
        self.local_batch = torch.tensor(float(self.batches.local_batch), device=dev)
        self.last_loss = torch.zeros((), device=dev)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
        self.good = GoodState()
        self._take_good()
        start = self.state.step
        measure_from = 3 if self.total_steps - start >= 10 else 0  # skip compile and warm-up
        t0 = steps0 = None
        self.excluded = 0.0  # evaluation and checkpoint time inside the timed window
        order_epoch, bar = -1, None
        try:
            with StopRequest() as stop:
                while self.state.step < self.total_steps:
                    step = self.state.step
                    epoch, k = divmod(step, self.steps_per_epoch)
                    if t0 is None and step - start == measure_from:
                        t0, steps0 = self._sync_time(), step
                    if order_epoch != epoch:
                        order = epoch_permutation(self.train_x.shape[0], cfg.seed, epoch, dev)
                        order_epoch = epoch
                        if bar is not None:
                            bar.close()
                        steps_this_epoch = min(
                            self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch
                        )
                        bar = tqdm(
                            total=steps_this_epoch * cfg.batch_size,
                            initial=k * cfg.batch_size,
                            desc=f"epoch {epoch + 1}",
                            unit="img",
                            unit_scale=True,
                            leave=False,
                            disable=not acc.is_local_main_process,
                            dynamic_ncols=True,
                        )
                    self._step(epoch, k, order)
                    bar.update(cfg.batch_size)  # no host sync: the bar only counts images

                    step = self.state.step
                    end_of_epoch = step % self.steps_per_epoch == 0
                    checkpoint_due = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                    local_stop = stop.signal is not None
                    if (
                        step % cfg.log_every == 0
                        or step == self.total_steps
                        or end_of_epoch
                        or checkpoint_due
                        or (local_stop and self.world == 1)
                    ):
                        stop_now = self._sync_point(local_stop, bar)
                        if end_of_epoch:
                            t = time.time()
                            self._end_epoch(bar)
                            self.excluded += time.time() - t
                        if checkpoint_due or stop_now:
                            t = time.time()
                            path = self._save()
                            self.excluded += time.time() - t
                        if stop_now:
                            acc.print(
                                f"capsfast: stopped on request (signal {stop.signal or 'on another rank'}) at step {step}; checkpoint"
                                f" saved to {path}. Resume with the same command plus --resume auto."
                            )
                            acc.end_training()
                            return {"stopped": True, "step": step, "checkpoint": str(path)}
        finally:  # also on errors: the message must not land on the bar's line
            if bar is not None:
                bar.close()
        t_end = self._sync_time()
        ips = None
        if t0 is not None and self.state.step > steps0:
            seconds = t_end - t0 - self.excluded
            ips = (self.state.step - steps0) * cfg.batch_size / max(seconds, 1e-9)
        return self._finish(ips)

    def _step(self, epoch: int, k: int, order: torch.Tensor) -> None:
        cfg, acc = self.cfg, self.accelerator
        x, y = self.batches.batch(epoch, k, order)
        if self.compile and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # reduce-overhead: a new step's graphs
        with acc.autocast():
            out, loss, margin, recon = compute_loss(self.model, x, y, cfg.recon_weight)
        acc.backward(loss)
        finite = torch.isfinite(loss)
        if self.mixed_precision != "fp16":  # fp16: the GradScaler handles overflowing gradients
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        if cfg.skip_nonfinite:
            # Opt-in: decide on the host, every step (one sync a step), and count the skips.
            bad = (~finite).float()
            if (acc.reduce(bad, reduction="sum") if self.world > 1 else bad).item() > 0:
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.state.step += 1
                self.state.skipped_steps += 1
                return
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.raw_model)
        with torch.no_grad():
            self.nonfinite |= ~finite
            n = self.batches.local_batch
            correct = (out.lengths.argmax(1) == y).sum().float()
            self.stats += torch.stack(
                [
                    loss.detach() * n,
                    margin.detach() * n,
                    recon.detach() * n,
                    correct,
                    self.local_batch,  # a device constant: no host-to-device copy per step
                ]
            )
            self.last_loss = loss.detach().clone()  # CUDA graphs reuse their output buffers
        self.state.step += 1

    def _sync_point(self, local_stop: bool, bar) -> bool:
        """The host looks: non-finite check, stop request, loss and lr. Returns `stop now`."""
        acc, step = self.accelerator, self.state.step
        flags = torch.stack(
            [
                self.nonfinite.float(),
                torch.tensor(float(local_stop), device=self.device),
                self.last_loss.float() / self.world,
            ]
        )
        if self.world > 1:
            flags = acc.reduce(flags, reduction="sum")  # any rank's NaN or stop stops all
        nonfinite, stop, loss = flags.tolist()
        if nonfinite > 0:
            self._stop_nonfinite()
        lr = self.scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        acc.log(
            {"train/loss": loss, "train/lr": lr, "train/skipped_steps": self.state.skipped_steps},
            step=step,
        )
        self.final_loss = loss
        self._take_good()
        return stop > 0

    def _stateful(self) -> dict:
        """What a checkpoint holds besides RNG: model, optimiser, schedule, state, EMA."""
        extra = {"ema": self.ema} if self.ema is not None else {}
        return dict(model=self.raw_model, optimizer=self.optimizer, scheduler=self.scheduler,
                    state=self.state, **extra)  # fmt: skip

    def _take_good(self) -> None:
        self.state.epoch_stats = self.stats.tolist()  # the epoch's running sums go along
        self.good.take(self.state.step, **self._stateful())

    def _stop_nonfinite(self) -> None:
        """Save the last good state (restored from memory), then stop with the step range."""
        bad_from, bad_to = self.good.step + 1, self.state.step
        self.good.restore(**self._stateful())
        self.stats = torch.tensor(self.state.epoch_stats, device=self.device)
        path = self._save()
        self.accelerator.end_training()
        where = f"step {bad_to}" if bad_from == bad_to else f"steps {bad_from}-{bad_to}"
        raise TrainingError(
            f"non-finite loss at {where}; stopped. The last good state (step {self.good.step}) "
            f"is saved in {path}. Lower --lr, prefer --mixed-precision bf16 to fp16, or pass "
            "--skip-nonfinite to skip such steps; then add --resume auto."
        )

    def _end_epoch(self, bar) -> None:
        acc = self.accelerator
        rate = bar.format_dict.get("rate") or 0.0
        record = self._validate_and_export(self._train_stats(), images_per_second=rate)
        val = record["val_accuracy"]
        acc.print(
            f"epoch {record['epoch']:g} step {record['step']}: loss {record['train_loss']:.4f} "
            f"(margin {record['margin_loss']:.4f}, recon {record['recon_loss']:.4f}), train acc "
            f"{record['train_accuracy']:.4f}, val acc {'-' if val is None else f'{val:.4f}'}, "
            f"lr {record['lr']:.2e}, {record['epoch_seconds']:.1f} s, {rate:.0f} img/s"
        )
        if self.use_wandb:
            log_reconstructions(
                acc,
                self.eval_model,
                self.val_x if len(self.val_x) else self.test_x,
                self.state.step,
            )

    def _train_stats(self) -> dict:
        s = self.stats.clone()
        if self.world > 1:
            s = self.accelerator.reduce(s, reduction="sum")
        loss, margin, recon, correct, n = s.tolist()
        self.stats.zero_()
        if n == 0:
            return {
                "train_loss": None,
                "margin_loss": None,
                "recon_loss": None,
                "train_accuracy": None,
            }
        return {
            "train_loss": loss / n,
            "margin_loss": margin / n,
            "recon_loss": recon / n,
            "train_accuracy": correct / n,
        }

    def _validate_and_export(self, train_stats: dict, images_per_second=None) -> dict:
        """Validate; export to model/ when best so far (val_size 0: the latest is the best)."""
        acc, state = self.accelerator, self.state
        t = time.time()
        val = None
        if self.val_x.shape[0] > 0:
            val, _ = evaluate(
                self.eval_model, self.val_x, self.val_y, acc, self.cfg.eval_batch_size
            )
        if val is None or val > state.best_val_accuracy:
            state.best_val_accuracy = -1.0 if val is None else val
            state.best_step = state.step
            if acc.is_main_process:
                meta = {
                    "step": state.step,
                    "val_accuracy": val,
                    "preset": self.cfg.preset,
                    "seed": self.cfg.seed,
                    "commit": git_commit(),
                }
                save_model(self.eval_model, self.out / "model", meta=meta)
        acc.wait_for_everyone()
        previous = state.records[-1]["time"] if state.records else PROCESS_START
        now = time.time()
        record = {
            "epoch": round(state.step / self.steps_per_epoch, 4),
            "step": state.step,
            **train_stats,
            "val_accuracy": val,
            "lr": self.scheduler.get_last_lr()[0],
            "epoch_seconds": now - previous,
            "eval_seconds": now - t,
            "images_per_second": images_per_second,
            "time": now,
        }
        state.records.append(record)
        if acc.is_main_process:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if val is not None:
            acc.log({"val/accuracy": val, "epoch": record["epoch"]}, step=state.step)
        return record

    def _save(self) -> Path:
        self.state.epoch_stats = self.stats.tolist()
        return save_checkpoint(
            self.accelerator,
            self.out,
            self.state.step,
            self.model_cfg.to_dict(),
            self.cfg.keep_checkpoints,
        )

    def _sync_time(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.time()

    # ------------------------------------------------------------------ the end
    def _finish(self, images_per_second: float | None) -> dict:
        """Last validation (also after --max-steps mid-epoch), final checkpoint, test evaluation
        of the exported model, summary.json, figures."""
        from capsfast import tracking

        cfg, acc, state = self.cfg, self.accelerator, self.state
        if not state.records or state.records[-1]["step"] != state.step:
            self._validate_and_export(self._train_stats())
        from accelerate.utils import broadcast_object_list

        newest = [list_checkpoints(self.out)[:1] if acc.is_main_process else None]
        if self.world > 1:  # the main process decides, so every rank joins the same collectives
            broadcast_object_list(newest)
        if not newest[0] or newest[0][0].name != f"step-{state.step:08d}":
            self._save()
        exported = load_model(self.out / "model", device=self.device, routing=self.routing)
        test_acc, test_n = evaluate(exported, self.test_x, self.test_y, acc, cfg.eval_batch_size)
        wall = time.time() - PROCESS_START
        cuda = self.device.type == "cuda"
        summary = {
            "test_accuracy": test_acc,
            "test_size": test_n,
            "best_val_accuracy": state.best_val_accuracy if state.best_val_accuracy >= 0 else None,
            "final_train_loss": getattr(self, "final_loss", None),
            "steps": state.step,
            "epochs": state.step * cfg.batch_size / self.train_x.shape[0],
            "world_size": self.world,
            "wall_seconds": wall,
            "images_per_second": images_per_second,
            "device": torch.cuda.get_device_name(self.device) if cuda else "cpu",
            "mixed_precision": self.mixed_precision,
            "routing": self.routing,
            "preset": cfg.preset,
            "seed": cfg.seed,
            "config": self.config_record,
            "commit": git_commit(),
            "torch": torch.__version__,
            "triton": package_version("triton"),
            "peak_memory_gb": torch.cuda.max_memory_allocated(self.device) / 1e9 if cuda else None,
            "skipped_steps": state.skipped_steps,
        }
        if acc.is_main_process:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            from capsfast.figures import plot_curves, save_figures

            plot_curves(state.records, self.out / "curves.png")
            figures = save_figures(
                exported, self.test_x[:1000], self.test_y[:1000], self.out / "figures"
            )
            if self.use_wandb:
                images = {f"figures/{k}": str(v) for k, v in figures.items()}
                images["figures/curves"] = str(self.out / "curves.png")
                tracking.log_images(acc, images, state.step)
            acc.print(
                f"capsfast: test accuracy {test_acc:.4f} on {test_n} images (best val "
                f"{summary['best_val_accuracy']}), {wall:.1f} s, {images_per_second or 0:.1f} "
                f"img/s; model in {self.out / 'model'}"
            )
        if self.use_wandb:
            acc.log({"test/accuracy": test_acc}, step=state.step)
            tracking.set_summary(acc, summary)
        acc.end_training()
        return summary


def log_reconstructions(accelerator, model, images, step: int, n: int = 16) -> None:
    """W&B image: n digits on top, their reconstructions (predicted capsule) below."""
    if not accelerator.is_main_process:
        return
    from torchvision.utils import make_grid

    from capsfast import tracking

    with torch.no_grad(), accelerator.autocast():
        x = to_float(images[:n])
        rec = model(x).reconstructions.float()
    grid = make_grid(torch.cat([x, rec]).cpu(), nrow=n, padding=2)
    tracking.log_images(accelerator, {"reconstructions": grid.permute(1, 2, 0).numpy()}, step)


def train(cfg: TrainConfig, data: MNIST | None = None) -> dict:
    """Train as `cfg` says; returns the summary (also written to summary.json), or
    {"stopped": True, ...} when a signal stopped the run after saving a checkpoint."""
    return Trainer(cfg, data).run()


def main(argv: list[str] | None = None) -> int:
    from capsfast.config import parse_args
    from capsfast.data import DataError

    cfg = parse_args(argv)
    try:
        summary = train(cfg)
    except (TrainingError, DataError) as e:
        print(f"capsfast: error: {e}", file=sys.stderr)
        return 2
    return 3 if summary.get("stopped") else 0
