"""One briefly trained, exported CapsNet shared by every test module that needs a real model.

`trained_model_dir` trains CapsNet with plain PyTorch (Adam 1e-3, batch 32, fp32, ~250 steps on
real MNIST training images: a few minutes on two CPU cores), exports it with `save_model` and
returns the export directory. Session-scoped: trained once per pytest run, whatever the number of
modules using it. Its accuracy on the first 1,000 test images is written into the export's meta
(`meta["test_accuracy_1000"]`) and printed, and must be at least 95%.

Set CAPSFAST_TEST_MODEL=DIR to use an already exported model instead (e.g. from a real run).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

STEPS = int(os.environ.get("CAPSFAST_TEST_STEPS", "250"))
BATCH = 32
LR = 1e-3
SEED = 0
EVAL_SIZE = 1000
MIN_ACCURACY = 0.95


def _train_and_export(directory: Path) -> Path:
    from capsfast.data import load_mnist, to_float
    from capsfast.export import save_model
    from capsfast.model import CapsNet, margin_loss, reconstruction_loss

    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        torch.manual_seed(SEED)
        mnist = load_mnist()
        model = CapsNet(routing="torch")
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        g = torch.Generator().manual_seed(SEED)
        order = torch.randperm(mnist.train_images.shape[0], generator=g)
        start = time.perf_counter()
        for step in range(STEPS):
            idx = order[step * BATCH : (step + 1) * BATCH]
            x, y = to_float(mnist.train_images[idx]), mnist.train_labels[idx]
            out = model(x, y)
            loss = margin_loss(out.lengths, y) + reconstruction_loss(out.reconstructions, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        train_s = time.perf_counter() - start

        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, EVAL_SIZE, 250):
                x = to_float(mnist.test_images[i : i + 250])
                pred = model(x).lengths.argmax(1)
                correct += int((pred == mnist.test_labels[i : i + 250]).sum())
        accuracy = correct / EVAL_SIZE
    finally:
        torch.set_num_threads(threads)
    meta = {
        "source": "tests/fixtures_model.py",
        "steps": STEPS,
        "batch_size": BATCH,
        "lr": LR,
        "seed": SEED,
        "train_seconds": round(train_s, 1),
        "test_accuracy_1000": accuracy,
    }
    save_model(model, directory, meta)
    print(
        f"\n[trained_model_dir] {STEPS} steps in {train_s:.0f}s, "
        f"accuracy on {EVAL_SIZE} test images {accuracy:.2%}"
    )
    return directory


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory) -> Path:
    """Path to an exported model directory (model.safetensors + config.json), trained once."""
    override = os.environ.get("CAPSFAST_TEST_MODEL")
    if override:
        return Path(override)
    directory = _train_and_export(tmp_path_factory.mktemp("trained_model") / "model")
    from capsfast.export import read_config

    accuracy = read_config(directory)["meta"]["test_accuracy_1000"]
    assert accuracy >= MIN_ACCURACY, (
        f"the test fixture's model reached only {accuracy:.2%} on {EVAL_SIZE} test images"
    )
    return directory
