"""The training function: Accelerate end to end, MNIST on the device, checkpoints, summary.json.

One optimiser step:
    x, y = batches.batch(epoch, k)            # device-side shuffle + per-sample shift (data.py)
    out  = model(x, y)                        # CapsNet; decoder sees the true label's capsule
    loss = margin(out.lengths, y) + 0.0005 * recon(out.reconstructions, x)
    accelerator.backward(loss); optimizer.step(); scheduler.step()

The host meets the device only every `log_every` steps (loss, learning rate, progress, the
non-finite check, the stop request), at epoch ends (validation) and at checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from capsfast.config import TrainConfig, preset_mixed_precision
from capsfast.data import (
    MNIST,
    TrainBatches,
    epoch_permutation,
    load_mnist,
    split_train_val,
    to_float,
)
from capsfast.export import save_model
from capsfast.model import CapsNet, ModelConfig, margin_loss, reconstruction_loss

PROCESS_START = time.time()
CHECKPOINT_MARKER = "capsfast_checkpoint.json"


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""


# --------------------------------------------------------------------------- run set-up
def resolve_mixed_precision(cfg: TrainConfig, on_cuda: bool) -> str:
    """Flag > launcher/config (`no` from `accelerate launch` means "not set") > preset on CUDA > fp32."""
    if cfg.mixed_precision is not None:
        return cfg.mixed_precision
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher != "no":
        return launcher
    return preset_mixed_precision(cfg.preset) if on_cuda else "no"


def resolve_compile(cfg: TrainConfig, on_cuda: bool) -> bool:
    if cfg.compile is not None:
        return cfg.compile
    launcher = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if launcher not in ("no", ""):
        return True
    return on_cuda


def git_commit() -> str:
    env = os.environ.get("CAPSFAST_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def triton_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        return None


def choose_routing(requested: str, device: torch.device, model: CapsNet, accelerator) -> str:
    """`auto`: triton on CUDA if its kernels compile here, else the reference with one warning."""
    from capsfast.routing import resolve_impl

    impl = resolve_impl(requested, device)
    if requested != "auto" or impl == "torch":
        return impl
    try:  # compile and run the kernel once on a tiny problem; fall back if it fails
        with torch.no_grad():
            model.set_routing(impl)
            model.encode(torch.zeros(1, 1, 28, 28, device=device))
        return impl
    except Exception as e:
        accelerator.print(
            f"capsfast: warning: --routing auto could not run the {impl} kernel on {device} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); using the torch "
            "reference. Pass --routing triton to see the full error."
        )
        return "torch"


# --------------------------------------------------------------------------- the step
def compute_loss(model, x: torch.Tensor, y: torch.Tensor, recon_weight: float = 0.0005):
    """Forward and both losses (SPEC.md): returns (output, total, margin, reconstruction)."""
    out = model(x, y)  # training: the decoder sees the true label's capsule
    margin = margin_loss(out.lengths, y)
    recon = reconstruction_loss(out.reconstructions, x, recon_weight)
    return out, margin + recon, margin, recon


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor, accelerator, batch_size: int):
    """Accuracy over all `images`, each counted exactly once across ranks.

    Rank r evaluates a contiguous shard; correct and total counts are summed over ranks (on-device
    batching has no padded duplicates for gather_for_metrics to drop, so counts are reduced).
    """
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


# --------------------------------------------------------------------------- state
class TrainState:
    """Everything besides model/optimizer/scheduler that a resumed run needs to continue exactly."""

    def __init__(self):
        self.step = 0  # optimiser steps completed
        self.best_val_accuracy = -1.0
        self.best_step = -1
        self.skipped_steps = 0
        self.records: list[dict] = []  # per-epoch metrics

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, d: dict) -> None:
        vars(self).update(d)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first. A checkpoint is complete once its marker exists:
    it is written into a temporary directory and renamed into place as the very last act."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / CHECKPOINT_MARKER).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def save_checkpoint(accelerator, state: TrainState, cfg: TrainConfig, model_cfg: ModelConfig):
    out = Path(cfg.output_dir) / "checkpoints"
    final = out / f"step-{state.step:08d}"
    tmp = out / f".tmp-step-{state.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker = {
            "step": state.step,
            "model": model_cfg.to_dict(),
            "batch_size": cfg.batch_size,
            "world_size": accelerator.num_processes,
            "time": time.time(),
        }
        (tmp / CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic: a crash before this leaves only a .tmp- directory
        for old in list_checkpoints(Path(cfg.output_dir))[cfg.keep_checkpoints :]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, model_cfg: ModelConfig) -> None:
    marker_path = path / CHECKPOINT_MARKER
    if not marker_path.is_file():
        raise TrainingError(
            f"{path} is not a complete capsfast checkpoint (no {CHECKPOINT_MARKER})"
        )
    marker = json.loads(marker_path.read_text())
    if marker.get("model") != model_cfg.to_dict():
        diff = {
            k: (v, model_cfg.to_dict().get(k))
            for k, v in marker.get("model", {}).items()
            if model_cfg.to_dict().get(k) != v
        }
        raise TrainingError(
            f"checkpoint {path} was trained with a different model config {diff} "
            "(checkpoint, now): pass the same model flags (e.g. --routing-iters) or a new --output-dir"
        )
    accelerator.load_state(str(path))


def find_resume(accelerator, cfg: TrainConfig, model_cfg: ModelConfig) -> Path | None:
    """Pick the checkpoint `--resume` names; with `auto` the newest that loads, skipping corrupt ones."""
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        if not path.is_dir():
            raise TrainingError(f"--resume {path}: no such checkpoint directory")
        load_checkpoint(accelerator, path, model_cfg)
        return path
    candidates = list_checkpoints(Path(cfg.output_dir))
    for path in candidates:
        try:
            load_checkpoint(accelerator, path, model_cfg)
            return path
        except TrainingError:
            raise
        except Exception as e:
            accelerator.print(
                f"capsfast: warning: skipping unreadable checkpoint {path} ({type(e).__name__}: {e})"
            )
    accelerator.print(
        f"capsfast: --resume auto: no complete checkpoint in {cfg.output_dir}/checkpoints; "
        "starting fresh"
    )
    return None


# --------------------------------------------------------------------------- stop requests
class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test harnesses)
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- the run
def build_optimizer(model: CapsNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    decoder = list(model.decoder.parameters())
    decoder_ids = {id(p) for p in decoder}
    encoder = [p for p in model.parameters() if id(p) not in decoder_ids]
    groups = [
        {"params": encoder, "lr": cfg.scaled_lr(), "weight_decay": cfg.weight_decay},
        {"params": decoder, "lr": cfg.scaled_lr(cfg.decoder_lr), "weight_decay": 0.0},
    ]
    fused = next(model.parameters()).is_cuda
    return torch.optim.Adam(groups, fused=fused) if fused else torch.optim.Adam(groups)


def model_config_from(cfg: TrainConfig) -> ModelConfig:
    return ModelConfig(routing_iters=cfg.routing_iters, detach_inner=cfg.detach_inner)


def train(cfg: TrainConfig, data: MNIST | None = None) -> dict:
    """Run training as `cfg` says; returns the summary (also written to summary.json)."""
    from accelerate import Accelerator
    from accelerate.utils import TorchDynamoPlugin, set_seed
    from tqdm.auto import tqdm

    from capsfast import tracking

    cfg.validate()
    on_cuda = torch.cuda.is_available() and os.environ.get(
        "ACCELERATE_USE_CPU", ""
    ).lower() not in (
        "1",
        "true",
    )
    mixed_precision = resolve_mixed_precision(cfg, on_cuda)
    compile_model = resolve_compile(cfg, on_cuda)
    use_wandb = tracking.wandb_wanted(cfg.report_to)
    accelerator = Accelerator(
        cpu=not on_cuda,
        mixed_precision=mixed_precision,
        log_with="wandb" if use_wandb else None,
        project_dir=cfg.output_dir,
        dynamo_plugin=TorchDynamoPlugin(
            backend="inductor" if compile_model else "no", mode=cfg.compile_mode
        ),
        step_scheduler_with_optimizer=False,  # the schedule is defined in global steps
    )
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    expected = int(os.environ.get("CAPSFAST_EXPECT_PROCESSES", "0") or 0)
    if expected and expected != world:
        raise TrainingError(
            f"asked for {expected} processes but this run has world size {world}: each process "
            "would train a full copy. Launch with `accelerate launch --multi_gpu --num_processes "
            f"{expected} ...` (on CPU add ACCELERATE_USE_CPU=1)"
        )
    if device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        threads = cfg.cpu_threads or max(1, (os.cpu_count() or 1) // max(1, local))
        torch.set_num_threads(threads)

    out_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)

    # ---- data: everything on the device, uint8
    with accelerator.main_process_first():
        mnist = data if data is not None else load_mnist(cfg.data_dir, download=cfg.download)
    mnist = mnist.to(device)
    (train_x, train_y), (val_x, val_y) = split_train_val(mnist, cfg.val_size, seed=cfg.seed)
    test_x, test_y = mnist.test_images, mnist.test_labels
    if cfg.test_size is not None:
        test_x, test_y = test_x[: cfg.test_size], test_y[: cfg.test_size]
    batches = TrainBatches(
        train_x, train_y, cfg.batch_size, cfg.seed, cfg.max_shift, rank=rank, world_size=world
    )
    steps_per_epoch = batches.steps_per_epoch
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch

    # ---- model, optimiser, schedule
    model_cfg = model_config_from(cfg)
    model = CapsNet(model_cfg).to(device)
    routing = choose_routing(cfg.routing, device, model, accelerator)
    model.set_routing(routing)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cfg.lr_factor(step, total_steps)
    )
    ema = None
    if cfg.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True
        )
        accelerator.register_for_checkpointing(ema)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    resumed_from = find_resume(accelerator, cfg, model_cfg)
    if resumed_from is not None:
        accelerator.print(f"capsfast: resumed from {resumed_from} at step {state.step}")

    raw_model = accelerator.unwrap_model(model)
    eval_model = lambda: ema.module if ema is not None else raw_model  # noqa: E731

    config_record = {
        **cfg.to_dict(),
        "model": model_cfg.to_dict(),
        "resolved": {
            "mixed_precision": mixed_precision,
            "compile": compile_model,
            "routing": routing,
            "world_size": world,
            "lr_scaled": cfg.scaled_lr(),
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "train_size": int(train_x.shape[0]),
        },
    }
    if use_wandb:
        use_wandb = tracking.init_tracking(
            accelerator, config_record, cfg.wandb_project, str(out_dir), Path(cfg.output_dir).name
        )
    if accelerator.is_main_process:
        (out_dir / "config.json").write_text(json.dumps(config_record, indent=2) + "\n")
    accelerator.print(
        f"capsfast: {world} process(es) on {device}, {mixed_precision}, compile={compile_model}, "
        f"routing={routing}, batch {cfg.batch_size} (global), lr {cfg.scaled_lr():.3g}, "
        f"{total_steps} steps ({steps_per_epoch}/epoch)"
    )

    metrics_path = out_dir / "metrics.jsonl"
    if accelerator.is_main_process:  # rewrite from the state so a resumed run has no duplicates
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in state.records))

    def validate_and_export(epoch_value: float, train_stats: dict) -> dict:
        """Validate, record the epoch, export the model if it is the best so far."""
        t_eval = time.time()
        val_acc = None
        if val_x.shape[0] > 0:
            val_acc, _ = evaluate(eval_model(), val_x, val_y, accelerator, cfg.eval_batch_size)
        is_best = val_acc is None or val_acc > state.best_val_accuracy
        if is_best:
            state.best_val_accuracy = val_acc if val_acc is not None else -1.0
            state.best_step = state.step
            if accelerator.is_main_process:
                save_model(
                    eval_model(),
                    out_dir / "model",
                    meta={
                        "step": state.step,
                        "val_accuracy": val_acc,
                        "preset": cfg.preset,
                        "seed": cfg.seed,
                        "commit": git_commit(),
                    },
                )
        accelerator.wait_for_everyone()
        record = {
            "epoch": round(epoch_value, 4),
            "step": state.step,
            **train_stats,
            "val_accuracy": val_acc,
            "lr": scheduler.get_last_lr()[0],
            "eval_seconds": round(time.time() - t_eval, 3),
        }
        state.records.append(record)
        if accelerator.is_main_process:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if val_acc is not None:
            accelerator.log({"val/accuracy": val_acc, "epoch": epoch_value}, step=state.step)
        return record

    # ---- the loop
    model.train()
    stats = torch.zeros(
        5, device=device
    )  # loss, margin, recon, correct, count since last epoch end
    last_loss = torch.zeros((), device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    window_start = state.step
    timing = {"t0": None, "steps0": None, "excluded": 0.0}
    start_step = state.step
    measure_from = 3 if total_steps - start_step >= 10 else 0  # skip compile/warm-up steps
    order, order_epoch = None, -1
    bar = None
    last_validated_step = state.step if state.records else -1

    def sync_time():
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.time()

    with StopRequest() as stop:
        while state.step < total_steps:
            step = state.step
            epoch, k = divmod(step, steps_per_epoch)
            if timing["t0"] is None and step - start_step == measure_from:
                timing["t0"], timing["steps0"] = sync_time(), step
            if order_epoch != epoch:
                order, order_epoch = (
                    epoch_permutation(train_x.shape[0], cfg.seed, epoch, device),
                    epoch,
                )
                if bar is not None:
                    bar.close()
                bar = tqdm(
                    total=min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
                    * cfg.batch_size,
                    initial=k * cfg.batch_size,
                    desc=f"epoch {epoch + 1}",
                    unit="img",
                    unit_scale=True,
                    disable=not accelerator.is_local_main_process,
                    dynamic_ncols=True,
                    leave=False,
                )
            x, y = batches.batch(epoch, k, order)
            with accelerator.autocast():
                out, loss, margin, recon = compute_loss(model, x, y, cfg.recon_weight)
            accelerator.backward(loss)
            step_ok = torch.isfinite(loss)
            if cfg.skip_nonfinite:
                # Decide on the host for this step only when asked to skip: a sync per step.
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                step_ok = step_ok & torch.isfinite(torch.nn.utils.get_total_norm(grads))
                if not bool(step_ok):
                    state.skipped_steps += 1
                    optimizer.zero_grad(set_to_none=True)
                    state.step += 1
                    scheduler.step()
                    continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(raw_model)
            nonfinite |= ~step_ok
            with torch.no_grad():
                stats += torch.stack(
                    [
                        loss.detach() * x.shape[0],
                        margin.detach() * x.shape[0],
                        recon.detach() * x.shape[0],
                        (out.lengths.argmax(1) == y).sum().to(stats.dtype),
                        torch.tensor(float(x.shape[0]), device=device),
                    ]
                )
                last_loss = loss.detach()
            state.step += 1
            bar.update(cfg.batch_size)

            sync_point = state.step % cfg.log_every == 0 or state.step == total_steps
            stop_now = False
            if sync_point:
                flags = torch.stack(
                    [nonfinite.float(), torch.tensor(float(stop.signal is not None), device=device)]
                )
                flags = accelerator.reduce(flags, reduction="max") if world > 1 else flags
                if flags[0].item() > 0:
                    good = list_checkpoints(out_dir)
                    accelerator.end_training()
                    raise TrainingError(
                        f"non-finite loss between steps {window_start + 1} and {state.step}: "
                        "training stopped. "
                        + (
                            f"The last good state is {good[0]}; "
                            if good
                            else "No checkpoint was saved yet; "
                        )
                        + "lower --lr, use --mixed-precision bf16 instead of fp16, or pass "
                        "--skip-nonfinite to skip such steps."
                    )
                stop_now = flags[1].item() > 0
                window_start = state.step
                loss_value = last_loss.item()
                lr_value = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_value:.2e}", refresh=False)
                accelerator.log({"train/loss": loss_value, "train/lr": lr_value}, step=state.step)
            elif world == 1 and stop.signal is not None:
                stop_now = True

            end_of_epoch = state.step % steps_per_epoch == 0
            if end_of_epoch:
                t_ex = sync_time()
                s = accelerator.reduce(stats, reduction="sum") if world > 1 else stats
                s = s.tolist()
                n = max(1.0, s[4])
                train_stats = {
                    "train_loss": s[0] / n,
                    "margin_loss": s[1] / n,
                    "recon_loss": s[2] / n,
                    "train_accuracy": s[3] / n,
                    "epoch_seconds": None,
                }
                stats.zero_()
                record = validate_and_export(state.step / steps_per_epoch, train_stats)
                last_validated_step = state.step
                accelerator.print(
                    f"epoch {record['epoch']:g} step {state.step}: loss {record['train_loss']:.4f} "
                    f"(margin {record['margin_loss']:.4f}, recon {record['recon_loss']:.4f}) "
                    f"train acc {record['train_accuracy']:.4f} val acc "
                    f"{record['val_accuracy'] if record['val_accuracy'] is None else round(record['val_accuracy'], 4)} "
                    f"lr {record['lr']:.2e} {bar.format_dict['rate'] or 0:.0f} img/s"
                )
                if use_wandb:
                    log_reconstructions(
                        accelerator, eval_model(), val_x if val_x.shape[0] else test_x, state.step
                    )
                timing["excluded"] += time.time() - t_ex
            if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or stop_now:
                t_ex = time.time()
                path = save_checkpoint(accelerator, state, cfg, model_cfg)
                timing["excluded"] += time.time() - t_ex
                if stop_now:
                    if bar is not None:
                        bar.close()
                    accelerator.print(
                        f"capsfast: stopped by signal {stop.signal} at step {state.step}; checkpoint "
                        f"saved to {path}. Resume with the same command plus --resume auto."
                    )
                    accelerator.end_training()
                    return {"stopped": True, "step": state.step, "checkpoint": str(path)}
    if bar is not None:
        bar.close()
    t_end = sync_time()

    # ---- end of run: last validation, final checkpoint, test evaluation of the exported model
    if last_validated_step != state.step:
        s = accelerator.reduce(stats, reduction="sum") if world > 1 else stats
        s = s.tolist()
        n = max(1.0, s[4])
        validate_and_export(
            state.step / steps_per_epoch,
            {
                "train_loss": s[0] / n,
                "margin_loss": s[1] / n,
                "recon_loss": s[2] / n,
                "train_accuracy": s[3] / n if s[4] else None,
                "epoch_seconds": None,
            },
        )
    if cfg.checkpoint_every == 0 or state.step % cfg.checkpoint_every:
        save_checkpoint(accelerator, state, cfg, model_cfg)
    accelerator.wait_for_everyone()
    from capsfast.export import load_model

    exported = load_model(out_dir / "model", device=device, routing=routing)
    test_acc, test_n = evaluate(exported, test_x, test_y, accelerator, cfg.eval_batch_size)
    wall = time.time() - PROCESS_START

    if timing["t0"] is not None and state.step > timing["steps0"]:
        secs = t_end - timing["t0"] - timing["excluded"]
        ips = (state.step - timing["steps0"]) * cfg.batch_size / max(secs, 1e-9)
    else:
        ips = None
    summary = {
        "test_accuracy": test_acc,
        "test_size": test_n,
        "best_val_accuracy": state.best_val_accuracy if state.best_val_accuracy >= 0 else None,
        "final_train_loss": float(last_loss.item()),
        "steps": state.step,
        "epochs": state.step * cfg.batch_size / train_x.shape[0],
        "world_size": world,
        "wall_seconds": wall,
        "images_per_second": ips,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "mixed_precision": mixed_precision,
        "routing": routing,
        "preset": cfg.preset,
        "seed": cfg.seed,
        "config": config_record,
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9
        if device.type == "cuda"
        else None,
        "skipped_steps": state.skipped_steps,
    }
    if accelerator.is_main_process:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        try:
            from capsfast.figures import plot_curves, save_figures

            plot_curves(state.records, out_dir / "curves.png")
            paths = save_figures(exported, test_x[:1000], test_y[:1000], out_dir / "figures")
            paths = {"curves": out_dir / "curves.png", **paths}
            if use_wandb:
                tracking.log_images(
                    accelerator, {f"figures/{k}": str(v) for k, v in paths.items()}, state.step
                )
        except ImportError:
            pass
        accelerator.print(
            f"capsfast: test accuracy {test_acc:.4f} on {test_n} images (best val "
            f"{summary['best_val_accuracy']}), {wall:.1f} s, {ips or 0:.1f} img/s; "
            f"model in {out_dir / 'model'}"
        )
    if use_wandb:
        accelerator.log({"test/accuracy": test_acc}, step=state.step)
        tracking.set_summary(accelerator, summary)
    accelerator.end_training()
    return summary


def log_reconstructions(accelerator, model, images, step: int, n: int = 16) -> None:
    """A grid: n digits on top, their reconstructions (decoder on the predicted capsule) below."""
    if not accelerator.is_main_process:
        return
    from torchvision.utils import make_grid

    with torch.no_grad(), accelerator.autocast():
        x = to_float(images[:n])
        rec = model(x).reconstructions.float()
    grid = make_grid(torch.cat([x, rec]).cpu(), nrow=n, padding=2)
    tracking_images = {"reconstructions": grid.permute(1, 2, 0).numpy()}
    from capsfast import tracking

    tracking.log_images(accelerator, tracking_images, step)


def main(argv: list[str] | None = None) -> int:
    from capsfast.config import parse_args
    from capsfast.data import DataError

    cfg = parse_args(argv)
    try:
        summary = train(cfg)
    except (TrainingError, DataError) as e:
        print(f"capsfast: error: {e}", file=sys.stderr)
        return 2
    return 0 if summary else 1
