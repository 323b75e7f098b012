"""The data pipeline alone: one augmented training batch (device-side gather, per-sample random
shift, uint8 -> float), in batches/s and images/s. Compare with bench/test_train_step.py: the
pipeline must never be the bottleneck of a training step.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import ON_CUDA, describe, finish, first_batch_only, timed
from capsfast.data import TrainBatches, epoch_permutation

BATCHES = (128, 512) if ON_CUDA else (32, 128)
TINY_BATCH = 8
ROUNDS = {"rounds": 200, "warmup_rounds": 10} if ON_CUDA else {"rounds": 100, "warmup_rounds": 5}


@pytest.mark.parametrize("batch", BATCHES)
def test_batches(benchmark, mnist, batch):
    first_batch_only(benchmark, batch, BATCHES)
    B = TINY_BATCH if benchmark.disabled else batch
    images, labels = mnist.train_images, mnist.train_labels
    batches = TrainBatches(images, labels, B, seed=0, max_shift=2)
    plain = TrainBatches(images, labels, B, seed=0, max_shift=0)
    order = epoch_permutation(images.shape[0], 0, 0, images.device)  # once per epoch, as trained
    calls = []

    def next_batch():
        k = len(calls) % batches.steps_per_epoch
        calls.append(k)
        return k, batches.batch(0, k, order)

    describe(
        benchmark,
        group=f"data B={batch}",
        subject="data (shift 2)",
        impl="TrainBatches",
        dtype="fp32",
        batch=B,
        baseline=False,
    )
    k, (x, y) = timed(benchmark, next_batch, **ROUNDS)
    finish(benchmark, images=B)
    if benchmark.enabled:
        benchmark.extra_info["batches_per_second"] = 1 / benchmark.stats.stats.median

    assert x.shape == (B, 1, 28, 28) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    x_again, y_again = batches.batch(0, k, order)
    assert torch.equal(x, x_again) and torch.equal(y, y_again), "batches are not deterministic"
    x_plain, y_plain = plain.batch(0, k, order)
    assert torch.equal(y, y_plain) and torch.equal(y, labels[order[k * B : (k + 1) * B]])
    assert not torch.equal(x, x_plain), "augmentation shifted no image"
    # A shift moves pixels, it does not brighten: MNIST digits sit inside a 4-pixel border.
    assert torch.allclose(x.sum((1, 2, 3)), x_plain.sum((1, 2, 3)), rtol=0.05)
