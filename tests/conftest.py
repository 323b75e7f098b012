"""Shared test set-up.

Triton runs natively on CUDA and under its interpreter on CPU; the interpreter must be chosen
before triton is first imported, so it is set here, before any test module loads.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

pytest_plugins = ["tests.fixtures_model"]


@pytest.fixture
def ieee_fp32():
    """Full fp32 matmuls and convolutions on CUDA (no TF32) for one test, restored after it.

    Only public switches that every supported torch has: `torch.set_float32_matmul_precision`
    and the `torch.backends.cudnn.flags` context manager. (Monkeypatching
    `torch.backends.cuda.matmul.allow_tf32` breaks with torch 2.14 and pytest 9.2: the
    attribute is a computed property, and the undo deletes it.)"""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)
