"""Shared test set-up.

Triton runs natively on CUDA and under its interpreter on CPU; the interpreter must be chosen
before triton is first imported, so it is set here, before any test module loads.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

pytest_plugins = ["tests.fixtures_model"]
