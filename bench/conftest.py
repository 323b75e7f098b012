"""Benchmark set-up (`pytest bench/ --benchmark-only`; CI: `pytest tests bench --benchmark-disable`).

Triton runs natively on CUDA and under its interpreter on CPU; the interpreter must be chosen
before triton is first imported, so it is set here, before any benchmark module loads.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_benchmark_update_machine_info(config, machine_info):
    """Every results JSON says which code and which device produced it."""
    from bench.common import run_info

    machine_info["capsfast"] = run_info()


@pytest.fixture(scope="session")
def mnist():
    """The MNIST copy shipped with the repo, on the benchmark device (as the trainer keeps it)."""
    from bench.common import DEVICE
    from capsfast.data import load_mnist

    return load_mnist().to(DEVICE)
