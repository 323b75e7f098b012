"""Evaluation throughput on the test set, images/s, through the trainer's own `evaluate` (batch
500, Accelerate's autocast). The trainer evaluates the uncompiled model; the compiled variant
shows what compiling evaluation would gain. On CPU a fixed slice of the test set.

The model is untrained, so its accuracy is made known instead: every other image is labelled
with the eager fp32 model's own prediction and the rest with another class, so `evaluate` must
return exactly one half (bf16 may differ on images whose two longest capsules are within its
rounding of each other), and exactly the count its own path's predictions give.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import (
    FLOP_FWD,
    ON_CUDA,
    W_INIT_EVAL,
    autocast,
    compile_fn,
    describe,
    evaluate,
    finish,
    new_model,
    timed,
    tiny,
    variant_setup,
)
from capsfast.data import to_float

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


def capsules_of(net, images: torch.Tensor, batch: int, dtype: str):
    """(poses, lengths) of every image, in evaluate's batches, as fp32."""
    with torch.no_grad(), autocast(dtype):
        outs = [net(to_float(images[k : k + batch])) for k in range(0, len(images), batch)]
    return tuple(torch.cat([getattr(o, f) for o in outs]).float() for f in ("poses", "lengths"))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_evaluate(benchmark, mnist, matmul_rate, variant, batch):
    compiled, dtype, routing = variant_setup(benchmark, variant, batch, BATCHES)
    B = TINY["batch"] if tiny(benchmark) else batch
    n = TINY["images"] if tiny(benchmark) else (None if ON_CUDA else CPU_IMAGES)
    images = mnist.test_images[:n]

    model = new_model("torch", W_INIT_EVAL).eval()
    want, reference = capsules_of(model, images, B, "fp32")
    # Known accuracy: even images labelled as predicted, odd ones as the next class.
    predicted = reference.argmax(1)
    odd = torch.arange(len(images), device=predicted.device) % 2 == 1
    labels = torch.where(odd, (predicted + 1) % 10, predicted)
    known = (~odd).sum().item() / len(images)
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
    finish(benchmark, images=len(images), flops=FLOP_FWD * len(images), matmul_rate=matmul_rate)

    assert count == len(images)
    got, lengths = capsules_of(net, images, B, dtype)
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)
    # evaluate counts exactly the images whose prediction on this path matches the label ...
    assert accuracy == (lengths.argmax(1) == labels).sum().item() / len(images)
    # ... and that is the known one half, but for images this dtype may decide the other way.
    top2 = reference.topk(2, dim=1).values
    ties = (top2[:, 0] - top2[:, 1] <= 2 * TOL[dtype] * reference.max()).sum().item()
    assert abs(accuracy - known) <= ties / len(images), (accuracy, known, ties)
    assert dtype != "fp32" or accuracy == known
