"""Evaluation throughput on the test set, images/s, through the trainer's own `evaluate` (batch
500, Accelerate's autocast). The trainer evaluates the uncompiled model; the compiled variant
shows what compiling evaluation would gain. On CPU a fixed slice of the test set.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import (
    FLOP_FWD,
    ON_CUDA,
    autocast,
    compile_fn,
    describe,
    finish,
    new_model,
    timed,
    variant_setup,
)
from capsfast.data import to_float
from capsfast.train import evaluate

BASELINE = "eager-fp32-torch"
VARIANTS = (
    BASELINE,
    "eager-bf16-torch",
    "eager-bf16-triton",
    "eager-bf16-fused",
    "compiled-bf16-triton",
)
BATCHES = (500,) if ON_CUDA else (32,)
CPU_IMAGES = 128
TINY = {"batch": 2, "images": 4}
ROUNDS = {"rounds": 5, "warmup_rounds": 1}
TOL = {"fp32": 2e-5, "bf16": 5e-2}  # capsules against eager fp32, relative to their max


def accelerator_for(dtype: str):
    """A fresh Accelerator: its state is a process-wide singleton fixed at first creation, and the
    variants here need different mixed precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=not ON_CUDA, mixed_precision="bf16" if dtype == "bf16" else "no")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_evaluate(benchmark, mnist, variant, batch):
    compiled, dtype, routing = variant_setup(benchmark, variant, batch, BATCHES)
    B = TINY["batch"] if benchmark.disabled else batch
    n = TINY["images"] if benchmark.disabled else (None if ON_CUDA else CPU_IMAGES)
    images, labels = mnist.test_images[:n], mnist.test_labels[:n]

    model = new_model("torch").eval()
    with torch.no_grad():
        want = model(to_float(images[:B])).poses
    model.set_routing(routing)
    net = compile_fn(model, benchmark) if compiled else model
    accelerator = accelerator_for(dtype)

    describe(
        benchmark,
        group=f"evaluate B={batch}",
        subject="evaluate",
        impl=f"{'compiled' if compiled else 'eager'}/{routing}",
        dtype=dtype,
        batch=B,
        baseline=variant == BASELINE,
        images=len(images),
    )
    accuracy, count = timed(
        benchmark, lambda: evaluate(net, images, labels, accelerator, B), **ROUNDS
    )
    finish(benchmark, images=len(images), flops=FLOP_FWD * len(images))

    assert count == len(images) and 0 <= accuracy <= 1
    with torch.no_grad(), autocast(dtype):
        got = net(to_float(images[:B])).poses.float()
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)
