"""The trainer's step against the benchmark's step, in one run on one machine.

bench/test_train_step.py times the bare optimiser step; the trainer wraps the same step in its
loop (learning-rate schedule, on-device augmentation, finiteness checks, the metrics window,
progress bar, Accelerate's autocast and backward). The same step must cost the same inside the
trainer: this benchmark times the bare step on a fixed batch, then runs `run_training` in this
process (same threads, same batch, eager fp32, the torch routing) and reads the trainer's own
steady-state images/s from summary.json (the figure it prints and logs), then times the bare
step again. The baseline is the median of the bare rounds on both sides of the trainer run, so a
machine that speeds up or slows down during the test is seen on both sides of the trainer (the
bare step's median moved between 70 and 78 img/s from one process to the next in five runs on
a shared 2-core machine: bench/results/cpu/trainer_2026-12-05_3941b29/). extra_info
records both sides and `trainer_over_step`; timed, it must be at least MIN_RATIO.
"""

from __future__ import annotations

import json
import statistics
import time

import pytest
import torch

from bench.common import (
    DEVICE,
    FLOP_TRAIN,
    ON_CUDA,
    W_INIT_TRAIN,
    describe,
    finish,
    new_model,
    sync,
    timed,
    tiny,
    train_step,
)
from capsfast.config import resolve
from capsfast.data import to_float
from capsfast.train import run_training

BATCH = 512 if ON_CUDA else 128  # the paper's batch on CPU
ROUNDS = {"rounds": 10, "warmup_rounds": 2}
ROUNDS_AFTER = 5  # bare rounds after the trainer run, pooled with the 10 before
TRAINER_STEPS = 13  # 3 warm-up steps (the trainer's Clock) + 10 timed, as many as the bare step
MIN_RATIO = 0.9  # the trainer's loop may cost at most a tenth of the step


def trainer_config(batch: int, steps: int, out) -> dict:
    return dict(preset="paper", batch_size=batch, max_steps=steps, log_every=3, val_size=batch,
                test_size=batch, eval_batch_size=batch, checkpoint_every=0, routing="torch",
                mixed_precision="no", compile=False, report_to="none", output_dir=str(out),
                ema_decay=0.0, figures=False)  # fmt: skip


def test_trainer_step_matches_the_benchmark_step(benchmark, mnist, matmul_rate, tmp_path):
    B = 2 if tiny(benchmark) else BATCH
    threads = torch.get_num_threads()
    x, y = to_float(mnist.train_images[:B]), mnist.train_labels[:B]
    model = new_model("torch", W_INIT_TRAIN)
    step = train_step(model, model, "fp32")
    describe(benchmark, group=f"trainer B={B}", subject="trainer_step", impl="eager/torch",
             dtype="fp32", batch=B, baseline=True)  # fmt: skip
    timed(benchmark, lambda: step(x, y), **ROUNDS)
    finish(benchmark, images=B, flops=FLOP_TRAIN * B, matmul_rate=matmul_rate)

    cfg = resolve(trainer_config(B, 6 if tiny(benchmark) else TRAINER_STEPS, tmp_path / "run"))
    result = run_training(cfg, mnist)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == cfg.max_steps and result["test_accuracy"] == summary["test_accuracy"]
    assert summary["device"] == ("cpu" if DEVICE.type == "cpu" else torch.cuda.get_device_name())
    trainer_rate = summary["images_per_second"]
    assert trainer_rate is not None and trainer_rate > 0, summary
    info = benchmark.extra_info
    info["trainer_images_per_second"] = trainer_rate
    info["trainer_threads"] = summary["cpu_threads"]
    if benchmark.disabled:
        return
    before = list(benchmark.stats.stats.data)
    torch.set_num_threads(threads)  # the trainer set its own
    step(x, y)  # a warm-up round: the trainer's run has just used the allocator and caches
    sync()
    after = []
    for _ in range(ROUNDS_AFTER):
        t = time.perf_counter()
        step(x, y)
        sync()
        after.append(time.perf_counter() - t)
    info["step_images_per_second_before"] = B / statistics.median(before)
    info["step_images_per_second_after"] = B / statistics.median(after)
    step_rate = B / statistics.median(before + after)
    info["step_images_per_second_pooled"] = step_rate
    info["trainer_over_step"] = trainer_rate / step_rate
    info["trainer_matmul_fraction"] = (
        info["matmul_fraction"] * trainer_rate / info["images_per_second"]
    )
    if not tiny(benchmark):
        assert info["trainer_over_step"] >= MIN_RATIO, (
            f"the trainer runs {trainer_rate:.1f} img/s, the bare step {step_rate:.1f} "
            f"({info['step_images_per_second_before']:.1f} before the trainer, "
            f"{info['step_images_per_second_after']:.1f} after): "
            f"{info['trainer_over_step']:.2f}x"
        )


@pytest.fixture(autouse=True)
def _threads():
    """The trainer sets the thread count from its config (all cores of one process): restore
    this session's, so the rows after this one time what they did before."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
