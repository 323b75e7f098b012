"""Host-side helpers shared by the Triton ops: interpreter detection, buffers, device checks."""

from __future__ import annotations

import functools
import os

import torch
from triton.runtime.interpreter import InterpretedFunction


def interpreted(kernel) -> bool:
    """True when `kernel` was built for the Triton interpreter (TRITON_INTERPRET=1 was set before
    triton was first imported): the ops then run on CPU tensors, slowly."""
    return isinstance(kernel, InterpretedFunction)


def buffer(shape, dtype, device) -> torch.Tensor:
    """An output or scratch buffer, uninitialised; filled with NaN under CAPSFAST_POISON=1 (the
    tests set it), so an element a kernel fails to write shows up."""
    if os.environ.get("CAPSFAST_POISON", "0") not in ("", "0"):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_device(device: torch.device, kernel, op: str, instead: str) -> None:
    """CUDA, or CPU under the interpreter; anything else gets an error that says what to use."""
    if device.type == "cuda" or (device.type == "cpu" and interpreted(kernel)):
        return
    if device.type == "cpu":
        raise RuntimeError(
            f"{op}: the tensors are on the CPU, where Triton runs only under its interpreter. "
            f"Use {instead} on CPU, or set TRITON_INTERPRET=1 in the environment before triton "
            "is first imported (slow; for tests)."
        )
    raise RuntimeError(
        f"{op}: device {device} is not supported (CUDA, or CPU under the Triton interpreter); "
        f"use {instead}"
    )
