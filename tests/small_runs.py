"""Small, fast training inputs shared by the tests of behaviour: `synthetic_mnist` (ten easy
classes, in memory) and `small_cfg` (a few steps of a small CapsNet, fp32 and eager)."""

import torch

from capsfast.config import resolve
from capsfast.data import MNIST


def synthetic_mnist(n_train=320, n_test=64, seed=0) -> MNIST:
    """Ten easy classes: a bright 6x6 block whose position encodes the label, plus noise."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = (torch.rand(n, 28, 28, generator=g) * 60).to(torch.uint8)
        for i, label in enumerate(labels.tolist()):
            r, c = 3 + 5 * (label // 5) * 2, 2 + 5 * (label % 5)
            images[i, r : r + 6, c : c + 6] = 255
        return images, labels

    tx, ty = make(n_train)
    sx, sy = make(n_test)
    return MNIST(tx, ty, sx, sy)


def small_cfg(tmp_path, **kw):
    base = dict(
        batch_size=16,
        val_size=32,
        max_steps=6,
        report_to="none",
        checkpoint_every=0,
        log_every=2,
        output_dir=str(tmp_path),
        eval_batch_size=64,
        cpu_threads=2,
        mixed_precision="no",  # fp32 and eager: tests of behaviour pin both (the CPU default is compiled bf16 where it can)
        compile=False,
        # A small CapsNet (2 primary capsule types: 72 primary capsules, not 1,152): the
        # behaviour these tests assert does not depend on the model's size.
        primary_types=2,
        figures=False,  # half of a small run's time: tests that look at figures turn them on
    )
    return resolve({**base, **kw})
