"""One optimiser step of the whole model (forward, both losses, backward, Adam), as the trainer runs
it, on a fixed batch of real MNIST images. Data loading is excluded (bench/test_data.py).

Variants are mode-dtype-routing; the baseline is eager fp32 with the torch reference routing.
bf16 is autocast around the forward with fp32 master weights (what Accelerate's AMP does).
Achieved TFLOP/s uses docs/spec.md's ~1.2 GFLOP per sample forward+backward; `matmul_fraction`
divides it by this device's matmul rate for the step's dtype, measured in the same session (the
`matmul_rate` fixture).
"""

from __future__ import annotations

import pytest
import torch

from bench.common import (
    FLOP_TRAIN,
    ON_CUDA,
    W_INIT_TRAIN,
    compile_fn,
    describe,
    finish,
    new_model,
    timed,
    tiny,
    train_step,
    variant_setup,
)
from capsfast.data import to_float

BASELINE = "eager-fp32-torch"
VARIANTS = (
    BASELINE,
    "eager-bf16-torch",
    "eager-bf16-triton",
    "eager-bf16-fused",
    "compiled-fp32-torch",
    "compiled-bf16-torch",
    "compiled-bf16-triton",
    "compiled-bf16-fused",
)
BATCHES = (
    (128, 256, 512) if ON_CUDA else (8, 32, 128)
)  # 256: the peak-memory target; 128: the paper batch
TINY_BATCH = 2
FIT_STEPS = 3  # at least this many steps on the one batch, timed or not: the loss must fall
# On a CPU a round is 0.1-2 s: 7 rounds after one warm-up (eager needs no more; compiled
# compiles in it) keep the timed CPU benchmarks inside CI's time.
ROUNDS = {"rounds": 20, "warmup_rounds": 3} if ON_CUDA else {"rounds": 7, "warmup_rounds": 1}
# The first step's capsules against eager fp32 on the same weights, relative to their largest
# value: fp32 differs by summation order (and TF32 convolutions, cuDNN's default on CUDA); bf16 by
# autocast rounding (a few ulps of 2^-8 through the network).
TOL = {"fp32": 1e-3 if ON_CUDA else 1e-4, "bf16": 5e-2}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(benchmark, mnist, matmul_rate, variant, batch):
    compiled, dtype, routing = variant_setup(benchmark, variant, batch, BATCHES)
    B = TINY_BATCH if tiny(benchmark) else batch
    x, y = to_float(mnist.train_images[:B]), mnist.train_labels[:B]

    model = new_model("torch", W_INIT_TRAIN)
    with torch.no_grad():
        want = model(x, y).poses  # eager fp32 reference, same weights
    model.set_routing(routing)
    net = compile_fn(model, benchmark) if compiled else model
    step = train_step(model, net, dtype)
    W0 = model.digit.W.detach().clone()
    results = []  # (loss, poses) of every call

    describe(
        benchmark,
        group=f"train_step B={batch}",
        subject="train_step",
        impl=f"{'compiled' if compiled else 'eager'}/{routing}",
        dtype=dtype,
        batch=B,
        baseline=variant == BASELINE,
    )
    timed(benchmark, lambda: results.append(step(x, y)), **ROUNDS, min_calls=FIT_STEPS)
    finish(benchmark, images=B, flops=FLOP_TRAIN * B, matmul_rate=matmul_rate)

    losses = torch.stack([loss for loss, _ in results]).float().cpu()
    assert torch.isfinite(losses).all(), f"non-finite loss: {losses.tolist()}"
    got, tol = results[0][1].float(), TOL[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    assert not torch.equal(model.digit.W.detach(), W0), "the step did not update W"
    assert len(losses) >= FIT_STEPS
    # Repeated steps on one batch must fit it (at the paper's init the loss falls from the first
    # step: 0.90 -> 0.32 -> 0.26 on two images, whatever the routing and dtype).
    assert losses[-1] < losses[0], f"loss did not go down: {losses.tolist()}"
